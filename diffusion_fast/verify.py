"""``diffusion-fast verify``: every kernel this machine can run, checked against the float64 oracle.

For each op, each backend usable here (the reference, triton, cuda, sdpa), each dtype and each layout the op
accepts, over a small grid of shapes, on fresh random inputs (buffers the op writes into start as NaN): the
largest error against the float64 oracle (``kernels/reference/oracle.py``) and whether it is within the oracle's
tolerance rule (twice the error of the same op computed plainly in that precision, plus half an ulp). On a GPU
each check also times the backend and torch's own implementation of the op (GroupNorm then SiLU, SDPA, the
sampler update as separate torch ops) as GPU time inside a CUDA graph, and reports the ratio.

On a CPU it runs the reference and, in Triton's interpreter (``TRITON_INTERPRET=1``, set here when no GPU is
present and before any Triton kernel is loaded), the Triton kernels on tiny shapes: slow, and timed not at all,
but every check is the same. Triton's autotuner is off during the run (``DIFFUSION_FAST_AUTOTUNE=0``): each
kernel runs its default configuration, and the run stays under a minute; the GPU tests cover every candidate
configuration.

A backend that declines a call (its ``supports`` gives a reason: a dtype or head dim it does not serve) is
listed as declined, not failed. Exit status: 0 all checks pass; 1 any check fails (or nothing could be
checked); 2 bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

PROG = "diffusion-fast verify"
OPS = ("group_norm", "attention", "sampler_step")
DTYPES = ("fp32", "fp16", "bf16")

# Shapes per op: the bench suite's entries (see bench/ops.py), small enough for a run under a minute.
GRID = {
    "cuda": {
        "group_norm": [((2, 320, 32, 32), 32), ((1, 64, 17, 19), 8), ((2, 1280, 8, 8), 32)],
        "attention": [(2, 1024, 1024, 8, 40), (2, 333, 77, 8, 80), (1, 256, 256, 8, 160), (1, 200, 300, 4, 64)],
        "sampler_step": [((1, 4, 64, 64), 1, False), ((2, 3, 5, 7), 3, True)],
    },
    "cpu": {
        "group_norm": [((2, 24, 5, 7), 6)],
        "attention": [(1, 37, 77, 2, 40)],
        "sampler_step": [((2, 3, 5, 7), 2, True)],
    },
}
LAYOUTS = {"group_norm": ("contiguous", "channels_last"), "attention": ("contiguous", "fused_qkv"),
           "sampler_step": ("contiguous",)}


@dataclass
class Check:
    op: str
    backend: str
    dtype: str
    layout: str
    shape: str
    status: str  # "pass", "FAIL", "error" (the kernel raised), "declined" (by its backend), "not run" (time)
    max_abs_err: float | None = None
    bound: float | None = None
    detail: str = ""
    gpu_us: float | None = None
    torch_us: float | None = None


class UsageError(Exception):
    pass


def _layout(op: str, layout: str, t: dict) -> dict:
    """Re-lay the inputs: channels_last GroupNorm input; q, k, v as views of one fused projection."""
    import torch

    if layout == "channels_last":
        t["x"] = t["x"].contiguous(memory_format=torch.channels_last)
    elif layout == "fused_qkv":
        q, k, v = t["q"], t["k"], t["v"]
        if q.shape == k.shape:
            t["q"], t["k"], t["v"] = torch.stack([q, k, v], dim=2).unbind(2)  # [B, S, 3, H, D] slices
        else:
            t["k"], t["v"] = torch.stack([k, v], dim=2).unbind(2)  # fused [B, Sk, 2, H, D] keys/values
    return t


def _torch_impl(op: str, t: dict):
    """torch's own implementation of the op on these inputs (what a model without this library runs)."""
    import torch.nn.functional as F

    from .bench.ops import SPECS

    if op == "attention":
        q, k, v = (t[n].transpose(1, 2) for n in ("q", "k", "v"))
        return lambda: F.scaled_dot_product_attention(q, k, v)
    return SPECS[op].baselines(0)[0].bind(t)


def _time_us(fn, device) -> float | None:
    from .bench.timing import measure_graph

    try:
        return measure_graph([fn], device, budget_ms=5.0, min_samples=3, max_samples=20, sample_ms=0.3).median_ms * 1e3
    except Exception:  # timing is informative; a call that cannot be captured is timed as "-"
        import torch

        torch.cuda.synchronize(device)
        return None


def run_checks(device, *, ops: Sequence[str] = OPS, backends: Sequence[str] | None = None,
               dtypes: Sequence[str] = DTYPES, timing: bool | None = None, seed: int = 0,
               deadline: float | None = None) -> list[Check]:
    """Run every check on ``device`` and return them (see the module docstring). Checks not started by
    ``deadline`` (a ``time.perf_counter()`` value) are returned with status ``"not run"``."""
    import torch

    from .bench.ops import DTYPES as DT
    from .bench.ops import SPECS
    from .kernels.reference import oracle
    from .ops import registry

    cuda = device.type == "cuda"
    timing = cuda if timing is None else timing
    gen = torch.Generator(device=device).manual_seed(seed)
    checks: list[Check] = []
    for op in ops:
        spec = SPECS[op]
        usable = [b for b, why in registry.status(op).items() if why is None and (backends is None or b in backends)]
        for dname in dtypes:
            dtype = DT[dname]
            for entry in GRID["cuda" if cuda else "cpu"][op]:
                shape = spec.shape(entry, "verify", dtype)
                for layout in LAYOUTS[op]:
                    if deadline is not None and time.perf_counter() > deadline:
                        checks.extend(Check(op, b, dname, layout, shape.name, "not run",
                                            detail="the time limit (--time-limit) was reached") for b in usable)
                        continue
                    base = _layout(op, layout, shape.make(device, dtype, gen))
                    expected = spec.oracle({k: (v.clone() if isinstance(v, torch.Tensor) else v)
                                            for k, v in base.items()})
                    torch_us = _time_us(_torch_impl(op, base), device) if timing else None
                    for backend in usable:
                        if deadline is not None and time.perf_counter() > deadline:
                            checks.append(Check(op, backend, dname, layout, shape.name, "not run",
                                                detail="the time limit (--time-limit) was reached"))
                            continue
                        checks.append(_check(spec, backend, dname, layout, shape.name, base, expected, device,
                                             torch_us, timing, oracle, registry))
    return checks


def _check(spec, backend, dname, layout, shape_name, base, expected, device, torch_us, timing, oracle, registry):
    import torch

    from .bench.ops import check_outputs

    t = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in base.items()}
    for name in ("out", "net_input"):  # buffers the op writes into start as NaN
        if isinstance(t.get(name), torch.Tensor):
            t[name].fill_(float("nan"))
    c = Check(spec.name, backend, dname, layout, shape_name, "pass")
    why = registry.explain(spec.name, device, spec.registry_call(t))
    reason = dict(why).get(backend)
    if reason is not None:
        c.status, c.detail = "declined", reason[:200]
        return c
    try:
        res = spec.call(t, backend)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as exc:  # a crash is a failure of this check, not of the run
        c.status, c.detail = "error", f"{type(exc).__name__}: {str(exc).strip()[:200]}"
        return c
    v = check_outputs(spec, spec.outputs(res, t), expected)
    c.max_abs_err, c.bound = v.max_abs_err, v.tolerance
    if not v.ok:
        c.status, c.detail = "FAIL", v.detail
    if timing and c.status == "pass":
        t2 = {k: (x.clone() if isinstance(x, torch.Tensor) else x) for k, x in base.items()}
        c.gpu_us = _time_us(lambda: spec.call(t2, backend), device)
        c.torch_us = torch_us
    return c


def format_table(checks: list[Check]) -> str:
    """One row per (op, backend, dtype, layout): checks passed, worst error / bound, GPU time vs torch."""
    import math

    rows: dict[tuple, list[Check]] = {}
    for c in checks:
        rows.setdefault((c.op, c.backend, c.dtype, c.layout), []).append(c)
    lines = [f"{'op':<13} {'backend':<7} {'dtype':<5} {'layout':<13} {'result':<12} {'max err':>9} {'bound':>9} "
             f"{'us':>8} {'torch us':>8} {'vs torch':>8}"]
    for (op, backend, dtype, layout), cs in rows.items():
        ran = [c for c in cs if c.status not in ("declined", "not run")]
        bad = [c for c in ran if c.status != "pass"]
        if not ran:
            result = "not run" if any(c.status == "not run" for c in cs) else "declined"
        else:
            result = f"{len(ran) - len(bad)}/{len(ran)} pass" if not bad else f"FAIL {len(bad)}/{len(ran)}"
        worst = max(ran, key=lambda c: (c.max_abs_err or 0) / (c.bound or 1), default=None)
        timed = [c for c in ran if c.gpu_us and c.torch_us]
        us = math.exp(sum(math.log(c.gpu_us) for c in timed) / len(timed)) if timed else None
        tus = math.exp(sum(math.log(c.torch_us) for c in timed) / len(timed)) if timed else None

        def f(v, spec):
            return "-" if v is None else format(v, spec)
        lines.append(f"{op:<13} {backend:<7} {dtype:<5} {layout:<13} {result:<12} "
                     f"{f(worst and worst.max_abs_err, '9.2e'):>9} {f(worst and worst.bound, '9.2e'):>9} "
                     f"{f(us, '8.1f'):>8} {f(tus, '8.1f'):>8} {f(tus / us if us and tus else None, '7.2f'):>7}x")
    for c in checks:
        if c.status in ("FAIL", "error"):
            lines.append(f"{c.status}: {c.op} {c.backend} {c.dtype} {c.layout} {c.shape}: {c.detail}")
    n_bad = sum(c.status in ("FAIL", "error") for c in checks)
    n_late = sum(c.status == "not run" for c in checks)
    n_run = sum(c.status not in ("declined", "not run") for c in checks)
    lines.append(f"{'FAIL' if n_bad or not n_run else 'ok'}: {n_run} checks ran, {n_bad} failed, "
                 f"{len(checks) - n_run - n_late} declined by their backend"
                 + (f", {n_late} not run (time limit)" if n_late else ""))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (default: cuda when present)")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma list from {','.join(OPS)}")
    p.add_argument("--backends", help="only these backends (default: every backend usable here)")
    p.add_argument("--dtypes", default=",".join(DTYPES), help=f"comma list from {','.join(DTYPES)}")
    p.add_argument("--json", metavar="PATH", help="also write every check as JSON here")
    p.add_argument("--no-timing", action="store_true", help="skip the GPU timings")
    p.add_argument("--time-limit", type=float, metavar="SECONDS",
                   help="checks not started within this many seconds are listed as not run (not failed)")


def _csv(name: str, text: str, known: Sequence[str]) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    for t in items:
        if t not in known:
            raise UsageError(f"{name}: unknown name {t!r}; expected names from {', '.join(known)}")
    if not items:
        raise UsageError(f"{name}: give at least one name from {', '.join(known)}")
    return items


def run(args: argparse.Namespace) -> int:
    """Run ``verify`` for parsed arguments; returns the exit status (raises UsageError for bad ones)."""
    ops = _csv("--ops", args.ops, OPS)
    dtypes = _csv("--dtypes", args.dtypes, DTYPES)
    import torch

    if args.device in (None, "auto"):
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(args.device)
        except RuntimeError as exc:
            raise UsageError(f"--device {args.device!r}: {exc}") from None
        if device.type not in ("cuda", "cpu"):
            raise UsageError(f"--device must be cuda or cpu, got {args.device!r}")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device is available here (use --device cpu)")
    if device.type == "cpu":  # Triton kernels can only run in the interpreter; set before they are loaded
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from .ops import registry

    known = sorted({b for op in OPS for b in registry.status(op)})
    backends = _csv("--backends", args.backends, known) if args.backends else None
    if args.json:
        parent = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(parent):
            raise UsageError(f"--json {args.json!r}: directory {parent!r} does not exist")
    if args.time_limit is not None and not (0 < args.time_limit < float("inf")):
        raise UsageError(f"--time-limit must be a number of seconds > 0, got {args.time_limit}")
    t0 = time.perf_counter()
    deadline = None if args.time_limit is None else t0 + args.time_limit
    autotune = os.environ.get("DIFFUSION_FAST_AUTOTUNE")
    os.environ["DIFFUSION_FAST_AUTOTUNE"] = "0"  # default configurations: no tuning time in a short run
    try:
        checks = run_checks(device, ops=ops, backends=backends, dtypes=dtypes,
                            timing=False if args.no_timing else None, deadline=deadline)
    finally:
        if autotune is None:
            os.environ.pop("DIFFUSION_FAST_AUTOTUNE", None)
        else:
            os.environ["DIFFUSION_FAST_AUTOTUNE"] = autotune
    seconds = time.perf_counter() - t0
    table = format_table(checks)
    if args.json:
        from .bench.results import environment, write_atomic

        doc = {"schema": "diffusion-fast-verify/1", "seconds": round(seconds, 2), "env": environment(device),
               "checks": [asdict(c) for c in checks]}
        write_atomic(args.json, (json.dumps(doc, indent=1) + "\n").encode())
    print(table)
    print(f"{device.type}: {seconds:.1f} s" + (f"; checks written to {args.json}" if args.json else ""))
    failed = any(c.status in ("FAIL", "error") for c in checks)
    return 1 if failed or not any(c.status in ("pass",) for c in checks) else 0


def command(args: argparse.Namespace) -> int:
    """The ``diffusion-fast verify`` subcommand: :func:`run`, bad arguments as one line and exit 2."""
    try:
        return run(args)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m diffusion_fast.verify`` (the same as ``diffusion-fast verify``)."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:
        return 0 if exc.code in (0, None) else 2
    return command(args)


if __name__ == "__main__":
    sys.exit(main())
