"""End-to-end sampling as pytest-benchmark cases: the variants of ``diffusion-fast bench e2e``.

On CUDA diffusers' SD1.5 pipeline with random bf16 weights (512², CFG, 25 steps); on CPU its tiny config for a
few steps, so the suite runs anywhere. Variants that cannot run here (CUDA graphs on a CPU, the integration's
``optimize`` when it is not importable) are skipped with the harness's reason; compiled variants belong to the
CLI, which caps and records their compile time.
"""

from __future__ import annotations

import pytest
import torch

from diffusion_fast.bench import e2e
from diffusion_fast.bench.timing import synchronize

VARIANTS = [v for v in e2e.VARIANTS if not v.compiled]


@pytest.fixture(scope="module")
def context(bench_env, request):
    pytest.importorskip("diffusers")
    device, dtype = bench_env
    model = request.config.getoption("--bench-e2e-model") or ("sd15" if device.type == "cuda" else "sd15-tiny")
    return e2e.build_context(model, device, dtype)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_e2e(benchmark, context, variant, request):
    if variant.cuda_only and not context.cuda:
        pytest.skip("needs a CUDA device (CUDA graphs)")
    why = variant.available(context)
    if why is not None:
        pytest.skip(why)
    steps = request.config.getoption("--bench-e2e-steps") or (25 if context.cuda else 4)
    method = "cuda_graph" if variant.name == "diffusers_graph" else None
    runner = variant.setup(context, method)

    def run():
        out = runner(steps)
        synchronize(context.device)
        return out

    benchmark.extra_info.update(model=context.model, steps=steps, variant=variant.name, family=variant.family)
    out = benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    assert torch.isfinite(out).all()
    if context.cuda:
        from diffusion_fast.samplers import graph

        graph.clear_cache()
