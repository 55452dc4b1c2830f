"""The short plain-text summary of a results document (printed last by every run, and by ``bench show``).

Everything here is read off the document: the per-shape winners of the op suite (host-issued and, where
measured, GPU time inside a CUDA graph), what ``auto`` picked, the end-to-end table per model, and the
project's performance targets next to what the document shows for them.
"""

from __future__ import annotations

from . import results as R

# The end-to-end targets: (model, ours, baseline, minimum speedup of the best of `ours` over `baseline`).
E2E_TARGETS = (("sd15", ("df_fused_graph", "df_fused_graph_compile"), "diffusers_eager", 2.0),
               ("sd15", ("df_fused_graph", "df_fused_graph_compile"), "diffusers_graph", 1.25),
               ("sd15", ("df_fused_graph", "df_fused_graph_compile"), "diffusers_compile", 1.15),
               ("sdxl", ("df_fused_graph", "df_fused_graph_compile"), "diffusers_compile", 1.1))


def _fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


def _gpu_ms(c: dict) -> float:
    """GPU time inside a graph where measured, else the host-issued median."""
    return c.get("graph_median_ms") or c["median_ms"]


def _best_fast(cases: list[dict], time=lambda c: c["median_ms"]) -> dict | None:
    fast = [c for c in cases if c["kind"] == "backend" and c["impl"] not in ("torch", "auto")]
    pool = fast or [c for c in cases if c["impl"] == "torch"]
    return min(pool, key=time) if pool else None


def _shapes(doc: dict) -> dict[tuple[str, str, str], list[dict]]:
    by_shape: dict[tuple[str, str, str], list[dict]] = {}
    for c in doc["cases"]:
        if c["suite"] == "ops":
            by_shape.setdefault((c["op"], c["set"], c["key"].split("/")[2]), []).append(c)
    return by_shape


def headlines(doc: dict) -> list[tuple[str, str, str]]:
    """``(what, measured, target)`` rows for the project's performance targets, read off a results document."""
    by_shape = _shapes(doc)
    out = []
    graph = any(c.get("graph_median_ms") for cs in by_shape.values() for c in cs)
    when = "GPU time in a graph" if graph else "host-issued"

    def rows(op, set_name, pred=lambda name: True, pick="auto"):
        found = []
        for (o, s, name), cs in by_shape.items():
            if o == op and s == set_name and pred(name):
                c = next((c for c in cs if c["impl"] == pick), None) if pick == "auto" else None
                c = c or _best_fast(cs, _gpu_ms)
                if c is not None:
                    found.append((c, cs))
        return found

    def frac(c, what):
        return c.get(f"graph_{what}") or c.get(what)

    r = rows("group_norm", "large")
    if r:
        worst = min(r, key=lambda x: frac(x[0], "frac_copy_peak"))[0]
        out.append((f"group_norm+silu large: fraction of copy bandwidth (auto, worst shape, {when})",
                    f"{frac(worst, 'frac_copy_peak'):.2f} ({worst['params'].get('auto_pick', worst['impl'])})",
                    ">= 0.85"))
    for set_name, what, target in (("sd15", "sd15", ">= 1.0x"),
                                   ("dit", "dit (Flux / SD3 joint)", "none set")):
        ratios = []
        for c, cs in rows("attention", set_name):
            sdpa = [_gpu_ms(b) for b in cs if b["impl"].startswith("sdpa_") and b["kind"] == "baseline"]
            if sdpa:
                ratios.append(min(sdpa) / _gpu_ms(c))
        if ratios:
            out.append((f"attention {what}: auto vs the best torch SDPA backend (worst shape, {when})",
                        f"{min(ratios):.2f}x", target))
    autos = [c for cs in by_shape.values() for c in cs if c["impl"] == "auto"
             and "auto_picks_fastest_graph" in c["params"]]
    if autos:
        hits = sum(bool(c["params"]["auto_picks_fastest_graph"]) for c in autos)
        out.append(("auto picks the backend fastest in a graph", f"{hits}/{len(autos)} shapes", "all"))
    r = rows("sampler_step", "large")
    if r:
        c = r[0][0]
        out.append((f"sampler_step large: fraction of copy bandwidth (auto, {when})",
                    f"{frac(c, 'frac_copy_peak'):.2f}", ">= 0.85"))
    wrong = [c for cs in by_shape.values() for c in cs if c.get("correct") is False]
    if any("correct" in c for cs in by_shape.values() for c in cs):
        out.append(("op cases outside the oracle's tolerance", str(len(wrong)), "0"))

    e2e: dict[str, dict[str, dict]] = {}
    for c in doc["cases"]:
        if c["suite"] == "e2e":
            e2e.setdefault(c["set"], {})[c["impl"]] = c
    for model, ours, base, target in E2E_TARGETS:
        got = e2e.get(model)
        if not got or base not in got:
            continue
        mine = [got[n] for n in ours if n in got]
        if not mine:
            out.append((f"e2e {model}: {'/'.join(ours)} vs {base}", "not measured", f">= {target}x"))
            continue
        best = min(mine, key=lambda c: c["median_ms"])
        out.append((f"e2e {model}: {best['impl']} vs {base}", f"{got[base]['median_ms'] / best['median_ms']:.2f}x",
                    f">= {target}x"))
    if e2e:
        bad = [c for got in e2e.values() for c in got.values() if c["params"].get("output_finite") is False]
        out.append(("e2e variants whose output is not finite", str(len(bad)), "0"))
    for model, got in e2e.items():
        for c in got.values():
            if c.get("family") == "df" and "within_tolerance" in c["params"]:
                out.append((f"e2e {model}: {c['impl']} output within bf16 tolerance of the fp32 pipeline",
                            str(c["params"]["within_tolerance"]), "True"))
    return out


def summary_table(doc: dict) -> str:
    """A short plain-text summary of a results document."""
    lines = [R.dumps_summary_line(doc)]
    pk = doc["peaks"]
    lines.append(f"peaks: copy {pk['copy_gbps']:.1f} GB/s, matmul ({pk['matmul_dtype']}) "
                 f"{pk['matmul_tflops']:.2f} TFLOP/s")
    groups: dict[str, list[dict]] = {}
    for c in doc["cases"]:
        if c["suite"] == "ops":
            groups.setdefault(c["key"].rsplit("/", 1)[0], []).append(c)
    if groups:
        kw = max(len(k) for k in groups)
        lines.append(f"{'op case':<{kw}}  {'best':<7} {'ms':>8} {'graph ms':>8}  {'auto':<7} {'vs best baseline':>22}"
                     f"  ok")
        for k, cs in groups.items():
            b = _best_fast(cs, _gpu_ms) or min(cs, key=_gpu_ms)
            auto = next((c for c in cs if c["impl"] == "auto"), None)
            pick = auto["params"].get("auto_pick", "?") if auto else "-"
            if auto and auto["params"].get("auto_picks_fastest_graph") is False:
                pick += "*"
            vs_key = "graph_vs_best_baseline" if b.get("graph_vs_best_baseline") else "vs_best_baseline"
            base_key = "graph_best_baseline" if vs_key.startswith("graph") else "best_baseline"
            vs = f"{b[vs_key]:.2f}x {b[base_key]}" if b.get(vs_key) is not None else "-"
            bad = sum(c.get("correct") is False for c in cs)
            ok = "-" if all("correct" not in c for c in cs) else ("yes" if not bad else f"NO ({bad})")
            lines.append(f"{k:<{kw}}  {b['impl']:<7} {b['median_ms']:>8.4f} {_fmt(b.get('graph_median_ms'), '8.4f'):>8}"
                         f"  {pick:<7} {vs:>22}  {ok}")
        if any(c["impl"] == "auto" and c["params"].get("auto_picks_fastest_graph") is False
               for cs in groups.values() for c in cs):
            lines.append("  (* auto did not pick the backend fastest in a graph on this shape)")
    models: dict[str, list[dict]] = {}
    for c in doc["cases"]:
        if c["suite"] == "e2e":
            models.setdefault(c["set"], []).append(c)
    for model, cs in models.items():
        lines.append(f"e2e {model}: {cs[0]['key'].split('/')[2]}")
        lines.append(f"  {'variant':<23} {'family':<9} {'ms/img':>9} {'steps/s':>8} {'vs eager':>8} "
                     f"{'vs best non-df':>22} {'syncs/st':>8} {'mem/eager':>9} {'spread':>7} {'compile s':>9} "
                     f"{'rel diff':>9}")
        for c in cs:
            p = c["params"]
            vs_best = (f"{c['vs_best_baseline']:.2f}x {c['best_baseline']}" if c.get("vs_best_baseline") else "-")
            eager = c.get("vs_diffusers_eager", c.get("speedup", {}).get("eager"))
            method = p.get("graph_method") or p.get("compile_mode") or ""
            lines.append(f"  {c['impl']:<23} {c.get('family', '-'):<9} "
                         f"{c.get('ms_per_image', c['median_ms']):>9.2f} {c['steps_per_s']:>8.1f} "
                         f"{_fmt(eager, '.2f'):>8} {vs_best:>22} {_fmt(c.get('host_syncs_per_step'), '.2f'):>8} "
                         f"{_fmt(c.get('mem_vs_baseline'), '.3f'):>9} {_fmt(c.get('spread'), '.1%'):>7} "
                         f"{_fmt(c.get('compile_s'), '.0f'):>9} {_fmt(p.get('rel_l2_diff'), '.1e'):>9}"
                         + (f"  {method}" if method else ""))
    if doc["skipped"]:
        na = [s for s in doc["skipped"] if s["key"].startswith("e2e/")]
        lines.append(f"skipped: {len(doc['skipped'])} (reasons in the JSON)")
        for s in na:
            lines.append(f"  {s['key'].split('/')[1]}/{s['key'].rsplit('/', 1)[-1]}: {s['reason'][:150]}")
    heads = headlines(doc)
    if heads:
        lines.append("targets:")
        w = max(len(h[0]) for h in heads)
        lines.extend(f"  {a:<{w}}  {b:>18}  target {t}" for a, b, t in heads)
    return "\n".join(lines)
