"""``diffusion-fast bench``: op benchmarks, end-to-end sampling speed, and the regression gate.

    diffusion-fast bench ops  [--device cuda|cpu] [--sets sd15,sdxl,large] [--json out.json]
    diffusion-fast bench e2e  [--device cuda|cpu] [--steps 25] [--json out.json]
    diffusion-fast bench all  (ops then e2e, one results file)
    diffusion-fast bench compare BASE.json NEW.json --max-regression 5% [--plot out.png]
    diffusion-fast bench show RESULTS.json

Exit status: 0 success; 1 a regression beyond the threshold (compare) or a suite that measured nothing;
2 bad arguments or an unusable results file (missing, not JSON, wrong schema), with a one-line reason.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from . import results as R
from .compare import compare, format_table, parse_threshold
from .ops import DTYPES, OPS, SETS
from .progress import Progress


class _UsageError(Exception):
    pass


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise _UsageError(f"--device: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise _UsageError("--device cuda: no CUDA device is available here (use --device cpu)")
    if dev.type not in ("cuda", "cpu"):
        raise _UsageError(f"--device must be cuda or cpu, got {name!r}")
    return dev


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (default: cuda when present)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="activation dtype (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--json", metavar="PATH", help="write the results document here")
    p.add_argument("--threads", type=int, help="CPU threads for torch (CPU runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick-peaks", action="store_true", help="measure the peaks on smaller buffers")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--progress", dest="progress", action="store_true", default=None,
                   help="show progress on stderr (default: when stderr is a terminal)")
    g.add_argument("--no-progress", dest="progress", action="store_false")


def _add_ops(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sets", help=f"comma list from {','.join(SETS)} (default: sd15,sdxl,large on cuda, tiny on cpu)")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma list from {','.join(OPS)}")
    p.add_argument("--impls", help="only these implementations (e.g. torch,triton,eager,sdpa_flash)")
    p.add_argument("--budget-ms", type=float, help="timed milliseconds per case (default 100 on cuda, 20 on cpu)")
    p.add_argument("--compile-budget", type=float,
                   help="seconds torch.compile baselines may spend compiling (default 45 on cuda, 0 on cpu)")


def _add_e2e(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="UNet configuration (default sd15 on cuda, digits on cpu)")
    p.add_argument("--steps", type=int, help="sampling steps per call (default 25 on cuda, 4 on cpu)")
    p.add_argument("--repeats", type=int, default=3, help="timed sampling calls per variant")
    p.add_argument("--variants", default="eager,fast,fast_graph",
                   help="comma list from reference,eager,fast,fast_graph")
    p.add_argument("--sampler", default="dpmpp_2m")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffusion-fast bench", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("ops", help="op benchmarks against the card's measured peaks and the torch baselines")
    _add_common(p)
    _add_ops(p)
    p = sub.add_parser("e2e", help="end-to-end sampling speed (UNet, CFG, N steps)")
    _add_common(p)
    _add_e2e(p)
    p = sub.add_parser("all", help="ops then e2e into one results document")
    _add_common(p)
    _add_ops(p)
    _add_e2e(p)
    p = sub.add_parser("compare", help="compare two results files; exit 1 on a regression")
    p.add_argument("base")
    p.add_argument("new")
    p.add_argument("--max-regression", default="5%", help="allowed slowdown per case, a percentage (default 5%%)")
    p.add_argument("--plot", metavar="PNG", help="draw the speedups to this PNG file")
    p = sub.add_parser("show", help="print the summary table of a results file")
    p.add_argument("file")
    return parser


def _run_suites(args: argparse.Namespace, suites: Sequence[str]) -> int:
    device = _device(args.device)
    cuda = device.type == "cuda"
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    if args.threads is not None and args.threads < 1:
        raise _UsageError(f"--threads must be >= 1, got {args.threads}")
    if "ops" in suites:
        for name, given, known in (("--sets", args.sets, SETS), ("--ops", args.ops, OPS)):
            for item in _csv(given or ""):
                if item not in known:
                    what = "shape set" if name == "--sets" else "op"
                    raise _UsageError(f"{name}: unknown {what} {item!r}; expected names from {known}")
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        return _run_measured(args, suites, device, dtype)
    finally:
        torch.set_num_threads(threads)


def _run_measured(args: argparse.Namespace, suites: Sequence[str], device: torch.device, dtype: torch.dtype) -> int:
    from .peaks import measure_peaks

    cuda = device.type == "cuda"
    config = {"argv": list(getattr(args, "_argv", [])), "device": str(device), "dtype": str(dtype).split(".")[-1],
              "seed": args.seed}
    progress = Progress(0, enabled=args.progress)
    progress.add(1)
    progress.step("measuring copy bandwidth and matmul rate")
    peaks = measure_peaks(device, quick=args.quick_peaks)
    doc = R.new_document(device, config, peaks)
    status = 0
    try:
        if "ops" in suites:
            from .ops import run_ops

            sets = _csv(args.sets) if args.sets else (["sd15", "sdxl", "large"] if cuda else ["tiny"])
            ops = _csv(args.ops)
            impls = _csv(args.impls) if args.impls else None
            budget = args.budget_ms if args.budget_ms is not None else (100.0 if cuda else 20.0)
            cbudget = args.compile_budget if args.compile_budget is not None else (45.0 if cuda else 0.0)
            config.update(sets=sets, ops=ops, impls=impls, budget_ms=budget, compile_budget_s=cbudget)
            try:
                run = run_ops(device, dtype, ops=ops, sets=sets, impls=impls, peaks=peaks, budget_ms=budget,
                              compile_budget_s=cbudget, progress=progress, seed=args.seed)
            except ValueError as exc:
                raise _UsageError(str(exc)) from None
            doc["suites"].append("ops")
            doc["cases"].extend(run.cases)
            doc["skipped"].extend(run.skipped)
            if not run.cases:
                print("error: the ops suite measured no case (see skipped)", file=sys.stderr)
                status = 1
        if "e2e" in suites:
            from .e2e import run_e2e

            cfg_name = args.config or ("sd15" if cuda else "digits")
            steps = args.steps if args.steps is not None else (25 if cuda else 4)
            variants = _csv(args.variants)
            config.update(e2e_config=cfg_name, steps=steps, repeats=args.repeats, variants=variants,
                          sampler=args.sampler)
            try:
                cases, skipped = run_e2e(device, dtype, config=cfg_name, steps=steps, repeats=args.repeats,
                                         variants=variants, sampler=args.sampler, seed=args.seed,
                                         progress=progress)
            except ValueError as exc:
                raise _UsageError(str(exc)) from None
            doc["suites"].append("e2e")
            doc["cases"].extend(cases)
            doc["skipped"].extend(skipped)
            if not cases:
                print("error: the e2e suite measured no variant (see skipped)", file=sys.stderr)
                status = 1
    finally:
        progress.close()
    if args.json:
        try:
            R.save(doc, args.json)
        except OSError as exc:
            raise _UsageError(f"--json: cannot write {args.json}: {exc}") from None
    print(summary_table(doc))
    if args.json:
        print(f"results written to {args.json}")
    return status


# ------------------------------------------------------------------------------------------------ summary


def _fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


def _best_fast(cases: list[dict]) -> dict | None:
    fast = [c for c in cases if c["kind"] == "backend" and c["impl"] != "torch"]
    pool = fast or [c for c in cases if c["impl"] == "torch"]
    return min(pool, key=lambda c: c["median_ms"]) if pool else None


def headlines(doc: dict) -> list[tuple[str, str, str]]:
    """``(what, measured, target)`` rows for the project's performance targets, read off a results document."""
    by_shape: dict[tuple[str, str, str], list[dict]] = {}
    for c in doc["cases"]:
        if c["suite"] == "ops":
            by_shape.setdefault((c["op"], c["set"], c["key"].split("/")[2]), []).append(c)
    out = []

    def best_in(op, set_name, pred=lambda name: True):
        rows = []
        for (o, s, name), cs in by_shape.items():
            if o == op and s == set_name and pred(name):
                b = _best_fast(cs)
                if b is not None:
                    rows.append(b)
        return rows

    rows = best_in("group_norm", "large")
    if rows:
        out.append(("group_norm+silu large: fraction of copy bandwidth (worst shape)",
                    f"{min(r['frac_copy_peak'] for r in rows):.2f} ({rows[0]['impl']})", ">= 0.85"))
    rows = [r for r in best_in("group_norm", "sd15") if "eager" in r.get("speedup", {})]
    if rows:
        out.append(("group_norm+silu sd15: speedup over eager (worst shape)",
                    f"{min(r['speedup']['eager'] for r in rows):.2f}x", ">= 3x"))
    rows = [r for r in best_in("attention", "sd15")
            if any(k.startswith("sdpa_") for k in r.get("speedup", {}))]
    if rows:
        worst = min(min(v for k, v in r["speedup"].items() if k.startswith("sdpa_")) for r in rows)
        out.append(("attention sd15: speedup over the best torch SDPA (worst shape)", f"{worst:.2f}x", ">= 1.2x"))
    rows = best_in("attention", "large", lambda name: name.startswith("self") and "-s4096-" in name) + \
        best_in("attention", "sdxl", lambda name: name.startswith("self") and "-s4096-" in name)
    if rows:
        out.append(("attention D=64/128 S=4096: fraction of bf16 matmul rate (worst)",
                    f"{min(r['frac_matmul_peak'] for r in rows):.2f}", ">= 0.75"))
    rows = best_in("sampler_step", "large")
    if rows:
        out.append(("sampler_step large: fraction of copy bandwidth",
                    f"{min(r['frac_copy_peak'] for r in rows):.2f} ({rows[0]['impl']})", ">= 0.85"))
    e2e = {c["impl"]: c for c in doc["cases"] if c["suite"] == "e2e"}
    best = e2e.get("fast_graph") or e2e.get("fast")
    if best is not None and "eager" in e2e:
        out.append((f"e2e {best['set']} ({best['impl']}): speedup over eager",
                    f"{best['speedup'].get('eager', 0):.2f}x", ">= 2.0x"))
        out.append((f"e2e {best['set']} ({best['impl']}): steps/s", f"{best['steps_per_s']:.1f}", ">= 110 (H100)"))
        out.append((f"e2e {best['set']} ({best['impl']}): host syncs per step",
                    _fmt(best.get("host_syncs_per_step"), ".2f", "n/a (no CUDA)"), "0"))
        out.append((f"e2e {best['set']} ({best['impl']}): peak memory / eager",
                    _fmt(best.get("mem_vs_baseline"), ".3f", "n/a (no CUDA)"), "<= 1.10"))
    return out


def summary_table(doc: dict) -> str:
    """A short plain-text summary of a results document (printed last by every run)."""
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
        lines.append(f"{'op case':<{kw}}  {'best':<8} {'ms':>9} {'roofl':>6} {'vs best baseline':>22}")
        for k, cs in groups.items():
            b = _best_fast(cs)
            if b is None:
                b = min(cs, key=lambda c: c["median_ms"])
            vs = (f"{b['vs_best_baseline']:.2f}x {b['best_baseline']}" if b.get("vs_best_baseline") is not None
                  else "-")
            lines.append(f"{k:<{kw}}  {b['impl']:<8} {b['median_ms']:>9.4f} {_fmt(b.get('roofline_frac'), '6.2f'):>6} "
                         f"{vs:>22}")
    e2e = [c for c in doc["cases"] if c["suite"] == "e2e"]
    if e2e:
        lines.append(f"{'e2e variant':<14} {'ms/call':>9} {'steps/s':>8} {'vs eager':>9} {'syncs/step':>10} "
                     f"{'mem/eager':>9}")
        for c in e2e:
            lines.append(f"{c['impl']:<14} {c['median_ms']:>9.2f} {c['steps_per_s']:>8.1f} "
                         f"{_fmt(c.get('speedup', {}).get('eager'), '.2f'):>9} "
                         f"{_fmt(c.get('host_syncs_per_step'), '.2f'):>10} {_fmt(c.get('mem_vs_baseline'), '.3f'):>9}"
                         + ("" if "matches_uncaptured" not in c["params"] else
                            f"  bitwise={c['params']['matches_uncaptured']}"))
    if doc["skipped"]:
        lines.append(f"skipped: {len(doc['skipped'])} (reasons in the JSON)")
    heads = headlines(doc)
    if heads:
        lines.append("targets:")
        w = max(len(h[0]) for h in heads)
        lines.extend(f"  {a:<{w}}  {b:>18}  target {t}" for a, b, t in heads)
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main


def _compare(args: argparse.Namespace) -> int:
    try:
        thr = parse_threshold(args.max_regression)
    except ValueError as exc:
        raise _UsageError(str(exc)) from None
    base = R.load(args.base)
    new = R.load(args.new)
    cmp = compare(base, new, thr)
    print(format_table(cmp))
    if args.plot:
        from .plot import plot_comparison

        try:
            plot_comparison(cmp, args.plot)
        except OSError as exc:
            raise _UsageError(f"--plot: cannot write {args.plot}: {exc}") from None
        print(f"plot written to {args.plot}")
    return 1 if cmp.regressions else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``diffusion-fast bench``; returns the exit status (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed its message
        return 0 if exc.code == 0 else 2
    args._argv = argv
    try:
        if args.cmd == "compare":
            return _compare(args)
        if args.cmd == "show":
            print(summary_table(R.load(args.file)))
            return 0
        suites = {"ops": ["ops"], "e2e": ["e2e"], "all": ["ops", "e2e"]}[args.cmd]
        return _run_suites(args, suites)
    except R.SchemaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except _UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
