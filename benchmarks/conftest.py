"""pytest-benchmark suite configuration: the same cases as ``diffusion-fast bench``, keyed the same way.

    pytest benchmarks                                   # tiny shapes on CPU, sd15 on a GPU
    pytest benchmarks --bench-sets sd15,sdxl --benchmark-autosave
    pytest benchmarks --benchmark-compare --benchmark-compare-fail=median:5%
"""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Triton kernels can only run in the interpreter here; the suite skips them (their time means nothing).
    os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_addoption(parser):
    group = parser.getgroup("diffusion-fast benchmarks")
    group.addoption("--bench-sets", default=None,
                    help="comma list of shape sets (tiny, sd15, sdxl, large); default sd15 on CUDA, tiny on CPU")
    group.addoption("--bench-dtype", default=None, choices=("bf16", "fp16", "fp32"),
                    help="activation dtype; default bf16 on CUDA, fp32 on CPU")
    group.addoption("--bench-e2e-steps", type=int, default=None,
                    help="sampling steps of the end-to-end cases; default 25 on CUDA, 4 on CPU")
    group.addoption("--bench-e2e-model", default=None,
                    help="diffusers model of the end-to-end cases; default sd15 on CUDA, sd15-tiny on CPU")


def bench_device() -> torch.device:
    return torch.device("cuda" if HAS_CUDA else "cpu")


def bench_dtype(config) -> torch.dtype:
    from diffusion_fast.bench.ops import DTYPES

    name = config.getoption("--bench-dtype") or ("bf16" if HAS_CUDA else "fp32")
    return DTYPES[name]


def bench_sets(config) -> list[str]:
    text = config.getoption("--bench-sets") or ("sd15" if HAS_CUDA else "tiny")
    return [s.strip() for s in text.split(",") if s.strip()]


def pytest_generate_tests(metafunc):
    if "op_case" not in metafunc.fixturenames:
        return
    from diffusion_fast.bench.ops import OPS, SETS, SPECS, case_key, implementations

    sets = bench_sets(metafunc.config)
    for s in sets:
        if s not in SETS:
            raise ValueError(f"--bench-sets: unknown shape set {s!r}; expected names from {SETS}")
    device, dtype = bench_device(), bench_dtype(metafunc.config)
    cases, ids = [], []
    for op in OPS:
        impls = implementations(op, device, math_limit_bytes=(16 << 30) if HAS_CUDA else (256 << 20))
        for s in sets:
            for shape in SPECS[op].shapes(s, dtype):
                for impl in impls:
                    if impl.compiled:  # torch.compile build times belong to the CLI's capped budget
                        continue
                    cases.append((SPECS[op], shape, impl, device, dtype))
                    ids.append(case_key(shape, dtype, impl.name))
    metafunc.parametrize("op_case", cases, ids=ids)


@pytest.fixture(scope="session")
def bench_env(request) -> tuple[torch.device, torch.dtype]:
    """``(device, dtype)`` of this benchmark session."""
    return bench_device(), bench_dtype(request.config)
