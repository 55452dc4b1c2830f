"""Benchmark results: the JSON document, the environment it records, and its validation.

The schema is documented in docs/benchmarking.md; :func:`validate` is its executable form. A results file
is one JSON object::

    {"schema": "diffusion-fast-bench/1", "created": "<ISO 8601 UTC>", "suites": ["ops", "e2e"],
     "env": {...}, "config": {...}, "peaks": {...}, "cases": [{...}, ...], "skipped": [{...}, ...]}

Every case carries a ``key`` that names it independently of the machine (op, shape set, shape, dtype,
implementation), so two files are compared case by case.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

SCHEMA = "diffusion-fast-bench/1"
SUITES = ("ops", "e2e")
KINDS = ("backend", "baseline", "variant")

_REPO = Path(__file__).resolve().parents[2]


class SchemaError(ValueError):
    """A results document does not follow the schema; the message names the file and the field."""


# ---------------------------------------------------------------------------------------------- environment


def _run(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=_REPO)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _host_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def device_info(device: torch.device) -> dict:
    """Name, memory and shape of the device the benchmarks ran on."""
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return {
            "type": "cuda",
            "name": p.name,
            "memory_bytes": int(p.total_memory),
            "capability": f"{p.major}.{p.minor}",
            "sm_count": int(p.multi_processor_count),
            "l2_bytes": int(getattr(p, "L2_cache_size", 0)) or None,
        }
    return {
        "type": device.type,
        "name": _cpu_name(),
        "memory_bytes": _host_memory(),
        "capability": None,
        "sm_count": None,
        "l2_bytes": None,
        "threads": torch.get_num_threads(),
    }


def git_commit() -> tuple[str, bool | None]:
    """``(commit, dirty)`` of the checkout this package runs from.

    ``git rev-parse HEAD`` in the package's repository; where that fails (a copy of the tree without its
    ``.git``, such as the one a GPU machine receives) the ``GIT_COMMIT`` environment variable, which
    ``benchmarks/gpu_check.sh`` passes on; ``"unknown"`` only when neither exists.
    """
    commit = _run(["git", "rev-parse", "HEAD"])
    if commit:
        st = _run(["git", "status", "--porcelain", "--untracked-files=no"])
        return commit, None if st is None else bool(st)
    env = os.environ.get("GIT_COMMIT", "").strip()
    return (env, None) if env else ("unknown", None)


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def host_info() -> dict:
    """The host CPU (name, logical CPUs, clocks in MHz where the kernel reports them) and its memory."""
    mhz_now = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                mhz_now = float(line.split(":", 1)[1])
                break
    except (OSError, ValueError):
        pass
    khz_max = _read("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    governor = _read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor")
    return {"cpu": _cpu_name(), "logical_cpus": os.cpu_count(), "cpu_mhz": mhz_now,
            "cpu_max_mhz": float(khz_max) / 1000 if khz_max and khz_max.isdigit() else None,
            "governor": governor, "memory_bytes": _host_memory(), "torch_threads": torch.get_num_threads()}


def gpu_clocks() -> dict | None:
    """Clocks, power and temperature of the first GPU as ``nvidia-smi`` reports them now (None without it)."""
    fields = ("clocks.sm", "clocks.max.sm", "clocks.mem", "clocks.max.mem", "power.draw", "power.limit",
              "temperature.gpu", "pstate")
    out = _run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"])
    if not out:
        return None
    values = [v.strip() for v in out.splitlines()[0].split(",")]
    rec: dict[str, Any] = {}
    for k, v in zip(fields, values):
        try:
            rec[k.replace(".", "_")] = float(v)
        except ValueError:
            rec[k.replace(".", "_")] = v
    return rec


def environment(device: torch.device) -> dict:
    """Versions, git commit, host and device of this run."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # triton is optional off Linux
        triton_version = None
    from .. import __version__

    driver = None
    if device.type == "cuda":
        smi = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        driver = smi.splitlines()[0].strip() if smi else None
    commit, dirty = git_commit()
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "cudnn": cudnn,
        "driver": driver,
        "diffusion_fast": __version__,
        "git_commit": commit,
        "git_dirty": dirty,
        "platform": platform.platform(),
        "host": host_info(),
        "device": device_info(device),
        "gpu_clocks": gpu_clocks() if device.type == "cuda" else None,
    }


def new_document(device: torch.device, config: dict, peaks: dict) -> dict:
    """An empty results document for a run on ``device``."""
    return {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "suites": [],
        "env": environment(device),
        "config": config,
        "peaks": peaks,
        "cases": [],
        "skipped": [],
    }


# ---------------------------------------------------------------------------------------------- validation


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _need(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise SchemaError(f"{where}: {msg}")


def _check_num(d: dict, k: str, where: str, *, positive: bool = False, optional: bool = False) -> None:
    v = d.get(k)
    if v is None and optional:
        return
    ok = _is_num(v) and (not positive or v > 0)
    _need(ok, f"{where}.{k}", f"expected a {'positive ' if positive else ''}finite number, got {v!r}")


def _check_str(d: dict, k: str, where: str, *, optional: bool = False) -> None:
    v = d.get(k)
    if v is None and optional:
        return
    _need(isinstance(v, str) and v != "", f"{where}.{k}", f"expected a non-empty string, got {v!r}")


CASE_REQUIRED_STR = ("key", "suite", "op", "set", "impl", "kind", "dtype")
CASE_REQUIRED_NUM = ("median_ms", "p20_ms", "p80_ms")
CASE_OPTIONAL_NUM = ("bytes", "flops", "gbps", "tflops", "frac_copy_peak", "frac_matmul_peak", "roofline_frac",
                     "max_abs_err", "tolerance", "vs_best_baseline", "graph_median_ms", "graph_p20_ms",
                     "graph_p80_ms", "graph_gbps", "graph_tflops", "graph_frac_copy_peak", "graph_frac_matmul_peak",
                     "graph_roofline_frac", "graph_vs_best_baseline", "steps_per_s", "ms_per_image",
                     "host_syncs_per_step", "scalar_reads_per_step", "peak_mem_bytes", "mem_vs_baseline",
                     "spread", "compile_s")


def validate(doc: Any, where: str = "results") -> dict:
    """Check ``doc`` against the schema; return it, or raise :class:`SchemaError` naming the first bad field."""
    _need(isinstance(doc, dict), where, f"expected a JSON object, got {type(doc).__name__}")
    _need(doc.get("schema") == SCHEMA, f"{where}.schema", f"expected {SCHEMA!r}, got {doc.get('schema')!r}")
    _check_str(doc, "created", where)
    suites = doc.get("suites")
    _need(isinstance(suites, list) and all(s in SUITES for s in suites), f"{where}.suites",
          f"expected a list drawn from {list(SUITES)}, got {suites!r}")
    env = doc.get("env")
    _need(isinstance(env, dict), f"{where}.env", "expected an object")
    for k in ("python", "torch", "platform"):
        _check_str(env, k, f"{where}.env")
    for k in ("triton", "cuda", "driver", "git_commit"):
        _check_str(env, k, f"{where}.env", optional=True)
    dev = env.get("device")
    _need(isinstance(dev, dict), f"{where}.env.device", "expected an object")
    _check_str(dev, "type", f"{where}.env.device")
    _check_str(dev, "name", f"{where}.env.device")
    _check_num(dev, "memory_bytes", f"{where}.env.device", positive=True, optional=True)
    _need(isinstance(doc.get("config"), dict), f"{where}.config", "expected an object")
    peaks = doc.get("peaks")
    _need(isinstance(peaks, dict), f"{where}.peaks", "expected an object")
    _check_num(peaks, "copy_gbps", f"{where}.peaks", positive=True)
    _check_num(peaks, "matmul_tflops", f"{where}.peaks", positive=True)
    _check_str(peaks, "matmul_dtype", f"{where}.peaks")
    cases = doc.get("cases")
    _need(isinstance(cases, list), f"{where}.cases", "expected a list")
    seen: set[str] = set()
    for i, c in enumerate(cases):
        w = f"{where}.cases[{i}]"
        _need(isinstance(c, dict), w, "expected an object")
        for k in CASE_REQUIRED_STR:
            _check_str(c, k, w)
        _need(c["suite"] in SUITES, f"{w}.suite", f"expected one of {list(SUITES)}, got {c['suite']!r}")
        _need(c["kind"] in KINDS, f"{w}.kind", f"expected one of {list(KINDS)}, got {c['kind']!r}")
        _need(c["key"] not in seen, f"{w}.key", f"duplicate case key {c['key']!r}")
        seen.add(c["key"])
        _need(isinstance(c.get("params"), dict), f"{w}.params", "expected an object")
        for k in CASE_REQUIRED_NUM:
            _check_num(c, k, w, positive=True)
        _need(c["p20_ms"] <= c["median_ms"] <= c["p80_ms"], w,
              f"expected p20_ms <= median_ms <= p80_ms, got {c['p20_ms']}, {c['median_ms']}, {c['p80_ms']}")
        _need(isinstance(c.get("samples"), int) and c["samples"] >= 1, f"{w}.samples",
              f"expected a positive integer, got {c.get('samples')!r}")
        for k in CASE_OPTIONAL_NUM:
            _check_num(c, k, w, optional=True, positive=k.startswith("graph_") and k.endswith("_ms"))
        if c.get("graph_median_ms") is not None:
            _need(c.get("graph_p20_ms") is not None and c.get("graph_p80_ms") is not None
                  and c["graph_p20_ms"] <= c["graph_median_ms"] <= c["graph_p80_ms"], w,
                  "expected graph_p20_ms <= graph_median_ms <= graph_p80_ms")
        for k in ("speedup", "graph_speedup"):
            sp = c.get(k, {})
            _need(isinstance(sp, dict) and all(isinstance(n, str) and _is_num(v) for n, v in sp.items()),
                  f"{w}.{k}", "expected an object of {impl: number}")
        _need(c.get("correct") in (None, True, False), f"{w}.correct", f"expected true or false, got "
              f"{c.get('correct')!r}")
    skipped = doc.get("skipped")
    _need(isinstance(skipped, list), f"{where}.skipped", "expected a list")
    for i, s in enumerate(skipped):
        w = f"{where}.skipped[{i}]"
        _need(isinstance(s, dict), w, "expected an object")
        _check_str(s, "key", w)
        _check_str(s, "reason", w)
    return doc


def load(path: str | os.PathLike) -> dict:
    """Read and validate a results file; :class:`SchemaError` with a one-line reason when it is unusable."""
    p = Path(path)
    if not p.exists():
        raise SchemaError(f"{p}: no such file")
    if not p.is_file():
        raise SchemaError(f"{p}: not a regular file")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SchemaError(f"{p}: cannot read: {exc}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SchemaError(f"{p}: not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except RecursionError:
        raise SchemaError(f"{p}: JSON nested too deeply to read (not a results file)") from None
    return validate(doc, where=str(p))


def _clean(v: Any) -> Any:
    # JSON has no NaN/inf: a figure that could not be computed is written as null.
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all (:func:`diffusion_fast._io.atomic_write_bytes`: a
    temporary file in the same folder, then a rename); missing parent folders are created first."""
    from .._io import atomic_write_bytes

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)


def save(doc: dict, path: str | os.PathLike) -> None:
    """Validate ``doc`` and write it as indented JSON, atomically (:func:`write_atomic`)."""
    doc = _clean(doc)
    validate(doc)
    write_atomic(path, (json.dumps(doc, indent=1, sort_keys=False) + "\n").encode("utf-8"))


def merge(docs: list[dict], names: list[str]) -> dict:
    """One document from several runs on one machine (e.g. the op suite and one e2e run per model).

    The environment and peaks are the first document's; each part's ``config`` and ``created`` are kept under
    ``config.parts``. Raises ValueError when the parts ran on different devices or commits, or repeat a key.
    """
    if not docs:
        raise ValueError("merge needs at least one results file")
    first = docs[0]
    out = {**first, "suites": [], "cases": [], "skipped": [], "config": {"parts": []}}
    seen: set[str] = set()
    for doc, name in zip(docs, names):
        for what, a, b in (("env.device.name", first["env"]["device"]["name"], doc["env"]["device"]["name"]),
                           ("env.git_commit", first["env"].get("git_commit"), doc["env"].get("git_commit"))):
            if a != b:
                raise ValueError(f"{name}: {what} is {b!r}, but the first file has {a!r}; merge only results "
                                 "of one machine and one commit")
        for c in doc["cases"]:
            if c["key"] in seen:
                raise ValueError(f"{name}: case {c['key']!r} is already in an earlier file")
            seen.add(c["key"])
        out["suites"].extend(s for s in doc["suites"] if s not in out["suites"])
        out["cases"].extend(doc["cases"])
        out["skipped"].extend(doc["skipped"])
        out["config"]["parts"].append({"file": os.path.basename(name), "created": doc["created"],
                                       "config": doc["config"]})
    return validate(out)


def dumps_summary_line(doc: dict) -> str:
    """One line naming the run: device, versions, commit."""
    env = doc["env"]
    commit = (env.get("git_commit") or "unknown")[:10]
    return (f"{env['device']['name']} | torch {env['torch']} | triton {env.get('triton')} | "
            f"cuda {env.get('cuda')} | python {env['python']} | commit {commit}"
            f"{' (dirty)' if env.get('git_dirty') else ''}")


__all__ = ["SCHEMA", "SchemaError", "validate", "load", "save", "merge", "write_atomic", "new_document", "environment",
           "device_info", "host_info", "gpu_clocks", "git_commit", "dumps_summary_line"]
