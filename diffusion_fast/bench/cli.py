"""``diffusion-fast bench``: op benchmarks, end-to-end sampling speed, and the regression gate.

    diffusion-fast bench ops  [--device cuda|cpu] [--sets sd15,sdxl,large,dit] [--json out.json]
    diffusion-fast bench e2e  [--device cuda|cpu] [--model sd15|sdxl|flux|sd3|*-tiny] [--steps N] [--blocks D,S]
                              [--json out.json]
    diffusion-fast bench all  (ops then e2e, one results file)
    diffusion-fast bench merge A.json B.json ... --json out.json   (results of one machine, one document)
    diffusion-fast bench compare BASE.json NEW.json --max-regression 5% [--noise-k 2] [--plot out.png]
    diffusion-fast bench show RESULTS.json

Exit status: 0 success; 1 a regression beyond the threshold (compare) or a suite that measured nothing;
2 bad arguments or an unusable results file (missing, not JSON, wrong schema), with a one-line reason.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

import torch

from .._io import same_file
from . import results as R
from .compare import compare, format_table, parse_threshold
from .ops import DTYPES, OPS, SETS
from .progress import Progress
from .summary import summary_table

# The names of .e2e.MODELS, without importing it (tests check that the two agree).
E2E_MODELS = ("sd15", "sdxl", "flux", "sd3", "sd15-tiny", "sdxl-tiny", "flux-tiny", "sd3-tiny")


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
    p.add_argument("--time-limit", type=float, metavar="SECONDS",
                   help="end the suites within about this many seconds: what does not fit is recorded as not "
                        "run, and the results are still written")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--progress", dest="progress", action="store_true", default=None,
                   help="show progress on stderr (default: when stderr is a terminal)")
    g.add_argument("--no-progress", dest="progress", action="store_false")


def _add_ops(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sets", help=f"comma list from {','.join(SETS)} (default: sd15,sdxl,large,dit on cuda, tiny on "
                   "cpu)")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma list from {','.join(OPS)}")
    p.add_argument("--impls", help="only these implementations (e.g. torch,triton,eager,sdpa_flash)")
    p.add_argument("--budget-ms", type=float, help="timed milliseconds per case (default 100 on cuda, 20 on cpu)")
    p.add_argument("--compile-budget", type=float,
                   help="seconds torch.compile baselines may spend compiling (default 45 on cuda, 0 on cpu)")


def _add_e2e(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", choices=E2E_MODELS,
                   help="diffusers model with random weights: sd15 (512^2), sdxl, flux, sd3 (1024^2), *-tiny for "
                        "CPU tests (default sd15 on cuda, sd15-tiny on cpu)")
    p.add_argument("--steps", type=int,
                   help="sampling steps per call (default on cuda 25 for sd15/sdxl, 28 for flux/sd3; 4 on cpu)")
    p.add_argument("--blocks", metavar="N[,N]",
                   help="transformer block counts, the rest of the architecture unchanged: flux double,single "
                        "(published 19,38), sd3 joint (24); default: the config's own")
    p.add_argument("--batch", type=int, default=1, help="images per call (the denoiser sees twice that with CFG)")
    p.add_argument("--repeats", type=int, default=3, help="timed sampling calls per variant (default 3)")
    p.add_argument("--variants", help="comma list of variants (default: all; see docs/benchmarking.md)")
    p.add_argument("--compile-mode", default="max-autotune-no-cudagraphs",
                   help="torch.compile mode compiled variants try first (default: diffusers' recipe, "
                        "max-autotune-no-cudagraphs); on timeout they fall back to 'default'")
    p.add_argument("--compile-cap", type=float,
                   help="seconds one torch.compile may take before its variant falls back (default 900 on cuda, "
                        "0 on cpu: compiled variants recorded as not run)")
    p.add_argument("--graph-methods", default="cuda_graph,reduce-overhead",
                   help="what diffusers_graph tries: cuda_graph, reduce-overhead (the faster is kept)")
    p.add_argument("--fp32-reference", action="store_true",
                   help="also run the stock pipeline in float32 and judge each output against it")


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
    p.add_argument("--max-regression", default="5%",
                   help="allowed slowdown per case, a percentage (default 5%%), widened per case by --noise-k")
    p.add_argument("--noise-k", type=float, default=2.0,
                   help="a case may also be this many times its measured noise (p80-p20)/median slower "
                        "(default 2; 0: the flat threshold only)")
    p.add_argument("--plot", metavar="PNG", help="draw the speedups to this .png file (never an input file)")
    p = sub.add_parser("merge", help="merge results files of one machine into one document")
    p.add_argument("files", nargs="+")
    p.add_argument("--json", metavar="PATH", required=True, help="write the merged document here")
    p = sub.add_parser("show", help="print the summary table of a results file")
    p.add_argument("file")
    return parser


def _run_suites(args: argparse.Namespace, suites: Sequence[str]) -> int:
    device = _device(args.device)
    cuda = device.type == "cuda"
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    if args.threads is not None and args.threads < 1:
        raise _UsageError(f"--threads must be >= 1, got {args.threads}")
    if args.time_limit is not None and not (0 < args.time_limit < float("inf")):
        raise _UsageError(f"--time-limit must be a number of seconds > 0, got {args.time_limit}")
    if "ops" in suites:
        for name, given, known in (("--sets", args.sets, SETS), ("--ops", args.ops, OPS)):
            for item in _csv(given or ""):
                if item not in known:
                    what = "shape set" if name == "--sets" else "op"
                    raise _UsageError(f"{name}: unknown {what} {item!r}; expected names from {known}")
    if "e2e" in suites:
        _e2e_settings(args, cuda)  # bad e2e arguments fail here, before anything is measured
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        return _run_measured(args, suites, device, dtype)
    finally:
        torch.set_num_threads(threads)


def _e2e_settings(args: argparse.Namespace, cuda: bool) -> dict:
    """The keyword arguments of :func:`.e2e.run_e2e` from the command line, each checked (a _UsageError)."""
    from .e2e import COMPILE_MODES, MODEL_SPECS, VARIANT_NAMES, check_blocks

    variants = _csv(args.variants) if args.variants else list(VARIANT_NAMES)
    for v in variants:
        if v not in VARIANT_NAMES:
            raise _UsageError(f"--variants: unknown variant {v!r}; expected names from {', '.join(VARIANT_NAMES)}")
    methods = _csv(args.graph_methods)
    for m in methods:
        if m not in ("cuda_graph", "reduce-overhead"):
            raise _UsageError(f"--graph-methods: unknown method {m!r}; expected cuda_graph, reduce-overhead")
    if args.compile_mode not in COMPILE_MODES:
        raise _UsageError(f"--compile-mode: unknown mode {args.compile_mode!r}; expected {', '.join(COMPILE_MODES)}")
    model = args.model or ("sd15" if cuda else "sd15-tiny")
    steps = args.steps if args.steps is not None else (MODEL_SPECS[model.partition("-")[0]].steps if cuda else 4)
    blocks = None
    if args.blocks is not None:
        try:
            blocks = [int(b) for b in _csv(args.blocks)]
        except ValueError:
            raise _UsageError(f"--blocks: expected comma-separated integers, got {args.blocks!r}") from None
        try:
            check_blocks(model, blocks)
        except ValueError as exc:
            raise _UsageError(f"--{exc}") from None
    cap = args.compile_cap if args.compile_cap is not None else (900.0 if cuda else 0.0)
    for name, v, lo in (("--steps", steps, 4), ("--repeats", args.repeats, 1), ("--batch", args.batch, 1)):
        if v < lo:
            raise _UsageError(f"{name} must be >= {lo}, got {v}")
    if not (0 <= cap < float("inf")):
        raise _UsageError(f"--compile-cap must be a number of seconds >= 0, got {args.compile_cap}")
    return {"model": model, "steps": steps, "repeats": args.repeats, "batch": args.batch, "variants": variants,
            "compile_mode": args.compile_mode, "compile_cap_s": cap, "graph_methods": methods,
            "fp32_reference": bool(args.fp32_reference), "blocks": blocks}


def _run_measured(args: argparse.Namespace, suites: Sequence[str], device: torch.device, dtype: torch.dtype) -> int:
    from .peaks import measure_peaks

    cuda = device.type == "cuda"
    deadline = None if args.time_limit is None else time.perf_counter() + args.time_limit
    config = {"argv": list(getattr(args, "_argv", [])), "device": str(device), "dtype": str(dtype).split(".")[-1],
              "seed": args.seed, "time_limit_s": args.time_limit}
    progress = Progress(0, enabled=args.progress)
    progress.add(1)
    progress.step("measuring copy bandwidth and matmul rate")
    peaks = measure_peaks(device, quick=args.quick_peaks)
    doc = R.new_document(device, config, peaks)
    status = 0
    try:
        if "ops" in suites:
            from .ops import run_ops

            sets = _csv(args.sets) if args.sets else (["sd15", "sdxl", "large", "dit"] if cuda else ["tiny"])
            ops = _csv(args.ops)
            impls = _csv(args.impls) if args.impls else None
            budget = args.budget_ms if args.budget_ms is not None else (100.0 if cuda else 20.0)
            cbudget = args.compile_budget if args.compile_budget is not None else (45.0 if cuda else 0.0)
            config.update(sets=sets, ops=ops, impls=impls, budget_ms=budget, compile_budget_s=cbudget)
            try:
                run = run_ops(device, dtype, ops=ops, sets=sets, impls=impls, peaks=peaks, budget_ms=budget,
                              compile_budget_s=cbudget, progress=progress, seed=args.seed,
                              deadline=None if deadline is None else
                              deadline - (0.5 * (deadline - time.perf_counter()) if "e2e" in suites else 0))
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

            e2e = _e2e_settings(args, cuda)
            config.update(e2e)
            try:
                cases, skipped = run_e2e(device, dtype, seed=args.seed, progress=progress, deadline=deadline, **e2e)
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


# ------------------------------------------------------------------------------------------------ main


def _check_plot_path(path: str, inputs: Sequence[str]) -> None:
    """Refuse, before any work, a plot path that is not a .png or that names one of the input files."""
    for name in inputs:
        if same_file(path, name):
            raise _UsageError(f"--plot {path!r} is the input results file {name!r}; refusing to overwrite it")
    if os.path.splitext(path)[1].lower() != ".png":
        raise _UsageError(f"--plot {path!r}: the plot is a PNG image; give a path ending in .png")
    if os.path.isdir(path):
        raise _UsageError(f"--plot {path!r} is a directory")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise _UsageError(f"--plot {path!r}: directory {parent!r} does not exist")


def _compare(args: argparse.Namespace) -> int:
    try:
        thr = parse_threshold(args.max_regression)
    except ValueError as exc:
        raise _UsageError(str(exc)) from None
    if not (0 <= args.noise_k < float("inf")):
        raise _UsageError(f"--noise-k must be a finite number >= 0, got {args.noise_k}")
    if args.plot:
        _check_plot_path(args.plot, (args.base, args.new))
    base = R.load(args.base)
    new = R.load(args.new)
    cmp = compare(base, new, thr, args.noise_k)
    print(format_table(cmp))
    if args.plot:
        from .plot import plot_comparison

        try:
            plot_comparison(cmp, args.plot)
        except OSError as exc:
            raise _UsageError(f"--plot: cannot write {args.plot}: {exc}") from None
        print(f"plot written to {args.plot}")
    return 1 if cmp.regressions else 0


def _merge(args: argparse.Namespace) -> int:
    for name in args.files:
        if same_file(args.json, name):
            raise _UsageError(f"--json {args.json!r} is the input file {name!r}; refusing to overwrite it")
    docs = [R.load(f) for f in args.files]
    try:
        doc = R.merge(docs, args.files)
    except ValueError as exc:
        raise _UsageError(str(exc)) from None
    try:
        R.save(doc, args.json)
    except OSError as exc:
        raise _UsageError(f"--json: cannot write {args.json}: {exc}") from None
    print(summary_table(doc))
    print(f"results written to {args.json}")
    return 0


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
        if args.cmd == "merge":
            return _merge(args)
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
