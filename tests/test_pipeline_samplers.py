"""Every sampler and schedule name through the Pipeline and the CLI on the embedded digits model."""

from __future__ import annotations

import pytest
import torch

import diffusion_fast as df
from diffusion_fast import Pipeline, schedules
from diffusion_fast.cli import main
from diffusion_fast.pipeline import SCHEDULES


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return Pipeline.from_pretrained("digits")


@pytest.mark.parametrize("sampler", df.SAMPLERS)
def test_every_sampler_runs_in_the_pipeline(pipe, sampler):
    out = pipe(["3", "8"], steps=4, seed=1, sampler=sampler, progress=False)
    assert out.samples.shape == (2, 1, 8, 8) and torch.isfinite(out.samples).all()


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_every_schedule_runs_in_the_pipeline(pipe, schedule):
    sig = pipe.sigmas(6, schedule)
    assert sig.dtype == torch.float64 and sig[-1] == 0 and bool((sig[1:] < sig[:-1]).all())
    out = pipe("5", steps=6, seed=2, schedule=schedule, progress=False)
    assert torch.isfinite(out.samples).all()


def test_pipeline_schedules_use_the_models_range(pipe):
    table = schedules.edm_sigmas(pipe.sigma_min, pipe.sigma_max)
    torch.testing.assert_close(pipe.sigmas(9, "beta"), schedules.beta(9, table), rtol=0, atol=0)
    torch.testing.assert_close(pipe.sigmas(9, "karras"), schedules.karras(9, pipe.sigma_min, pipe.sigma_max, pipe.rho),
                               rtol=0, atol=0)
    torch.testing.assert_close(pipe.sigmas(9, "ays_sdxl"), schedules.align_your_steps(9, "sdxl"), rtol=0, atol=0)
    with pytest.raises(ValueError, match="schedule must be one of karras"):
        pipe("5", schedule="flow", progress=False)


def test_generate_accepts_new_names(capsys, tmp_path):
    out = tmp_path / "x.png"
    assert main(["generate", "4", "--steps", "5", "--seed", "1", "--sampler", "dpmpp_sde", "--schedule",
                 "sgm_uniform", "-o", str(out)]) == 0
    assert "5 steps dpmpp_sde sgm_uniform" in capsys.readouterr().out and out.stat().st_size > 0
