"""``diffusion-fast``: generate images, list samplers, show what runs here, benchmark.

    diffusion-fast generate "a handwritten seven" --seed 7 -o seven.png [--strip strip.png]
    diffusion-fast samplers
    diffusion-fast info
    diffusion-fast bench ...          (see ``diffusion-fast bench --help``)

Exit status: 0 success; 2 bad arguments (unknown sampler, steps < 1, an unknown word in the prompt, an
unwritable output path, an unusable backend), with one line saying why.

Startup is kept short: torch is imported only by the subcommands that need it; Triton and scikit-learn are
never imported by ``generate``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import NoReturn, Optional

PROG = "diffusion-fast"
OPS = ("group_norm", "attention", "sampler_step")


class UsageError(Exception):
    """A bad argument: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line instead of usage + message
        self.exit(2, f"{self.prog}: error: {message}\n")


def _int_at_least(lo: int):
    """An argparse type: an integer >= lo."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
        return v

    return parse


_positive_int = _int_at_least(1)
_nonneg_int = _int_at_least(0)


def _guidance(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return v


def _sampler_names() -> tuple[str, ...]:
    from .samplers.tables import SAMPLERS

    return tuple(SAMPLERS)


def _schedule_names() -> tuple[str, ...]:
    from .pipeline import SCHEDULES

    return tuple(SCHEDULES)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="A fast diffusion sampler engine.")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    g = sub.add_parser("generate", help="turn a prompt into an image",
                       description="Generate an image from a prompt with the embedded digits model (or --model).")
    g.add_argument("prompt", help='e.g. "a handwritten seven", "7", "the digit 7"')
    g.add_argument("--seed", type=_nonneg_int, default=None, help="noise seed (default: random, printed)")
    g.add_argument("--steps", type=_positive_int, default=None, help="sampler steps (default: the model's, 20)")
    g.add_argument("--sampler", default=None, help="sampler name (see `diffusion-fast samplers`; default dpmpp_2m)")
    g.add_argument("--schedule", default=None,
                   help="noise schedule (see `diffusion-fast samplers`; default the model's, karras)")
    g.add_argument("--guidance", type=_guidance, default=None,
                   help="classifier-free guidance scale (default: the model's)")
    g.add_argument("--num-images", type=_positive_int, default=1, help="images; more than one writes a grid")
    g.add_argument("--negative", default=None, help="negative prompt (replaces the empty prompt in guidance)")
    g.add_argument("-o", "--output", default="out.png", help="output image (default out.png)")
    g.add_argument("--strip", default=None, help="also write the image developing step by step")
    g.add_argument("--backend", default="auto", choices=("auto", "torch", "triton", "cuda"),
                   help="ops backend (default auto)")
    g.add_argument("--model", default="digits", help="built-in model name or a model folder (default digits)")
    g.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    g.add_argument("--scale", type=_positive_int, default=None,
                   help="nearest-neighbour upscaling (default 32 for one image, 16 for a grid)")
    g.add_argument("--threads", type=_positive_int, default=1,
                   help="CPU threads for torch (default 1: the digits model is too small to gain from more)")

    sub.add_parser("samplers", help="list the samplers and schedules",
                   description="List the samplers, one line each (order, evaluations per step, whether it draws "
                               "noise), then the schedules.")
    sub.add_parser("info", help="versions and which backends run here",
                   description="Versions, and for each op which backends are usable here (and why not).")
    sub.add_parser("bench", help="benchmarks (diffusion-fast bench --help)", add_help=False)
    return p


def _check_writable(option: str, path: str) -> None:
    """Fail before any work when ``path`` cannot be written (opened for append, then left as it was)."""
    from PIL import Image

    ext = os.path.splitext(path)[1].lower()
    Image.init()
    if ext not in Image.EXTENSION:
        raise UsageError(f"{option} {path!r}: unknown image type {ext or '(no extension)'!r}; use .png")
    if os.path.isdir(path):
        raise UsageError(f"{option} {path!r} is a directory")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"{option} {path!r}: directory {parent!r} does not exist")
    existed = os.path.exists(path)
    try:
        with open(path, "ab"):
            pass
    except OSError as exc:
        raise UsageError(f"{option} {path!r} is not writable: {exc.strerror}") from None
    if not existed:
        os.unlink(path)


def _save(option: str, picture, path: str) -> None:
    try:
        picture.save(path)
    except OSError as exc:
        raise UsageError(f"{option} {path!r}: cannot write: {exc}") from None


def _check_backend(backend: str) -> None:
    if backend == "auto":
        return
    from .ops import registry

    for op in OPS:
        reason = registry.status(op).get(backend)
        if reason is not None:
            raise UsageError(f"--backend {backend}: not usable here for {op}: {reason}")


def cmd_generate(args: argparse.Namespace) -> int:
    sampler = args.sampler
    if sampler is not None and sampler not in _sampler_names():
        raise UsageError(f"argument --sampler: unknown sampler {sampler!r}; choose from "
                         f"{', '.join(_sampler_names())}")
    if args.schedule is not None and args.schedule not in _schedule_names():
        raise UsageError(f"argument --schedule: unknown schedule {args.schedule!r}; choose from "
                         f"{', '.join(_schedule_names())}")
    for option, path in (("-o", args.output), ("--strip", args.strip)):
        if path is not None:
            _check_writable(option, path)

    import torch

    from .ops import BackendUnavailable
    from .pipeline import Pipeline, grid

    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        raise UsageError(f"--device {args.device!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here")
    _check_backend(args.backend)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    try:
        pipe = Pipeline.from_pretrained(args.model, device=device, backend=args.backend)
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(f"--model {args.model!r}: {exc}") from None
    try:  # prompt words are checked before any work, so a typo costs nothing
        pipe.tokenizer.encode(args.prompt)
        if args.negative is not None:
            pipe.tokenizer.encode(args.negative)
    except ValueError as exc:
        raise UsageError(str(exc)) from None

    t0 = time.perf_counter()
    try:
        out = pipe(args.prompt, negative_prompt=args.negative, steps=args.steps, guidance_scale=args.guidance,
                   seed=args.seed, sampler=sampler, schedule=args.schedule, num_images=args.num_images,
                   progress=sys.stderr.isatty(),
                   return_trajectory=args.strip is not None)
    except BackendUnavailable as exc:
        raise UsageError(f"--backend {args.backend}: {exc}") from None
    seconds = time.perf_counter() - t0
    k = len(out.images)
    scale = args.scale or (32 if k == 1 else 16)
    picture = grid(out.images, scale=scale, columns=min(k, 8), gap=0 if k == 1 else max(1, scale // 4))
    _save("-o", picture, args.output)
    steps = args.steps or pipe.defaults.get("steps", 20)
    g = args.guidance if args.guidance is not None else pipe.defaults.get("guidance_scale", 1.0)
    print(f"wrote {args.output}: {k} image{'s' if k > 1 else ''}, seed {out.seed}, {steps} steps "
          f"{sampler or pipe.defaults.get('sampler', 'dpmpp_2m')} "
          f"{args.schedule or pipe.defaults.get('schedule', 'karras')}, guidance {g:g}, {seconds:.2f} s")
    if args.strip is not None:
        _save("--strip", pipe.strip(out.trajectory), args.strip)
        print(f"wrote {args.strip}: top row the noisy state, bottom row each step's denoised estimate")
    return 0


def cmd_samplers(args: argparse.Namespace) -> int:
    from .samplers.tables import SAMPLERS, describe

    info = {s: describe(s) for s in SAMPLERS}

    def noise(d):
        s = d["stochastic"]
        return "deterministic" if s == "no" else "stochastic" if s == "yes" else f"stochastic {s}"

    w = max(len(s) for s in SAMPLERS)
    we = max(len(str(d["evaluations"])) for d in info.values())
    wn = max(len(noise(d)) for d in info.values())
    for s, d in info.items():
        order = "-" if d["order"] is None else d["order"]
        print(f"{s:<{w}}  order {order}  evals/step {d['evaluations']:<{we}}  {noise(d):<{wn}}  {d['description']}")
    print()
    print("order: global order of accuracy as measured on Gaussian data (multistep methods start first-order; "
          "none for lcm, which needs a consistency model, or dpm_adaptive, set by rtol / atol); evals/step: network "
          "evaluations per step of the schedule.")
    print("Every sampler is a coefficient table run by one fused step without host syncs, except dpm_adaptive, "
          "whose step sizes come from an error estimate read once per attempted step (eager only).")
    print(f"schedules (generate --schedule): {', '.join(_schedule_names())}")
    return 0


def _version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def cmd_info(args: argparse.Namespace) -> int:
    import platform

    import torch

    from . import __version__
    from .ops import registry

    print(f"diffusion_fast {__version__}")
    print(f"python         {platform.python_version()} ({sys.platform})")
    print(f"torch          {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    for dist in ("triton", "numpy", "safetensors", "pillow"):
        print(f"{dist:<14} {_version(dist)}")
    if torch.cuda.is_available():
        i = torch.cuda.current_device()
        cap = torch.cuda.get_device_capability(i)
        print(f"device         {torch.cuda.get_device_name(i)} (sm_{cap[0]}{cap[1]})")
    else:
        print("device         cpu only (no CUDA device)")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print("\nbackends (usable here, or why not):")
    for op in OPS:
        for name, reason in registry.status(op).items():
            print(f"  {op:<13} {name:<7} {'usable' if reason is None else reason}")
        for dev in devices:
            order = [b for b in registry.auto_order(op, dev) if b != "torch"]
            tries = f"tries {', '.join(order)}, then torch" if order else "torch"
            print(f"  {op:<13} auto on {dev}: {tries}")
    return 0


def cmd_bench(argv: Sequence[str]) -> int:
    try:
        from .bench.cli import main as bench_main
    except ImportError as exc:
        print(f"{PROG} bench: the benchmark module is not available: {exc}", file=sys.stderr)
        return 2
    return int(bench_main(list(argv)) or 0)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``diffusion-fast``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":  # everything after "bench" belongs to the benchmark CLI
        return cmd_bench(argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed its one line (or the help)
        return 0 if exc.code in (0, None) else 2
    commands = {"generate": cmd_generate, "samplers": cmd_samplers, "info": cmd_info}
    try:
        return commands[args.cmd](args)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
