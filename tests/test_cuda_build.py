"""The CUDA extension on a machine without a GPU: every kernel compiles for sm_90a with no register spills
(ptxas report), the built module imports, and the no-device and error paths say what is wrong.

Run as a script (``python tests/test_cuda_build.py [arch]``) to print the ptxas report as a markdown table.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from diffusion_fast import ops
from diffusion_fast.ops import registry

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)
BUILD_WANTED = os.environ.get("DIFFUSION_FAST_BUILD_CUDA", "") != "0"
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found")
no_gpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine-without-GPU path")

# Every kernel family each source must report (template instantiations are counted per family).
EXPECTED = {
    "group_norm.cu": {"gn_nchw_kernel": 18, "gn_nhwc_kernel": 18},
    "sampler_step.cu": {"sampler_step_kernel": 6},
    "attention.cu": {"attention_kernel": 20},
    "runtime.cu": {"probe_kernel": 1},
}


def ptxas_report(arch: str = "90a") -> dict[str, dict]:
    """Compile every csrc/*.cu to a cubin for ``sm_<arch>`` with ``-Xptxas -v``; per kernel: registers,
    stack frame, spill stores/loads, static shared memory, and the source file."""
    sources = sorted(CSRC.glob("*.cu"))
    out_dir = ROOT / "build" / "ptxas"
    out_dir.mkdir(parents=True, exist_ok=True)

    def compile_one(src: Path) -> tuple[str, str]:
        cmd = [NVCC, "-cubin", "-O3", "-std=c++17", "-DNDEBUG", f"-I{CSRC}",
               f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v", str(src),
               "-o", str(out_dir / f"{src.stem}.sm_{arch}.cubin")]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise AssertionError(f"nvcc failed on {src.name}:\n{res.stdout}\n{res.stderr}")
        return src.name, res.stdout + res.stderr

    with ThreadPoolExecutor(max_workers=max(1, min(len(sources), os.cpu_count() or 1))) as pool:
        logs = list(pool.map(compile_one, sources))
    return {k: v for name, log in logs for k, v in parse_ptxas(log, name).items()}


def _demangle(names: list[str]) -> list[str]:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return names
    res = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True)
    out = res.stdout.splitlines()
    return out if len(out) == len(names) else names


def parse_ptxas(log: str, source: str) -> dict[str, dict]:
    entries: dict[str, dict] = {}
    current = None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            current = m.group(1)
            entries[current] = {"source": source}
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            entries[current].update(stack=int(m.group(1)), spill_stores=int(m.group(2)),
                                    spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            entries[current]["registers"] = int(m.group(1))
            sm = re.search(r"(\d+) bytes smem", line)
            entries[current]["smem"] = int(sm.group(1)) if sm else 0
    names = _demangle(list(entries))
    return {pretty(n): v for n, v in zip(names, entries.values())}


def pretty(name: str) -> str:
    name = re.sub(r"df::\(anonymous namespace\)::", "", name)
    name = re.sub(r"^void ", "", name)
    return re.sub(r"\([^()]*\)$", "", name)


@pytest.fixture(scope="module")
def report() -> dict[str, dict]:
    rep = ptxas_report("90a")
    (ROOT / "build" / "ptxas" / "sm_90a.json").write_text(json.dumps(rep, indent=1, sort_keys=True))
    return rep


@needs_nvcc
def test_every_kernel_compiles_for_sm90a_without_spills(report):
    for source, families in EXPECTED.items():
        for family, count in families.items():
            got = [n for n, e in report.items() if e["source"] == source and n.startswith(family)]
            assert len(got) == count, f"{source}: expected {count} {family} instantiations, ptxas reported {got}"
    for name, e in report.items():
        assert {"registers", "stack", "spill_stores", "spill_loads"} <= e.keys(), (name, e)
        assert e["spill_stores"] == 0 and e["spill_loads"] == 0, (
            f"{name} spills: {e['spill_stores']} bytes stored, {e['spill_loads']} bytes loaded "
            f"({e['registers']} registers)")
    # The stack frame is recorded (build/ptxas/sm_90a.json); no kernel keeps an array in local memory.
    assert {n: e["stack"] for n, e in report.items() if e["stack"]} == {}
    print("\n" + markdown_table(report))


def markdown_table(rep: dict[str, dict]) -> str:
    rows = ["| kernel | registers | stack (B) | spill st/ld (B) | static smem (B) |",
            "| --- | ---: | ---: | ---: | ---: |"]
    for name in sorted(rep):
        e = rep[name]
        rows.append(f"| `{name}` | {e['registers']} | {e['stack']} | {e['spill_stores']}/{e['spill_loads']} | "
                    f"{e['smem']} |")
    return "\n".join(rows)


# ------------------------------------------------------------------------------------------ the module

@pytest.fixture(scope="module")
def ext():
    from diffusion_fast.kernels.cuda import _ext

    mod = _ext.ext()
    if mod is None:
        if NVCC is not None and BUILD_WANTED:
            pytest.fail(f"nvcc is present but diffusion_fast._C does not import: {_ext.load_error()} "
                        "(build it: pip install -e .)")
        pytest.skip(f"CUDA extension not built here: {_ext.load_error()}")
    return mod


def test_module_imports_and_names_its_architectures(ext):
    assert re.fullmatch(r"(sm_\d+[af]?)( sm_\d+[af]?)*", ext.ARCHS), ext.ARCHS
    n, err = ext.device_count()
    assert isinstance(n, int) and isinstance(err, str)
    assert issubclass(ext.KernelError, RuntimeError)
    assert ext.attention_supports_head_dim(40) and not ext.attention_supports_head_dim(96)


@no_gpu_only
def test_without_a_gpu_the_backend_reports_no_cuda_device(ext):
    from diffusion_fast.kernels.cuda import _ext

    assert ext.device_count()[0] == 0
    assert ext.probe(0).startswith("no CUDA device")
    assert _ext.available() == "no CUDA device"
    for op in ("group_norm", "attention", "sampler_step"):
        assert registry.status(op)["cuda"] == "no CUDA device"


@no_gpu_only
def test_explicit_cuda_backend_on_cpu_tensors_raises_with_the_reason(ext):
    x = torch.randn(2, 8, 3, 5)
    with pytest.raises(ops.BackendUnavailable, match="group_norm: backend 'cuda' cannot serve.*no CUDA device"):
        ops.group_norm(x, 4, backend="cuda")
    q = torch.randn(1, 7, 2, 40, dtype=torch.float16)
    with pytest.raises(ops.BackendUnavailable, match="attention: backend 'cuda'.*no CUDA device"):
        ops.attention(q, q, q, backend="cuda")
    xs = torch.randn(2, 6)
    with pytest.raises(ops.BackendUnavailable, match="sampler_step: backend 'cuda'.*no CUDA device"):
        ops.sampler_step(xs, xs, torch.randn(9), backend="cuda")
    # auto never picks it there: the reference serves.
    assert torch.equal(ops.group_norm(x, 4), ops.group_norm(x, 4, backend="torch"))


def test_supports_names_cpu_tensors(ext):
    from diffusion_fast.kernels.cuda import attention, group_norm

    x = torch.randn(2, 8, 3, 5)
    assert group_norm.supports(x, 4) == "x is on cpu; the cuda backend needs CUDA tensors"
    q = torch.randn(1, 7, 2, 40, dtype=torch.float16)
    assert "q is on cpu" in attention.supports(q, q, q, 0.1)


def test_launch_error_names_the_kernel_and_the_cuda_error(ext):
    # Device 12345 does not exist (and without a GPU there is no driver): the launcher must raise
    # KernelError naming itself and the CUDA error, not crash or return silently.
    with pytest.raises(ext.KernelError, match=r"sampler_step: cudaSetDevice: .+ \(cudaError\w+\)"):
        ext.sampler_step(x=256, mo=256, mo_dtype=0, cfg=False, coef=256, coef_stride=1, slots=0, slots_stride=1,
                         slots_int64=False, hist=0, K=0, noise=0, noise_dtype=-1, out=256, net=0, net_dtype=-1,
                         net_cfg=False, n=4, sm_count=1, device=12345, stream=0)
    with pytest.raises(ext.KernelError, match=r"group_norm: cudaSetDevice: .+ \(cudaError\w+\)"):
        ext.group_norm(x=256, out=256, weight=0, bias=0, w_stride=0, b_stride=0, add=0, add_sn=0, add_sc=0, ws=0,
                       dtype=1, param_dtype=0, add_dtype=0, N=1, C=8, HW=16, G=2, channels_last=False, eps=1e-5,
                       silu=False, vec=8, splits=1, device=12345, stream=0)
    with pytest.raises(ext.KernelError, match=r"attention: cudaSetDevice: .+ \(cudaError\w+\)"):
        ext.attention(q=256, k=256, v=256, out=256, dtype=1, B=1, H=1, Sq=1, Sk=1, D=64, q_sb=0, q_ss=0, q_sh=0,
                      k_sb=0, k_ss=0, k_sh=0, v_sb=0, v_ss=0, v_sh=0, o_sb=0, o_ss=0, o_sh=0, scale=1.0,
                      device=12345, stream=0)
    assert ext.probe(12345) != ""


def test_launchers_reject_bad_arguments_before_any_launch(ext):
    with pytest.raises(ext.KernelError, match="attention: head dim 96 is not compiled"):
        ext.attention(q=256, k=256, v=256, out=256, dtype=1, B=1, H=1, Sq=1, Sk=1, D=96, q_sb=0, q_ss=0, q_sh=0,
                      k_sb=0, k_ss=0, k_sh=0, v_sb=0, v_ss=0, v_sh=0, o_sb=0, o_ss=0, o_sh=0, scale=1.0,
                      device=0, stream=0)
    with pytest.raises(ext.KernelError, match="16-byte aligned"):
        ext.attention(q=258, k=256, v=256, out=256, dtype=1, B=1, H=1, Sq=1, Sk=1, D=64, q_sb=0, q_ss=0, q_sh=0,
                      k_sb=0, k_ss=0, k_sh=0, v_sb=0, v_ss=0, v_sh=0, o_sb=0, o_ss=0, o_sh=0, scale=1.0,
                      device=0, stream=0)
    with pytest.raises(ext.KernelError, match="K must be 0..8"):
        ext.sampler_step(x=256, mo=256, mo_dtype=0, cfg=False, coef=256, coef_stride=1, slots=256, slots_stride=1,
                         slots_int64=False, hist=256, K=9, noise=0, noise_dtype=-1, out=256, net=0, net_dtype=-1,
                         net_cfg=False, n=4, sm_count=1, device=0, stream=0)


@no_gpu_only
def test_forward_binds_every_argument_of_the_launchers(ext, monkeypatch):
    # Without a GPU the launcher stops at cudaSetDevice; reaching it means every keyword argument the
    # Python side passes exists in the binding with a compatible type (a mismatch raises TypeError).
    from diffusion_fast.kernels.cuda import _ext, attention, group_norm, sampler_step

    monkeypatch.setattr(_ext, "device_index", lambda t: 0)
    monkeypatch.setattr(_ext, "stream", lambda t: 0)
    monkeypatch.setattr(_ext, "sm_count", lambda t: 132)
    calls = {
        "group_norm": lambda: group_norm.forward(torch.randn(1, 32, 64, 64), 32, torch.randn(32), torch.randn(32),
                                                 1e-5, "silu", torch.randn(1, 32)),
        "sampler_step": lambda: sampler_step.forward(
            torch.randn(2, 8), torch.randn(4, 8, dtype=torch.float16), torch.randn(13),
            torch.tensor([0, 1]), torch.randn(2, 2, 8), torch.randn(2, 8), torch.empty(2, 8),
            torch.empty(4, 8, dtype=torch.bfloat16)),
        "attention": lambda: attention.forward(*(torch.randn(1, 9, 2, 40, dtype=torch.float16),) * 3, 0.1),
    }
    for name, call in calls.items():
        with pytest.raises(ext.KernelError, match=rf"{name}: cudaSetDevice"):
            call()


def test_group_norm_plan_splits_so_batch_one_fills_the_gpu(ext):
    # SD1.5 first GroupNorm, batch 1 on a 132-SM card: 32 groups alone would leave 100 SMs idle.
    s = ext.group_norm_splits(1, 320, 64 * 64, 32, False, 8, 132)
    assert 32 * s >= 2 * 132
    s_cl = ext.group_norm_splits(1, 320, 64 * 64, 32, True, 8, 132)
    assert s_cl >= 2 * 132 // 64 and s_cl > 1
    # Enough (sample, group) pairs already: one fused launch.
    assert ext.group_norm_splits(64, 320, 16, 32, False, 8, 132) == 1
    assert ext.group_norm_workspace(1, 32, s) == 32 * s * 3
    assert ext.group_norm_vec(256, 256, 1, 320, 63, False) == 1  # HW % 8 != 0: scalar path
    assert ext.group_norm_vec(256, 256, 1, 320, 64, False) == 8
    assert ext.group_norm_vec(258, 256, 1, 320, 64, False) == 1  # x not 16-byte aligned
    assert ext.group_norm_nhwc_fits(4096, 8) and not ext.group_norm_nhwc_fits(4096, 4)


def test_channels_last_splits_never_start_past_the_last_row(ext):
    # [1, 1280, 8, 8] channels_last once planned 20 splits of 4 rows over 64 rows: splits 16-19 started past
    # the end and their negative row counts corrupted the statistics. Every planned split must own a row.
    for C, HW in ((1280, 64), (1280, 63), (640, 256), (320, 4096), (30, 64), (4096, 5), (1280, 1)):
        for sm in (16, 108, 132):
            s = ext.group_norm_splits(1, C, HW, 32 if C % 32 == 0 else 2, True, 8, sm)
            chunk = -(-HW // s)
            assert all(i * chunk < HW for i in range(s)), (C, HW, sm, s, chunk)


# ------------------------------------------------------------------------------------------ setup.py

def _setup(env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def test_setup_skips_the_cuda_build_on_request_with_one_line_notice():
    res = _setup({"DIFFUSION_FAST_BUILD_CUDA": "0"})
    assert res.returncode == 0, res.stderr
    notices = [ln for ln in res.stderr.splitlines() if ln.startswith("diffusion_fast setup:")]
    assert len(notices) == 1 and "skipped" in notices[0], res.stderr


def test_setup_rejects_an_unreadable_architecture():
    res = _setup({"DIFFUSION_FAST_BUILD_CUDA": "1", "DIFFUSION_FAST_CUDA_ARCH": "hopper"})
    if NVCC is None:
        assert res.returncode != 0 and "nvcc was not found" in res.stderr
    else:
        assert res.returncode != 0 and "DIFFUSION_FAST_CUDA_ARCH" in res.stderr and "hopper" in res.stderr


if __name__ == "__main__":
    print(markdown_table(ptxas_report(sys.argv[1] if len(sys.argv) > 1 else "90a")))
