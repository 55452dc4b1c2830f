"""Batch generation: a list of prompts (or a PROMPTS file) -> a folder of PNGs, sharded over processes.

    from diffusion_fast import Pipeline
    from diffusion_fast.batch import generate
    summary = generate(Pipeline.from_pretrained("digits"), ["3", "a handwritten seven"], "out", images_per_prompt=4)

    diffusion-fast batch prompts.txt --out-dir out                                  # one process
    torchrun --standalone --nproc-per-node 2 -m diffusion_fast batch prompts.txt --out-dir out   # 2 processes

What an item is. Line ``j`` of PROMPTS (0-based; a text line is a prompt, a JSONL line an object with the optional
fields :data:`FIELDS`) makes ``K = images_per_prompt`` items ``(j, k)``. Item ``(j, k)`` is written to
``{j:06d}-{k}.png`` and drawn from seed ``S + j*K + k`` (``S`` = ``seed``), or ``s + k`` when the line names
seed ``s``. A line's fields override the call's, which override the pipeline's defaults.

Deterministic. An item's PNG bytes depend only on the item and the model, device, backend and thread count —
not on the world size, the batch size, the order of work or a resumption:

* every item draws its starting and sampler noise from its own generator (``sample(generator=[...])``);
* batched network calls would still couple the items: CPU GEMM and convolution kernels pick their blocking from
  the whole batch (measured: the digits UNet's ``Linear`` and ``Conv2d`` outputs change in the last bits between
  batch 1, 2-7 and 12), so :func:`batch_invariant` runs every ``F.linear`` and ``F.conv2d`` through
  ``aten::_slow_conv2d_forward``, which computes each sample with its own GEMM whose shape depends only on that
  sample. The other ops of a diffusion model (norms, softmax, attention's batched matmuls, elementwise math)
  compute each sample separately already; ``tests/test_batch.py`` checks whole runs byte for byte. The price on
  CPU: 0.55-0.8x the plain batched speed, still about 3x faster than one item per call.
  ``batch_invariant=False`` (``--no-batch-invariant``) skips it, for speed where cuDNN matters; an image's last
  bits may then depend on the batch it was made in.

Sharded. Under ``torchrun`` (``WORLD_SIZE`` > 1) every rank takes the items ``todo[rank::world]`` of the list of
items still to make, in index order: a static round-robin, so neighbouring items (which share settings and so
batch together) spread evenly, and a resumed job rebalances what is left over the ranks it now has. Rank 0 reads
the folder's state and broadcasts the work list; process groups are ``gloo`` on CPU and ``cpu:gloo,cuda:nccl``
on GPU (only small Python objects cross processes, through gloo). The out dir must be one folder all ranks see
(a shared filesystem across nodes); this is checked before any work.

Resumable and safe. Each image is written to ``.{file}.{run}.r{rank}.tmp`` in the out dir and renamed; then its
manifest line (index, image, prompt, negative, seed, sampler, steps, guidance, file, sha256, rank, seconds) is
appended with one write to the rank's own part file ``.batch/part-{run}-r{rank}.jsonl`` (one writer per file:
appends from several nodes to one file are not atomic on NFS), fsynced after each batch. At the end rank 0
merges the parts into ``manifest.jsonl`` (sorted, written by rename). A rerun skips the items whose file holds
the bytes their manifest line (merged, or in a part left by a killed run) records, so a killed job resumes where
it stopped; a torn last line is ignored, stale temporary files are removed, and an item whose settings differ
from the ones its existing file was made with is an error, not an overwrite.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import secrets
import socket
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

FIELDS = ("prompt", "negative", "seed", "steps", "sampler", "guidance")
MANIFEST = "manifest.jsonl"
STATE_DIR = ".batch"
MAX_SEED = 2**63 - 1
EXIT_HOOK_ENV = "DIFFUSION_FAST_BATCH_EXIT_AFTER"  # tests of resumption: "K[:temp|file|line][@RANK]"
_SETTINGS = ("prompt", "negative", "seed", "sampler", "steps", "guidance")


class BatchError(ValueError):
    """A user error found before any work: bad PROMPTS lines, an unusable out dir, conflicting earlier output.

    ``lines`` holds one message per problem (``str()`` joins them)."""

    def __init__(self, lines: Union[str, Sequence[str]]) -> None:
        self.lines = [lines] if isinstance(lines, str) else list(lines)
        super().__init__("\n".join(self.lines))


# ---------------------------------------------------------------------------------------------------------------
# Batch-invariant network calls
# ---------------------------------------------------------------------------------------------------------------

_slow_conv2d = torch.ops.aten._slow_conv2d_forward


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else tuple(int(u) for u in v)


def _conv2d_rows(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    if input.dim() != 4 or isinstance(padding, str) or groups != 1 or _pair(dilation) != (1, 1):
        # Shapes the per-sample kernel does not take: one plain call per sample (same shapes whatever the batch).
        if input.dim() != 4:
            return F.conv2d(input, weight, bias, stride, padding, dilation, groups)
        return torch.cat([F.conv2d(input[i:i + 1], weight, bias, stride, padding, dilation, groups)
                          for i in range(input.shape[0])])
    return _slow_conv2d(input, weight, tuple(weight.shape[2:]), bias, _pair(stride), _pair(padding))


def _linear_rows(input, weight, bias=None):
    if input.dim() < 2:
        return F.linear(input, weight, bias)
    # [N, *, C] -> [N, C, L, 1]: a 1x1 convolution, one GEMM per sample n over its L rows.
    n, lead, c = input.shape[0], input.shape[1:-1], input.shape[-1]
    x = input.reshape(n, -1, c).transpose(1, 2).unsqueeze(-1)
    y = _slow_conv2d(x, weight[:, :, None, None], (1, 1), bias, (1, 1), (0, 0))
    return y.squeeze(-1).transpose(1, 2).reshape(n, *lead, weight.shape[0])


class _BatchInvariant(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            return _linear_rows(*args, **kwargs)
        if func is F.conv2d:
            return _conv2d_rows(*args, **kwargs)
        return func(*args, **kwargs)


def batch_invariant() -> contextlib.AbstractContextManager:
    """A context in which ``F.linear`` and ``F.conv2d`` compute each sample of a batch with its own GEMM.

    Inside it, sample ``n`` of a batched call gives the same bits as the same sample alone: the GEMM's shape no
    longer depends on the batch size (``aten::_slow_conv2d_forward`` runs one im2col + GEMM per sample, and a
    linear layer ``[N, *, C]`` runs as a 1x1 convolution of ``[N, C, prod(*), 1]``). Results equal the plain
    kernels' to float32 rounding, not bit for bit. Works for any ``nn.Module`` (ours or diffusers')::

        with batch_invariant():
            images = pipe(prompts, generator=[torch.Generator().manual_seed(s) for s in seeds])
    """
    return _BatchInvariant()


# ---------------------------------------------------------------------------------------------------------------
# Items: reading PROMPTS, resolving fields, checking
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One prompt line before resolution: where it came from and its fields (or why it could not be read)."""

    index: int  # 0-based line (or list position); names the files
    where: str  # "prompts.txt:3" or "items[2]"
    fields: Optional[dict[str, Any]] = None
    error: Optional[str] = None


@dataclass(frozen=True)
class BadLine:
    """A PROMPTS line that was refused, and why."""

    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass(frozen=True)
class Item:
    """One image to make: line ``index``, image ``image`` of that line, and its resolved settings."""

    index: int
    image: int
    prompt: str
    negative: Optional[str]
    seed: int
    steps: int
    sampler: str
    guidance: float

    @property
    def file(self) -> str:
        return f"{self.index:06d}-{self.image}.png"

    @property
    def key(self) -> tuple:
        """Items with the same key can share a network call."""
        return (self.steps, self.sampler, self.guidance)

    def settings(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in _SETTINGS}


def read_prompts(path: Union[str, os.PathLike]) -> list[Entry]:
    """Read a PROMPTS file: ``.jsonl`` / ``.ndjson`` -> one JSON object a line, anything else -> one prompt a line.

    Blank lines are skipped (they keep their line numbers). A line that is not valid JSON (or not an object) is an
    :class:`Entry` with ``error`` set; a missing or non-UTF-8 file raises :class:`BatchError`.
    """
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise BatchError(f"PROMPTS {str(path)!r}: cannot read: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BatchError(f"PROMPTS {str(path)!r}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset "
                         f"{exc.start})") from None
    jsonl = p.suffix.lower() in (".jsonl", ".ndjson")
    out = []
    for i, line in enumerate(text.split("\n")):
        line = line.strip()
        if not line:
            continue
        where = f"{p.name}:{i + 1}"
        if not jsonl:
            out.append(Entry(i, where, {"prompt": line}))
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            out.append(Entry(i, where, error=f"bad JSON: {exc.msg} at column {exc.colno}"))
            continue
        if not isinstance(value, dict):
            out.append(Entry(i, where, error=f"must be a JSON object with the fields {', '.join(FIELDS)}; got "
                                             f"{type(value).__name__}"))
            continue
        out.append(Entry(i, where, value))
    return out


def _entries(items) -> list[Entry]:
    if isinstance(items, (str, os.PathLike)):
        return read_prompts(items)
    if isinstance(items, Mapping) or not isinstance(items, Iterable):
        raise TypeError(f"items must be a PROMPTS path or a list of prompts (str) or field dicts, got "
                        f"{type(items).__name__}")
    out = []
    for i, it in enumerate(items):
        if isinstance(it, Entry):
            out.append(it)
        elif isinstance(it, str):
            out.append(Entry(i, f"items[{i}]", {"prompt": it}))
        elif isinstance(it, Mapping):
            out.append(Entry(i, f"items[{i}]", dict(it)))
        else:
            out.append(Entry(i, f"items[{i}]", error=f"must be a str or a dict of {', '.join(FIELDS)}; got "
                                                     f"{type(it).__name__}"))
    indices = [e.index for e in out]
    if len(set(indices)) != len(indices):
        raise ValueError("items: two entries have the same index (file names would collide)")
    return out


def _int_error(name: str, v: object, lo: int, hi: Optional[int] = None) -> Optional[str]:
    if isinstance(v, bool) or not isinstance(v, int):
        return f"{name} must be an integer, got {json.dumps(v)}"
    if v < lo or (hi is not None and v > hi):
        return f"{name} must be in [{lo}, {hi}], got {v}" if hi is not None else f"{name} must be >= {lo}, got {v}"
    return None


def _guidance_error(v: object) -> Optional[str]:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        return f"guidance must be a finite number >= 0, got {v if isinstance(v, float) else json.dumps(v)}"
    return None


def _plan(entries: Sequence[Entry], engine: _Engine, *, seed: int, steps: Optional[int], sampler: Optional[str],
          guidance: Optional[float], negative: Optional[str], images_per_prompt: int
          ) -> tuple[list[Item], list[BadLine]]:
    """Resolve every entry into ``images_per_prompt`` items (line fields > call arguments > pipeline defaults) and
    check what the lines set (types, ranges, sampler names, words the tokenizer knows; the call's arguments are
    checked by :func:`generate`). Returns ``(items, bad lines)``."""
    K = images_per_prompt
    items: list[Item] = []
    bad: list[BadLine] = []
    for e in entries:
        if e.error is not None:
            bad.append(BadLine(e.where, e.error))
            continue
        f = e.fields
        errors = []
        unknown = sorted(set(f) - set(FIELDS))
        if unknown:
            errors.append(f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; the "
                          f"fields are {', '.join(FIELDS)}")
        prompt = f.get("prompt", "")
        if not isinstance(prompt, str):
            errors.append(f"prompt must be a string, got {json.dumps(prompt)}")
        elif engine.check_text(prompt):
            errors.append(engine.check_text(prompt))
        neg = f.get("negative", negative)
        if "negative" in f and neg is not None:
            if not isinstance(neg, str):
                errors.append(f"negative must be a string or null, got {json.dumps(neg)}")
            elif not engine.takes_negative:
                errors.append("negative: this pipeline takes no negative prompt")
            elif engine.check_text(neg):
                errors.append(f"negative: {engine.check_text(neg)}")
        base = f.get("seed", seed + e.index * K)
        if "seed" in f:
            errors.append(_int_error("seed", base, 0, MAX_SEED - (K - 1)))
        elif base + K - 1 > MAX_SEED:
            errors.append(f"seed {seed} + {e.index} * {K} + {K - 1} is over {MAX_SEED}")
        n_steps = f.get("steps", engine.defaults["steps"] if steps is None else steps)
        if "steps" in f:
            errors.append(_int_error("steps", n_steps, 1))
        name = f.get("sampler", sampler)
        if "sampler" in f:
            errors.append(engine.check_sampler(name))
        g = f.get("guidance", engine.defaults["guidance"] if guidance is None else guidance)
        if "guidance" in f:
            errors.append(_guidance_error(g))
        errors = [err for err in errors if err]
        if errors:
            looks_json = len(f) == 1 and isinstance(prompt, str) and prompt.startswith("{") and prompt.endswith("}")
            hint = " (a JSON line in a text file? name the file .jsonl)" if looks_json else ""
            bad.append(BadLine(e.where, "; ".join(errors) + hint))
            continue
        resolved = engine.default_sampler if name is None else name
        for k in range(K):
            items.append(Item(e.index, k, prompt, neg, int(base) + k, int(n_steps), resolved, float(g)))
    return items, bad


# ---------------------------------------------------------------------------------------------------------------
# Engines: what generate() needs from a pipeline
# ---------------------------------------------------------------------------------------------------------------


class _Engine:
    device: torch.device
    defaults: dict[str, Any]
    default_sampler: str
    takes_negative = True

    def check_sampler(self, name: object) -> Optional[str]:
        raise NotImplementedError

    def check_text(self, text: str) -> Optional[str]:
        return None

    def __call__(self, items: Sequence[Item]) -> list:
        raise NotImplementedError


class _Ours(_Engine):
    """diffusion_fast's :class:`~diffusion_fast.pipeline.Pipeline`."""

    def __init__(self, pipe) -> None:
        self.pipe = pipe
        self.device = pipe.device
        self.defaults = {"steps": int(pipe.defaults.get("steps", 20)),
                         "guidance": float(pipe.defaults.get("guidance_scale", 1.0))}
        self.default_sampler = pipe.defaults.get("sampler", "dpmpp_2m")

    def check_sampler(self, name: object) -> Optional[str]:
        from .samplers import SAMPLERS

        if name not in SAMPLERS:
            return f"sampler must be one of {', '.join(SAMPLERS)}; got {json.dumps(name)}"
        return None

    def check_text(self, text: str) -> Optional[str]:
        try:
            self.pipe.tokenizer.encode(text)
        except ValueError as exc:
            return str(exc)
        return None

    def __call__(self, items: Sequence[Item]) -> list:
        first = items[0]
        gens = [torch.Generator(self.device).manual_seed(it.seed) for it in items]
        out = self.pipe([it.prompt for it in items], negative_prompt=[it.negative or "" for it in items],
                        steps=first.steps, guidance_scale=first.guidance, sampler=first.sampler, generator=gens,
                        progress=False)
        return out.images


class _Diffusers(_Engine):
    """A diffusers pipeline that encodes prompts itself (``StableDiffusionPipeline``, SDXL, ... optimized or
    not). It samples with its own scheduler, so items cannot name a sampler."""

    def __init__(self, pipe) -> None:
        import inspect

        self.pipe = pipe
        params = inspect.signature(pipe.__call__).parameters
        for needed in ("prompt", "generator", "num_inference_steps", "guidance_scale"):
            if needed not in params:
                raise TypeError(f"{type(pipe).__name__}.__call__ takes no {needed!r}; generate() needs a text-to-"
                                "image pipeline")
        if getattr(pipe, "text_encoder", None) is None and getattr(pipe, "text_encoder_2", None) is None:
            raise TypeError(f"{type(pipe).__name__} has no text encoder; generate() passes prompts as text")
        self.takes_negative = "negative_prompt" in params
        self.device = pipe.device
        self.defaults = {"steps": params["num_inference_steps"].default,
                         "guidance": params["guidance_scale"].default}
        self.default_sampler = type(pipe.scheduler).__name__

    def check_sampler(self, name: object) -> Optional[str]:
        return (f"sampler: a diffusers pipeline samples with its scheduler ({self.default_sampler}); set "
                f"pipe.scheduler instead of naming {json.dumps(name)}")

    def __call__(self, items: Sequence[Item]) -> list:
        first = items[0]
        kwargs: dict[str, Any] = {}
        if self.takes_negative:
            kwargs["negative_prompt"] = [it.negative or "" for it in items]
        # CPU generators: diffusers draws on the CPU and moves the noise, so it is the same on any device.
        gens = [torch.Generator().manual_seed(it.seed) for it in items]
        saved = getattr(self.pipe, "_progress_bar_config", None)
        self.pipe.set_progress_bar_config(disable=True)
        try:
            out = self.pipe(prompt=[it.prompt for it in items], num_inference_steps=first.steps,
                            guidance_scale=first.guidance, generator=gens, output_type="pil", **kwargs)
        finally:
            if saved is None:
                del self.pipe._progress_bar_config
            else:
                self.pipe._progress_bar_config = saved
        return out.images


def _engine(pipe) -> _Engine:
    from .pipeline import Pipeline

    if isinstance(pipe, Pipeline):
        return _Ours(pipe)
    diffusers = sys.modules.get("diffusers")  # a diffusers pipeline means diffusers is imported
    if diffusers is not None and isinstance(pipe, diffusers.DiffusionPipeline):
        return _Diffusers(pipe)
    raise TypeError(f"pipe must be a diffusion_fast Pipeline or a diffusers pipeline, got {type(pipe).__name__}")


# ---------------------------------------------------------------------------------------------------------------
# The out dir: state, atomic writes, the manifest
# ---------------------------------------------------------------------------------------------------------------


def _read_records(path: Path) -> list[dict]:
    """The complete, parseable lines of a manifest file (a line torn by a kill has no ``\\n`` and is ignored)."""
    try:
        lines = path.read_bytes().split(b"\n")
    except FileNotFoundError:
        return []
    lines.pop()  # after the last "\n": empty, or a torn line
    out = []
    for raw in lines:
        with contextlib.suppress(ValueError):
            rec = json.loads(raw)
            if isinstance(rec, dict) and isinstance(rec.get("file"), str):
                out.append(rec)
    return out


def _manifest_files(out: Path) -> list[Path]:
    parts = sorted((out / STATE_DIR).glob("part-*.jsonl")) if (out / STATE_DIR).is_dir() else []
    return [out / MANIFEST] + parts


def _all_records(out: Path) -> dict[str, dict]:
    records: dict[str, dict] = {}
    for f in _manifest_files(out):
        for rec in _read_records(f):
            records[rec["file"]] = rec  # later files (newer runs) win
    return records


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_new(path: Path, data: bytes, *, sync: bool = True) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> Optional[str]:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _exit_hook() -> Optional[tuple[int, str]]:
    """``DIFFUSION_FAST_BATCH_EXIT_AFTER="K[:STAGE][@RANK]"``: the process dies like a killed one at STAGE of its
    item K (0-based): ``temp`` (temporary file written, not renamed; the default), ``file`` (renamed, no
    manifest line) or ``line`` (manifest line written). For tests of resumption."""
    spec = os.environ.get(EXIT_HOOK_ENV)
    if not spec:
        return None
    spec, _, rank = spec.partition("@")
    if rank and int(rank) != int(os.environ.get("RANK", "0")):
        return None
    k, _, stage = spec.partition(":")
    if stage not in ("", "temp", "file", "line"):
        raise ValueError(f"{EXIT_HOOK_ENV}: stage must be temp, file or line, got {stage!r}")
    return int(k), stage or "temp"


class _Writer:
    """One rank's writes. Per item: the PNG to a temporary file, renamed, then its manifest line appended to the
    rank's own part file with one write; per batch: one fsync of the part file. A kill at any moment leaves
    complete images and whole lines (at most one torn last line); after an OS crash, an image whose bytes do not
    match its line's sha256 is made again, so no fsync per image is needed (it cost ~10 ms an image on a VM disk)."""

    def __init__(self, out: Path, run: str, rank: int) -> None:
        self.out, self.run, self.rank = out, run, rank
        self.part = out / STATE_DIR / f"part-{run}-r{rank}.jsonl"
        self.fd = os.open(self.part, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
        self.count = 0
        self.hook = _exit_hook()

    def _stage(self, stage: str) -> None:
        if self.hook == (self.count, stage):
            os._exit(3)  # like a kill: no cleanup, no finally

    def write(self, items: Sequence[Item], images: Sequence, seconds: float) -> None:
        for it, image in zip(items, images):
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            data = buf.getvalue()
            tmp = self.out / f".{it.file}.{self.run}.r{self.rank}.tmp"
            try:
                _write_new(tmp, data, sync=False)
                self._stage("temp")
                os.replace(tmp, self.out / it.file)
            finally:
                tmp.unlink(missing_ok=True)
            self._stage("file")
            rec = {"index": it.index, "image": it.image, **it.settings(), "file": it.file,
                   "sha256": hashlib.sha256(data).hexdigest(), "rank": self.rank, "seconds": round(seconds, 6)}
            line = (json.dumps(rec, ensure_ascii=False) + "\n").encode()
            n = os.write(self.fd, line)  # one write of a whole line; a kill leaves at most a torn last line
            if n != len(line):
                raise OSError(f"short write to {self.part} ({n} of {len(line)} bytes)")
            self._stage("line")
            self.count += 1
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


def _prepare(out: Path, items: Sequence[Item], run: str) -> tuple[list[int], int]:
    """Rank 0, before any work: read what earlier runs made (refusing other settings before writing anything),
    create the out dir and this run's marker, remove stale temporary files. Returns the positions in ``items``
    still to make and the count already there."""
    if out.exists() and not out.is_dir():
        raise BatchError(f"--out-dir {str(out)!r} is not a directory")
    records = _all_records(out) if out.is_dir() else {}
    todo, conflicts = [], []
    for pos, it in enumerate(items):
        rec = records.get(it.file)
        if rec is None or _sha256(out / it.file) != rec.get("sha256"):  # missing, or not the bytes recorded
            todo.append(pos)
            continue
        was = {k: rec.get(k) for k in _SETTINGS}
        if was != it.settings():
            diff = ", ".join(f"{k} {json.dumps(was[k])} there, {json.dumps(v)} now"
                             for k, v in it.settings().items() if was[k] != v)
            conflicts.append(f"--out-dir {str(out)!r} already holds {it.file} made with other settings ({diff}); "
                             "use another --out-dir or delete it")
    if conflicts:
        more = [f"... and {len(conflicts) - 5} more"] if len(conflicts) > 5 else []
        raise BatchError(conflicts[:5] + more)
    marker = out / STATE_DIR / f"run-{run}.json"
    try:
        (out / STATE_DIR).mkdir(parents=True, exist_ok=True)
        _write_new(marker, json.dumps({"run": run, "host": socket.gethostname(), "pid": os.getpid()}).encode())
    except OSError as exc:
        raise BatchError(f"--out-dir {str(out)!r} is not writable: {exc.strerror or exc}") from None
    for pattern in (".[0-9]*-[0-9]*.png.*.tmp", f".{MANIFEST}.*.tmp"):  # left by killed runs
        for stale in out.glob(pattern):
            stale.unlink(missing_ok=True)
    for stale in (out / STATE_DIR).glob("run-*.json"):
        if stale != marker:
            stale.unlink(missing_ok=True)
    return todo, len(items) - len(todo)


def _finish(out: Path, run: str) -> None:
    """Rank 0, after every rank is done: merge all manifest parts into manifest.jsonl (by rename)."""
    files = _manifest_files(out)
    records = _all_records(out)
    keep = sorted((r for r in records.values() if (out / r["file"]).is_file()),
                  key=lambda r: (r.get("index", 0), r.get("image", 0), r["file"]))
    tmp = out / f".{MANIFEST}.{run}.tmp"
    _write_new(tmp, b"".join((json.dumps(r, ensure_ascii=False) + "\n").encode() for r in keep))
    os.replace(tmp, out / MANIFEST)
    _fsync_dir(out)
    for f in files[1:]:
        f.unlink(missing_ok=True)
    (out / STATE_DIR / f"run-{run}.json").unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        (out / STATE_DIR).rmdir()


# ---------------------------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _World:
    rank: int = 0
    size: int = 1
    started_here: bool = False

    def broadcast(self, obj: Any) -> Any:
        if self.size == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather(self, obj: Any) -> list:
        if self.size == 1:
            return [obj]
        import torch.distributed as dist

        out: list = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.started_here:
            import torch.distributed as dist

            dist.destroy_process_group()


def _world(device: torch.device) -> _World:
    """The process group: the caller's, or one started here from torchrun's environment (``WORLD_SIZE`` > 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return _World(dist.get_rank(), dist.get_world_size())
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return _World()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        backend = "cpu:gloo,cuda:nccl"  # object collectives go through gloo (torch's rule for mixed backends)
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend)
    return _World(dist.get_rank(), dist.get_world_size(), started_here=True)


def local_device() -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is available (torchrun sets ``LOCAL_RANK``), else ``cpu``."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------------------------
# generate()
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RankStats:
    """What one rank made in this call."""

    rank: int
    host: str
    device: str
    images: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Summary:
    """What :func:`generate` did. ``seconds`` is the slowest rank's generation time (setup excluded)."""

    out_dir: str
    planned: int
    generated: int
    already: int
    seconds: float
    ranks: list[RankStats]
    bad: list[BadLine] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.generated / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        """One line: images made, time, images/s overall and per rank."""
        per = ", ".join(f"rank {r.rank} {r.images_per_second:.2f}" for r in self.ranks)
        ranks = f"{len(self.ranks)} ranks: {per}" if len(self.ranks) > 1 else f"{self.ranks[0].device}"
        return (f"wrote {self.generated} image{'s' if self.generated != 1 else ''} to {self.out_dir} in "
                f"{self.seconds:.2f} s: {self.images_per_second:.2f} images/s ({ranks}); "
                f"{self.already} already there" + (f"; {len(self.bad)} bad lines skipped" if self.bad else ""))


def _batches(items: Sequence[Item], size: int) -> Iterator[list[Item]]:
    """Batches of up to ``size`` items with one key, in order of each batch's first item."""
    pending: dict[tuple, list[Item]] = {}
    for it in items:
        group = pending.setdefault(it.key, [])
        group.append(it)
        if len(group) == size:
            yield pending.pop(it.key)
    yield from pending.values()


class _Progress:
    """Rank 0's bar: its own items, plus the other ranks' as their manifest parts grow (new bytes are read after
    each of rank 0's batches)."""

    def __init__(self, enabled: bool, total: int, out: Path, run: str, world: int) -> None:
        self.bar = None
        self.parts = {out / STATE_DIR / f"part-{run}-r{r}.jsonl": [0, 0] for r in range(1, world)}  # offset, lines
        self.mine = 0
        if enabled and total:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="img", desc="batch", file=sys.stderr, dynamic_ncols=True)

    def update(self, n: int) -> None:
        if self.bar is None:
            return
        self.mine += n
        for f, seen in self.parts.items():
            with contextlib.suppress(OSError), open(f, "rb") as fh:
                fh.seek(seen[0])
                new = fh.read()
                seen[0] += len(new)
                seen[1] += new.count(b"\n")
        self.bar.n = min(self.bar.total, self.mine + sum(seen[1] for seen in self.parts.values()))
        self.bar.refresh()

    def close(self, done: int) -> None:
        if self.bar is not None:
            self.bar.n = done
            self.bar.refresh()
            self.bar.close()


def generate(
    pipe,
    items,
    out_dir: Union[str, os.PathLike],
    *,
    seed: int = 0,
    steps: Optional[int] = None,
    sampler: Optional[str] = None,
    guidance: Optional[float] = None,
    negative: Optional[str] = None,
    images_per_prompt: int = 1,
    batch_size: int = 16,
    skip_bad: bool = False,
    batch_invariant: bool = True,
    progress: bool = True,
) -> Summary:
    """Make every item's image in ``out_dir``, sharded over the torchrun ranks (if any), resuming earlier runs.

    Args:
        pipe: a :class:`diffusion_fast.Pipeline`, or a diffusers text-to-image pipeline (optimized or not; it
            samples with its own scheduler). Under torchrun, build it on :func:`local_device`.
        items: a PROMPTS path (text: one prompt a line; ``.jsonl``: one object a line with the optional fields
            ``prompt``, ``negative``, ``seed``, ``steps``, ``sampler``, ``guidance``), or a list of prompts (str)
            and field dicts. Entry ``j`` (line ``j + 1`` of a file) makes the files ``{j:06d}-{k}.png``.
        out_dir: the output folder (created; must be the same folder for all ranks).
        seed: item ``(j, k)`` uses seed ``seed + j * images_per_prompt + k`` unless its line names a seed ``s``
            (then ``s + k``).
        steps, sampler, guidance, negative: defaults for lines that do not set them (then the pipeline's).
        images_per_prompt: images per line, ``K``.
        batch_size: items per pipeline call (items with equal steps, sampler and guidance batch together).
        skip_bad: report bad lines in ``Summary.bad`` and make the rest, instead of raising.
        batch_invariant: run the pipeline under :func:`batch_invariant`, so an image does not depend on its batch.
        progress: rank 0 shows a tqdm bar on stderr.

    Returns:
        :class:`Summary` (the same on every rank).

    Raises:
        BatchError: bad lines (each named ``file:line``; before any work), an out dir that cannot be written or
            holds an image made with other settings.
        TypeError / ValueError: bad arguments.
    """
    engine = _engine(pipe)
    for name, v in (("images_per_prompt", images_per_prompt), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be an int in [0, {MAX_SEED}], got {seed!r}")
    if sampler is not None and engine.check_sampler(sampler):
        raise ValueError(engine.check_sampler(sampler))
    if steps is not None and _int_error("steps", steps, 1):
        raise ValueError(_int_error("steps", steps, 1))
    if guidance is not None and _guidance_error(guidance):
        raise ValueError(_guidance_error(guidance))
    if negative is not None:
        if not isinstance(negative, str):
            raise TypeError(f"negative must be a str or None, got {type(negative).__name__}")
        err = engine.check_text(negative) if engine.takes_negative else "this pipeline takes no negative prompt"
        if err:
            raise BatchError(f"negative {negative!r}: {err}")
    todo_items, bad = _plan(_entries(items), engine, seed=seed, steps=steps, sampler=sampler, guidance=guidance,
                           negative=negative, images_per_prompt=images_per_prompt)
    if bad and not skip_bad:
        raise BatchError([str(b) for b in bad] + [f"{len(bad)} bad line{'s' if len(bad) > 1 else ''}; nothing "
                                                  "was generated (skip_bad / --skip-bad makes the others)"])
    if not todo_items:
        raise BatchError([f"skipped {b}" for b in bad] + ["nothing to make: no usable prompt lines"])
    out = Path(out_dir)
    world = _world(engine.device)
    try:
        return _run(engine, todo_items, bad, out, world, batch_size, batch_invariant, progress)
    finally:
        world.close()


def _digest(items: Sequence[Item]) -> str:
    """What every rank must agree on: the items, their settings and files."""
    return hashlib.sha256(json.dumps([it.settings() | {"file": it.file} for it in items]).encode()).hexdigest()


def _run(engine: _Engine, items: list[Item], bad: list[BadLine], out: Path, world: _World, batch_size: int,
         invariant: bool, progress: bool) -> Summary:
    digest = _digest(items)
    state: dict[str, Any]
    if world.rank == 0:
        run = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{secrets.token_hex(3)}"
        try:
            todo, already = _prepare(out, items, run)
            state = {"run": run, "todo": todo, "already": already, "digest": digest}
        except BatchError as exc:  # told to every rank, so none waits for work that will not come
            state = {"error": exc.lines}
        except OSError as exc:
            state = {"error": [f"--out-dir {str(out)!r}: {exc}"]}
    else:
        state = {}
    state = world.broadcast(state)
    if "error" in state:
        raise BatchError(state["error"])
    run, todo = state["run"], state["todo"]
    problem = None
    if state["digest"] != digest:
        problem = f"rank {world.rank} on {socket.gethostname()} planned other items (different PROMPTS or options)"
    elif not (out / STATE_DIR / f"run-{run}.json").is_file():
        problem = (f"rank {world.rank} on {socket.gethostname()} cannot see {str(out)!r} as rank 0 wrote it; "
                   "--out-dir must be a folder every node shares")
    problems = [p for p in world.all_gather(problem) if p]
    if problems:
        if world.rank == 0:
            (out / STATE_DIR / f"run-{run}.json").unlink(missing_ok=True)
        raise BatchError(problems)

    mine = [items[i] for i in todo[world.rank::world.size]]
    writer = _Writer(out, run, world.rank) if mine else None
    bar = _Progress(progress and world.rank == 0, len(todo), out, run, world.size)
    t0 = time.perf_counter()
    made = 0
    try:
        for batch in _batches(mine, batch_size):
            t = time.perf_counter()
            with batch_invariant() if invariant else contextlib.nullcontext(), torch.no_grad():
                images = engine(batch)
            writer.write(batch, images, (time.perf_counter() - t) / len(batch))
            made += len(batch)
            bar.update(len(batch))
    finally:
        if writer is not None:
            writer.close()
    seconds = time.perf_counter() - t0
    stats = world.all_gather(RankStats(world.rank, socket.gethostname(), str(engine.device), made, seconds))
    if world.rank == 0:
        _finish(out, run)
    bar.close(sum(s.images for s in stats))
    world.barrier()  # manifest.jsonl is complete when generate() returns on any rank
    return Summary(out_dir=str(out), planned=len(items), generated=sum(s.images for s in stats),
                   already=state["already"], seconds=max(s.seconds for s in stats), ranks=stats, bad=bad)


# ---------------------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------------------


def run_command(args) -> int:
    """``diffusion-fast batch``: the parsed arguments (see ``cli.build_parser``) -> exit status.

    Raises :class:`BatchError` for anything the user must fix (printed by the CLI as one line each, exit 2); on
    ranks other than 0 the error carries no lines, so it is printed once."""
    from .pipeline import Pipeline

    rank = int(os.environ.get("RANK", "0"))
    try:
        entries = read_prompts(args.prompts)
        if args.device == "auto":
            device = local_device()
        else:
            try:
                device = torch.device(args.device)
            except RuntimeError as exc:
                raise BatchError(f"--device {args.device!r}: {exc}") from None
            if device.type == "cuda" and not torch.cuda.is_available():
                raise BatchError("--device cuda: no CUDA device is available here")
        if device.type == "cpu":
            torch.set_num_threads(args.threads)
        try:
            pipe = Pipeline.from_pretrained(args.model, device=device, backend=args.backend)
        except Exception as exc:  # any reason the files do not make a model is the user's to fix
            raise BatchError(f"--model {args.model!r} does not load: {exc}") from None
        try:
            summary = generate(pipe, entries, args.out_dir, seed=args.seed, steps=args.steps, sampler=args.sampler,
                               guidance=args.guidance, negative=args.negative,
                               images_per_prompt=args.images_per_prompt, batch_size=args.batch_size,
                               skip_bad=args.skip_bad, batch_invariant=args.batch_invariant,
                               progress=sys.stderr.isatty())
        except (ValueError, TypeError) as exc:  # a bad option, named by the check that owns it
            if isinstance(exc, BatchError):
                raise
            raise BatchError(str(exc)) from None
    except BatchError:
        if rank != 0:
            raise BatchError([]) from None
        raise
    if rank == 0:
        for b in summary.bad:
            print(f"skipped {b}", file=sys.stderr)
        print(summary.line())
    return 0
