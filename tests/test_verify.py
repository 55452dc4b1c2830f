"""``diffusion-fast verify`` on CPU: the reference and (in Triton's interpreter) the Triton kernels against the
float64 oracle; a wrong or incomplete kernel makes it exit 1; bad arguments exit 2 with one line."""

from __future__ import annotations

import json

import pytest

from diffusion_fast import verify
from diffusion_fast.cli import main as cli_main
from diffusion_fast.ops import registry


def test_verify_passes_every_backend_usable_here(tmp_path, capsys):
    out = tmp_path / "checks.json"
    assert cli_main(["verify", "--device", "cpu", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "ok:" in text.splitlines()[-2] and "0 failed" in text
    doc = json.loads(out.read_text())
    assert doc["schema"] == "diffusion-fast-verify/1" and doc["env"]["git_commit"]
    checks = doc["checks"]
    ran = {(c["op"], c["backend"]) for c in checks if c["status"] == "pass"}
    for op in verify.OPS:
        for backend, why in registry.status(op).items():
            if why is None:  # every usable backend of every op was checked (triton: in the interpreter)
                assert (op, backend) in ran, (op, backend)
    assert {c["dtype"] for c in checks} == {"fp32", "fp16", "bf16"}
    assert {c["layout"] for c in checks if c["op"] == "group_norm"} == {"contiguous", "channels_last"}
    assert {c["layout"] for c in checks if c["op"] == "attention"} == {"contiguous", "fused_qkv"}
    for c in checks:
        assert c["status"] in ("pass", "declined"), c
        if c["status"] == "pass":
            assert 0 <= c["max_abs_err"] <= c["bound"]
        else:
            assert c["detail"]  # a backend that declines says why (the interpreter's bf16 attention)


def test_verify_fails_a_wrong_kernel(monkeypatch, capsys):
    from diffusion_fast.kernels.sdpa import attention as sdpa

    real = sdpa.forward
    monkeypatch.setattr(sdpa, "forward", lambda q, k, v, scale: real(q, k, v, scale * 1.05))  # a wrong scale
    assert verify.main(["--device", "cpu", "--ops", "attention", "--backends", "sdpa,torch"]) == 1
    out = capsys.readouterr().out
    assert "FAIL: attention sdpa fp32 contiguous" in out and "first mismatches" in out
    assert out.strip().splitlines()[-2].startswith("FAIL:")
    assert "attention     torch" in out and "FAIL" not in next(ln for ln in out.splitlines()
                                                             if ln.startswith("attention     torch"))


def test_verify_fails_a_kernel_that_leaves_an_output_unwritten(monkeypatch, capsys):
    from diffusion_fast.kernels.reference import sampler_step as ref

    real = ref.forward

    def skips_last_element(x, model_output, coef, slots, hist, noise, out, net_input):
        keep = out.view(-1)[-1].clone()  # the poisoned (NaN) value the caller put there
        real(x, model_output, coef, slots, hist, noise, out, net_input)
        out.view(-1)[-1] = keep
        return out

    monkeypatch.setattr(ref, "forward", skips_last_element)
    assert verify.main(["--device", "cpu", "--ops", "sampler_step", "--backends", "torch", "--dtypes", "fp32"]) == 1
    assert "non-finite elements" in capsys.readouterr().out


def test_verify_a_crashing_kernel_is_a_failed_check(monkeypatch, capsys):
    from diffusion_fast.kernels.reference import group_norm as ref

    def crash(*args, **kwargs):
        raise RuntimeError("illegal memory access")

    monkeypatch.setattr(ref, "forward", crash)
    assert verify.main(["--device", "cpu", "--ops", "group_norm", "--backends", "torch", "--dtypes", "fp16"]) == 1
    assert "error: group_norm torch fp16" in capsys.readouterr().out.lower()


@pytest.mark.parametrize("args, message", [
    (["--ops", "conv"], "unknown name 'conv'"),
    (["--backends", "numpy"], "unknown name 'numpy'"),
    (["--dtypes", "fp64"], "unknown name 'fp64'"),
    (["--device", "tpu"], "--device"),
    (["--json", "/no/such/dir/x.json"], "does not exist"),
])
def test_verify_bad_arguments_exit_2_with_one_line(args, message, capsys):
    assert cli_main(["verify", "--device", "cpu", *args] if "--device" not in args else ["verify", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and err.startswith("diffusion-fast verify: error:")


def test_verify_time_limit_lists_what_did_not_run(capsys, tmp_path):
    out = tmp_path / "v.json"
    assert verify.main(["--device", "cpu", "--ops", "group_norm", "--time-limit", "1e-9", "--json", str(out)]) == 1
    text = capsys.readouterr().out
    assert "not run (time limit)" in text and "0 failed" in text  # nothing checked is not a pass, nor a failure
    assert {c["status"] for c in json.loads(out.read_text())["checks"]} == {"not run"}
