"""``diffusion-fast``: generate images, list samplers, show what runs here, benchmark.

    diffusion-fast generate "a handwritten seven" --seed 7 -o seven.png [--strip strip.png]
    diffusion-fast explain "a handwritten seven" -o explain.html [--gif steps.gif]
    diffusion-fast batch prompts.txt --out-dir out [--images-per-prompt K]   (torchrun -m diffusion_fast batch ...)
    diffusion-fast samplers
    diffusion-fast info
    diffusion-fast bench ...          (see ``diffusion-fast bench --help``)

Exit status: 0 success; 2 bad input (unknown sampler, steps out of range, an unknown word in the prompt, an
unwritable output path, an unusable backend, a damaged model folder, a result that is not finite), with one
line ``diffusion-fast: error: ...`` saying why; 1 the run failed otherwise (out of memory, a write that failed
after the checks passed), also one line; 130 interrupted (Ctrl-C), one line, no traceback.

Each input is checked once, by the part that owns it: the command line parses text (an integer, a number);
the pipeline checks its arguments and the model folder; ``sample`` checks the sampler and guidance scale; the
ops' registry checks the backend. This module reports their errors. Output files are never left partial and
an existing file is only ever replaced by a complete new one (:mod:`diffusion_fast._io`); every output path is
checked before sampling.

Startup is kept short: torch is imported only by the subcommands that need it; Triton and scikit-learn are
never imported by ``generate``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import NoReturn, Optional

from . import verify

PROG = "diffusion-fast"
OPS = ("group_norm", "attention", "sampler_step")


class UsageError(Exception):
    """A bad argument: printed as one line, exit status 2."""


class RunError(Exception):
    """The run failed for a reason other than its arguments (a write failed, out of memory): one line, exit 1."""


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


def _int(text: str) -> int:
    """An argparse type: any integer (its range is checked by the API that takes it)."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def _number(text: str) -> float:
    """An argparse type: any number (its range is checked by the API that takes it)."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None


_guidance = _number


def _schedule_names() -> tuple[str, ...]:
    from .pipeline import SCHEDULES

    return tuple(SCHEDULES)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="A fast diffusion sampler engine.")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    g = sub.add_parser("generate", help="turn a prompt into an image",
                       description="Generate an image from a prompt with the embedded digits model (or --model). "
                       "Limits: 1..1000 steps; seeds 0..2**64-1; the picture (-o) has at most 89,478,485 pixels "
                       "(PIL's decompression-bomb threshold), which bounds --num-images x --scale; images are "
                       "sampled 256 at a time; a count whose results would not fit in memory is refused. Outputs "
                       "are checked before sampling and written whole (a temporary file, then a rename).")
    g.add_argument("prompt", help='e.g. "a handwritten seven", "7", "the digit 7"')
    g.add_argument("--seed", type=_int, default=None, help="noise seed, 0..2**64-1 (default: random, printed)")
    g.add_argument("--steps", type=_int, default=None, help="sampler steps, 1..1000 (default: the model's, 20)")
    g.add_argument("--sampler", default=None, help="sampler name (see `diffusion-fast samplers`; default dpmpp_2m)")
    g.add_argument("--schedule", default=None,
                   help="noise schedule (see `diffusion-fast samplers`; default the model's, karras)")
    g.add_argument("--guidance", type=_number, default=None,
                   help="classifier-free guidance scale, a finite number >= 0 (default: the model's)")
    g.add_argument("--num-images", type=_int, default=1, help="images; more than one writes a grid")
    g.add_argument("--negative", default=None, help="negative prompt (replaces the empty prompt in guidance)")
    g.add_argument("-o", "--output", default="out.png", help="output image (default out.png)")
    g.add_argument("--strip", default=None, help="also write the image developing step by step")
    g.add_argument("--backend", default="auto", help="ops backend: auto, torch, triton or cuda (default auto)")
    g.add_argument("--model", default="digits", help="built-in model name or a model folder (default digits)")
    g.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    g.add_argument("--scale", type=_int, default=None,
                   help="nearest-neighbour upscaling (default 32 for one image, 16 for a grid)")
    g.add_argument("--threads", type=_positive_int, default=1,
                   help="CPU threads for torch (default 1: the digits model is too small to gain from more; the "
                   "same seed and thread count give the same image)")

    e = sub.add_parser("explain", help="one HTML page that shows how diffusion works, from real runs",
                       description="Write one self-contained HTML page (inline images, no script, no network) that "
                       "shows the embedded digits model at work: noise to image step by step, guidance, steps, "
                       "seeds and every sampler, all made by this call.")
    e.add_argument("prompt", help='e.g. "a handwritten seven"')
    e.add_argument("-o", "--output", default="explain.html", help="the page (default explain.html)")
    e.add_argument("--seed", type=_nonneg_int, default=0, help="the seed of every picture (default 0)")
    e.add_argument("--sampler", default=None, help="sampler of sections 1-4 (default: the model's, dpmpp_2m)")
    e.add_argument("--gif", default=None, help="also write the step-by-step animation as a GIF")
    e.add_argument("--threads", type=_positive_int, default=1, help="CPU threads for torch (default 1)")
    e.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: when stderr is a terminal)")

    b = sub.add_parser("batch", help="a prompts file -> a folder of images (torchrun -m diffusion_fast for more "
                       "processes)", description="Generate every image a PROMPTS file asks for into --out-dir, "
                       "resuming earlier runs; under torchrun the ranks share the work (see diffusion_fast.batch).")
    b.add_argument("prompts", metavar="PROMPTS", help="text file (one prompt a line) or .jsonl (one object a line: "
                   "prompt, negative, seed, steps, sampler, guidance; each optional, overriding the options)")
    b.add_argument("--out-dir", required=True, metavar="DIR",
                   help="output folder: {line:06d}-{image}.png and manifest.jsonl")
    b.add_argument("--seed", type=_nonneg_int, default=0, metavar="S",
                   help="image k of line j uses seed S + j*K + k (K images per prompt) unless the line names one")
    b.add_argument("--steps", type=_positive_int, default=None, metavar="N",
                   help="sampler steps (default: the model's)")
    b.add_argument("--sampler", default=None, metavar="NAME", help="sampler name (see `diffusion-fast samplers`)")
    b.add_argument("--guidance", type=_guidance, default=None, metavar="G",
                   help="guidance scale (default: the model's)")
    b.add_argument("--negative", default=None, metavar="TEXT", help="negative prompt for lines that set none")
    b.add_argument("--images-per-prompt", type=_positive_int, default=1, metavar="K",
                   help="images per line, K (default 1)")
    b.add_argument("--batch-size", type=_positive_int, default=16, metavar="B",
                   help="images per network call (default 16)")
    b.add_argument("--model", default="digits", metavar="PATH",
                   help="built-in model name or a model folder (default digits)")
    b.add_argument("--backend", default="auto", choices=("auto", "torch", "triton", "cuda"),
                   help="ops backend (default auto)")
    b.add_argument("--device", default="auto",
                   help="auto (cuda:LOCAL_RANK if CUDA is available, else cpu), cpu or cuda[:N]")
    b.add_argument("--threads", type=_positive_int, default=1, metavar="T",
                   help="CPU threads per process (default 1)")
    b.add_argument("--skip-bad", action="store_true", help="report bad PROMPTS lines and make the others")
    b.add_argument("--no-batch-invariant", dest="batch_invariant", action="store_false",
                   help="plain batched network calls: faster, but an image's last bits may depend on its batch")

    sub.add_parser("samplers", help="list the samplers and schedules",
                   description="List the samplers, one line each (order, evaluations per step, whether it draws "
                               "noise), then the schedules.")
    sub.add_parser("info", help="versions and which backends run here",
                   description="Versions, and for each op which backends are usable here (and why not).")
    sub.add_parser("bench", help="benchmarks (diffusion-fast bench --help)", add_help=False)
    verify.add_arguments(sub.add_parser("verify", help="check every kernel usable here against the float64 oracle"))
    return p


def _check_writable(option: str, path: str, size: tuple[int, int] = (1, 1), mode: str = "L") -> str:
    """Fail before any work when ``path`` cannot take an image of ``size`` and ``mode`` (see
    :func:`diffusion_fast._io.check_image_path`: nothing is opened or touched). Returns the real path."""
    from . import _io

    try:
        return _io.check_image_path(path, size, mode)
    except ValueError as exc:
        raise UsageError(f"{option} {path!r}: {exc}") from None


def _check_file(option: str, path: str, extensions: Sequence[str]) -> str:
    """Fail before any work when ``path`` does not end in one of ``extensions`` or cannot be replaced by a new
    file (see :func:`diffusion_fast._io.check_output_path`). Returns the real path."""
    import os

    from . import _io

    ext = os.path.splitext(path)[1].lower()
    if ext not in extensions:
        raise UsageError(f"{option} {path!r}: unknown file type {ext or '(no extension)'!r}; use "
                         f"{' or '.join(extensions)}")
    try:
        return _io.check_output_path(path)
    except ValueError as exc:
        raise UsageError(f"{option} {path!r}: {exc}") from None


def _write_images(outputs: Sequence[tuple[str, str, object]]) -> None:
    """Write ``(option, path, picture)`` images all or nothing (encoded in memory, temporary files, renames)."""
    from . import _io

    files = {}
    for option, path, picture in outputs:
        try:
            files[path] = _io.encode_image(picture, path)
        except (OSError, KeyError, ValueError) as exc:
            raise UsageError(f"{option} {path!r}: cannot encode the image: {exc}") from None
    try:
        _io.write_files(files)
    except OSError as exc:
        raise RunError(f"writing {', '.join(repr(p) for p in files)} failed, nothing was replaced: "
                       f"{exc.strerror or exc}") from None


def _save(option: str, picture, path: str) -> None:
    """Write one picture to ``path``, whole or not at all."""
    _write_images([(option, path, picture)])


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(args.threads)  # on CPU the image depends on it: fixed here, not by the environment
    try:
        return _generate(args)
    finally:
        torch.set_num_threads(previous)


def _generate(args: argparse.Namespace) -> int:
    import torch

    from .ops import BackendUnavailable
    from .pipeline import Pipeline, check_picture_size, grid, grid_size

    try:
        pipe = Pipeline.from_pretrained(args.model, device=args.device, backend=args.backend)
        st = pipe.settings(args.prompt, negative_prompt=args.negative, steps=args.steps,
                           guidance_scale=args.guidance, seed=args.seed, sampler=args.sampler, schedule=args.schedule,
                           num_images=args.num_images, return_trajectory=args.strip is not None)
    except FileNotFoundError as exc:
        raise UsageError(f"--model {args.model!r}: {exc}") from None
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc)) from None
    k = st.count
    scale = args.scale if args.scale is not None else 32 if k == 1 else 16
    columns, gap = min(k, 8), 0 if k == 1 else max(1, scale // 4)
    cell = (pipe.unet.config.sample_size,) * 2
    mode = "L" if pipe.unet.config.in_channels == 1 else "RGB"
    outputs = [("-o", args.output)] + ([("--strip", args.strip)] if args.strip is not None else [])
    try:
        sizes = {"-o": grid_size(k, cell, scale, columns, gap)}
        check_picture_size(sizes["-o"], f"-o: {k} image{'s' if k > 1 else ''} at --scale {scale}")
        if args.strip is not None:
            sizes["--strip"] = pipe.strip_size(st.steps)
            check_picture_size(sizes["--strip"], "--strip")
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc)) from None
    for option, path in outputs:
        _check_writable(option, path, sizes[option], mode if option == "-o" else "L")
    if args.strip is not None:
        from ._io import same_file

        if same_file(args.output, args.strip):
            raise UsageError(f"-o {args.output!r} and --strip {args.strip!r} name the same file")

    t0 = time.perf_counter()
    try:
        out = pipe(args.prompt, negative_prompt=args.negative, steps=st.steps, guidance_scale=st.guidance_scale,
                   seed=st.seed, sampler=st.sampler, schedule=st.schedule, num_images=st.num_images,
                   progress=sys.stderr.isatty(),
                   return_trajectory=args.strip is not None)
    except BackendUnavailable as exc:
        raise UsageError(f"--backend {args.backend}: {exc}") from None
    except (ValueError, TypeError, FloatingPointError) as exc:
        raise UsageError(str(exc)) from None
    except torch.cuda.OutOfMemoryError:
        raise RunError(f"out of memory on {pipe.device}; ask for fewer images") from None
    seconds = time.perf_counter() - t0
    pictures = [("-o", args.output, grid(out.images, scale=scale, columns=columns, gap=gap))]
    if args.strip is not None:
        pictures.append(("--strip", args.strip, pipe.strip(out.trajectory)))
    _write_images(pictures)
    print(f"wrote {args.output}: {k} image{'s' if k > 1 else ''}, seed {out.seed}, {st.steps} steps "
          f"{st.sampler} {st.schedule}, guidance {st.guidance_scale:g}, {seconds:.2f} s")
    if args.strip is not None:
        print(f"wrote {args.strip}: top row the noisy state, bottom row each step's denoised estimate")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from . import _io

    outputs = [("-o", args.output, (".html", ".htm"))] + ([("--gif", args.gif, (".gif",))] if args.gif else [])
    real = [_check_file(option, path, ext) for option, path, ext in outputs]
    if len(real) == 2 and real[0] == real[1]:
        raise UsageError(f"-o and --gif name the same file {args.output!r}; give them different names")

    import torch

    from .explain import Explainer, command_line

    try:  # checks the prompt's words, the sampler and the seed before any work
        explainer = Explainer(args.prompt, seed=args.seed, sampler=args.sampler)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    command = command_line(args.prompt, seed=args.seed, sampler=explainer.sampler, output=args.output,
                           gif=args.gif, threads=args.threads)
    previous = torch.get_num_threads()
    torch.set_num_threads(args.threads)  # the pictures depend on it: fixed here, not by the environment
    try:
        page = explainer.run(progress=args.progress, command=command)
    finally:
        torch.set_num_threads(previous)
    files = {args.output: page.html.encode("utf-8")}
    if args.gif:
        files[args.gif] = page.gif
    try:  # all or nothing: temporary files renamed over their targets only when both were written
        _io.write_files(files)
    except OSError as exc:
        raise RunError(f"cannot write {' and '.join(files)}: {exc}") from None
    print(f"wrote {args.output}: {page.pictures} pictures from {page.runs} runs of the model in "
          f"{page.seconds:.1f} s")
    if args.gif is not None:
        print(f"wrote {args.gif}: the picture developing step by step")
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    from .batch import BatchError, run_command

    try:
        return run_command(args)
    except BatchError as exc:  # one line per problem; other ranks than 0 stay quiet
        if not exc.lines:
            return 2
        for line in exc.lines[:-1]:
            print(f"{PROG}: error: {line}", file=sys.stderr)
        raise UsageError(exc.lines[-1]) from None


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
    """Entry point of ``diffusion-fast``; returns the exit status (0, 1, 2 or 130: see the module docstring)."""
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        if argv and argv[0] == "bench":  # everything after "bench" belongs to the benchmark CLI
            return cmd_bench(argv[1:])
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # argparse already printed its one line (or the help)
            return 0 if exc.code in (0, None) else 2
        commands = {"generate": cmd_generate, "explain": cmd_explain, "batch": cmd_batch, "samplers": cmd_samplers,
                    "info": cmd_info, "verify": verify.command}
        return commands[args.cmd](args)
    except UsageError as exc:
        return _fail(str(exc), 2)
    except RunError as exc:
        return _fail(str(exc), 1)
    except MemoryError:
        return _fail("out of memory; ask for fewer images or a smaller --scale", 1)
    except KeyboardInterrupt:
        return _fail("interrupted", 130, prefix=f"{PROG}: ")


def _fail(message: str, status: int, prefix: str = f"{PROG}: error: ") -> int:
    """Print one line to stderr (newlines in an error's text folded into it) and return ``status``."""
    print(prefix + " ".join(message.splitlines()), file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
