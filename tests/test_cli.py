"""``diffusion-fast``: generate / samplers / info / bench, exit codes and one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
import types

import pytest
from PIL import Image

from diffusion_fast import SAMPLERS
from diffusion_fast.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_writes_an_upscaled_png(capsys, tmp_path):
    path = tmp_path / "seven.png"
    code, out, err = run(capsys, "generate", "a handwritten seven", "--seed", "7", "-o", str(path))
    assert code == 0, err
    assert "seed 7" in out and str(path) in out
    img = Image.open(path)
    assert img.size == (256, 256) and img.mode == "L"
    # Nearest upscaling: every 32x32 block is one flat colour.
    block = img.crop((32, 32, 64, 64))
    assert len(set(block.tobytes())) == 1
    # Same seed, same file.
    again = tmp_path / "again.png"
    assert main(["generate", "a handwritten seven", "--seed", "7", "-o", str(again)]) == 0
    assert path.read_bytes() == again.read_bytes()


def test_generate_grid_strip_and_options(capsys, tmp_path):
    grid, strip = tmp_path / "grid.png", tmp_path / "strip.png"
    code, out, err = run(capsys, "generate", "3", "--num-images", "3", "--steps", "5", "--sampler", "euler",
                         "--guidance", "3", "--negative", "8", "--seed", "0", "-o", str(grid),
                         "--strip", str(strip), "--scale", "4", "--backend", "torch")
    assert code == 0, err
    assert "3 images" in out and "5 steps euler" in out and "guidance 3" in out
    assert Image.open(grid).size[0] > 3 * 8 * 4
    s = Image.open(strip)
    assert s.size[0] > s.size[1] > 0


@pytest.mark.parametrize("argv, match", [
    (["generate", "7", "--sampler", "nope"], "unknown sampler 'nope'"),
    (["generate", "7", "--schedule", "flow"], "argument --schedule: unknown schedule 'flow'; choose from karras"),
    (["generate", "7", "--steps", "0"], "argument --steps: must be >= 1, got 0"),
    (["generate", "7", "--steps", "x"], "argument --steps: must be an integer"),
    (["generate", "7", "--guidance", "-1"], "argument --guidance: must be a finite number >= 0"),
    (["generate", "7", "-o", "/nonexistent-dir/x.png"], "directory '/nonexistent-dir' does not exist"),
    (["generate", "7", "-o", "out.unknownext"], "unknown image type"),
    (["generate", "7", "--strip", "/nonexistent-dir/s.png"], "--strip"),
    (["generate", "a purple seven"], "unknown word 'purple'.*vocabulary is: "),
    (["generate", "7", "--negative", "banana"], "unknown word 'banana'"),
    (["generate", "7", "--backend", "cuda"], "--backend cuda"),
    (["generate", "7", "--backend", "eager"], "argument --backend: invalid choice"),
    (["generate", "7", "--model", "/nonexistent-model"], "neither a built-in model"),
    (["generate"], "required: prompt"),
    (["frobnicate"], "invalid choice"),
    ([], "required: COMMAND"),
])
def test_bad_arguments_exit_2_with_one_line(capsys, tmp_path, monkeypatch, argv, match):
    import re

    if argv[-2:] == ["--backend", "cuda"]:
        import torch

        if torch.cuda.is_available():
            pytest.skip("the cuda backend is usable on this machine")
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert re.search(match, lines[0]), lines[0]
    assert not (tmp_path / "out.png").exists()


@pytest.mark.parametrize("path", ["/proc/x.png", "/sys/x.png"])
def test_unwritable_output_is_found_before_sampling(capsys, path):
    """Checked by opening the file, so it holds for root too (os.access would say yes)."""
    code, out, err = run(capsys, "generate", "7", "-o", path)
    assert code == 2 and "is not writable" in err and out == ""


def test_existing_output_is_overwritten_and_new_one_not_left_behind_on_error(capsys, tmp_path):
    p = tmp_path / "a.png"
    p.write_bytes(b"old")
    assert run(capsys, "generate", "7", "--seed", "0", "-o", str(p))[0] == 0
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    q = tmp_path / "b.png"
    assert run(capsys, "generate", "banana", "-o", str(q))[0] == 2
    assert not q.exists()


def test_output_is_a_directory(capsys, tmp_path):
    d = tmp_path / "dir.png"
    d.mkdir()
    code, _, err = run(capsys, "generate", "7", "-o", str(d))
    assert code == 2 and "is a directory" in err


def test_samplers_lists_each_with_a_line(capsys):
    code, out, _ = run(capsys, "samplers")
    assert code == 0
    lines = out.strip().split("\n\n")[0].splitlines()
    assert [line.split()[0] for line in lines] == list(SAMPLERS)
    assert all(line.split()[1] == "order" and "/step" in line and ("deterministic" in line or "stochastic" in line)
               for line in lines)
    assert "schedules (generate --schedule): karras" in out and "dpm_adaptive" in out


def test_info_lists_versions_and_every_backend(capsys):
    code, out, _ = run(capsys, "info")
    assert code == 0
    assert "diffusion_fast" in out and "torch" in out
    for op in ("group_norm", "attention", "sampler_step"):
        for backend in ("torch", "triton", "cuda"):
            assert any(line.split()[:2] == [op, backend] for line in out.splitlines()), (op, backend)
    assert "usable" in out


def test_bench_forwards_its_argv(monkeypatch):
    seen = []
    fake = types.ModuleType("diffusion_fast.bench.cli")
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "diffusion_fast.bench.cli", fake)
    assert main(["bench", "ops", "--device", "cpu", "--help"]) == 0
    assert seen == [["ops", "--device", "cpu", "--help"]]


def test_bench_missing_is_exit_2(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "diffusion_fast.bench.cli", None)  # import raises ImportError
    code, _, err = run(capsys, "bench", "ops")
    assert code == 2 and "benchmark module is not available" in err


def test_console_script_runs_without_triton_or_sklearn(tmp_path):
    """The installed entry point, in a fresh interpreter: generate works and imports neither Triton nor
    scikit-learn (startup stays short)."""
    code = ("import sys; from diffusion_fast.cli import main; rc = main(sys.argv[1:]); "
            "bad = [m for m in ('triton', 'sklearn') if m in sys.modules]; "
            "print('heavy imports:', bad); sys.exit(rc or (3 if bad else 0))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code, "generate", "seven", "--seed", "1", "-o",
                        str(tmp_path / "s.png")], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "heavy imports: []" in r.stdout and (tmp_path / "s.png").exists()
    assert r.stderr == ""  # not a TTY: no progress bar
