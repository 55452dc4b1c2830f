"""Ahead-of-time compilation of the Triton kernels for sm_80 and sm_90, on this GPU-less machine.

Every launch configuration the host code may pick (attention: every autotuner candidate of each head-dim
class on each target family, long and loop-free paths; group_norm: both layouts, the fused flags, the
tile shapes of narrow and wide groups; sampler_step: both block configurations, K = 0/1/3/8 with every input
present) must compile, fit the target's shared memory, spill no registers, and — for the attention tiles on
sm_90 that allow it — use wgmma. The wide set (more dtypes, head dims, key counts, flags) runs with
``python benchmarks/triton_aot.py --full``; its table is in docs/kernels_triton.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffusion_fast.kernels.triton import attention as ta
from diffusion_fast.kernels.triton import sampler_step as tss

pytest.importorskip("triton.backends.nvidia")

AOT = Path(__file__).resolve().parents[1] / "benchmarks" / "triton_aot.py"
sys.path.insert(0, str(AOT.parent))
import triton_aot as _aot  # noqa: E402 - a developer tool beside the benchmarks, not part of the package


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    path = tmp_path_factory.mktemp("aot") / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # real JIT functions, no GPU needed
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the current default, stated to silence its warning
    proc = subprocess.run([sys.executable, str(AOT), "--json", str(path)],
                          env=env, capture_output=True, text=True, timeout=900)
    if not path.exists():
        pytest.fail(f"the AOT run wrote nothing (rc={proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(path.read_text())


def test_every_configuration_compiles_fits_and_does_not_spill(records):
    assert len(records) == len(_aot.all_jobs())
    bad = [f"{r['op']} sm_{r['arch']} {r['label']}: {'; '.join(r['problems'])}" for r in records if r["problems"]]
    assert not bad, "\n".join(bad)
    for r in records:
        assert r["ok"] and r["regs"] > 0 and r["stack"] == 0 and r["local"] == 0
        assert 0 <= r["shared"] <= _aot.SHARED_LIMIT[r["arch"]]


def test_hopper_attention_uses_wgmma(records):
    hopper = [r for r in records if r["op"] == "attention" and r["arch"] == 90 and r["expect_wgmma"]]
    assert len(hopper) >= 20
    assert all(r["wgmma"] for r in hopper), [r["label"] for r in hopper if not r["wgmma"]]
    # Ampere has no wgmma; a PTX that claimed it for sm_80 would mean the target was not honoured.
    assert not any(r["wgmma"] for r in records if r["arch"] == 80)


def test_the_set_covers_every_autotuner_candidate():
    labels = {(j.arch, j.label) for j in _aot.all_jobs()}
    for arch in _aot.TARGETS:
        for D in (40, 80, 160, 256):  # one head dim per class of D_A + D_B
            for Sk in (1000, 77):
                for cfg in ta.candidate_configs(D, torch.float16, Sk, arch):
                    bn, tail, _, _ = ta.key_tiles(Sk, cfg.block_n)
                    want = f"fp16 D={D} Sk={Sk} M{cfg.block_m} N{bn}+{tail} w{cfg.num_warps} s{cfg.num_stages}"
                    assert (arch, want) in labels
        for cfg in ta.candidate_configs(40, torch.float32, 1000, arch):
            bn, tail, _, _ = ta.key_tiles(1000, cfg.block_n)
            assert (arch, f"fp32 D=40 Sk=1000 M{cfg.block_m} N{bn}+{tail} w{cfg.num_warps} s{cfg.num_stages}") \
                in labels
        for cfg in tss.configs():
            assert any(a == arch and label.endswith(f"BLOCK={cfg.block}") for a, label in labels)
        for kind in ("NCHW", "NHWC"):
            assert any(a == arch and label.startswith("apply") and kind in label for a, label in labels)
