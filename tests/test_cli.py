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
    (["generate", "7", "--sampler", "nope"], "sampler must be one of .*euler.*; got 'nope'"),
    (["generate", "7", "--steps", "0"], "steps must be >= 1 and at most 1000, got 0"),
    (["generate", "7", "--schedule", "flow"], "schedule must be one of karras, .*; got 'flow'"),
    (["generate", "7", "--steps", "x"], "argument --steps: must be an integer"),
    (["generate", "7", "--guidance", "-1"], "guidance_scale must be a finite number >= 0, got -1.0"),
    (["generate", "7", "--guidance", "x"], "argument --guidance: must be a number, got 'x'"),
    (["generate", "7", "-o", "/nonexistent-dir/x.png"], "directory '/nonexistent-dir' does not exist"),
    (["generate", "7", "-o", "out.unknownext"], "unknown image type"),
    (["generate", "7", "--strip", "/nonexistent-dir/s.png"], "--strip"),
    (["generate", "a purple seven"], "unknown word 'purple'.*vocabulary is: "),
    (["generate", "7", "--negative", "banana"], "unknown word 'banana'"),
    (["generate", "7", "--backend", "cuda"], "--backend cuda"),
    (["generate", "7", "--backend", "eager"], r"backend must be one of \('auto', 'torch', 'triton', 'cuda'\), "
                                              "got 'eager'"),
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


# ------------------------------------------------------------------------------------ outputs are safe ---
def _no_sampling(monkeypatch):
    """Make any network call fail loudly: the checks under test must refuse before the first step."""
    from diffusion_fast import pipeline

    def model(*args, **kwargs):
        raise AssertionError("the network ran although the arguments were refused")

    monkeypatch.setattr(pipeline.Pipeline, "_denoiser", lambda self: model)


@pytest.mark.parametrize("ext", [".h5", ".xbm", ".grib", ".bufr", ".fits"])
@pytest.mark.parametrize("option", ["-o", "--strip"])
def test_unwritable_image_type_refused_before_sampling_and_existing_file_kept(capsys, tmp_path, monkeypatch, ext,
                                                                             option):
    _no_sampling(monkeypatch)
    target = tmp_path / f"k{ext}"
    target.write_bytes(b"data\n")
    argv = ["generate", "seven", "--seed", "1"]
    argv += ["-o", str(target)] if option == "-o" else ["-o", str(tmp_path / "a.png"), "--strip", str(target)]
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"diffusion-fast: error: {option} ") and ext in lines[0], err
    assert target.read_bytes() == b"data\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


def test_output_that_is_a_fifo_is_refused_without_opening_it(tmp_path):
    # Opening a FIFO for writing blocks until a reader comes: the CLI must not open it at all.
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    r = subprocess.run([sys.executable, "-m", "diffusion_fast", "generate", "7", "-o", str(fifo)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "not a regular file" in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1


def test_output_and_strip_naming_the_same_file_are_refused(capsys, tmp_path, monkeypatch):
    _no_sampling(monkeypatch)
    p = tmp_path / "x.png"
    p.write_bytes(b"old")
    os.symlink(p, tmp_path / "link.png")
    for other in (p, tmp_path / "link.png"):
        code, _, err = run(capsys, "generate", "7", "-o", str(p), "--strip", str(other))
        assert code == 2 and "same file" in err, err
    assert p.read_bytes() == b"old"


def test_a_failing_write_replaces_nothing(capsys, tmp_path, monkeypatch):
    """Both pictures are written to temporary files first; if one of them fails, neither target changes."""
    from diffusion_fast import _io

    a, s = tmp_path / "a.png", tmp_path / "s.png"
    a.write_bytes(b"old image")
    real = _io._write_temp

    def fail_on_strip(path, data):
        if os.path.basename(path) == "s.png":
            raise OSError(28, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(_io, "_write_temp", fail_on_strip)
    code, out, err = run(capsys, "generate", "7", "--seed", "0", "--steps", "2", "-o", str(a), "--strip", str(s))
    assert code == 1 and "No space left on device" in err and err.count("\n") == 1, err
    assert a.read_bytes() == b"old image" and not s.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]  # no temporary file left behind


def test_existing_output_is_replaced_by_a_complete_new_file(capsys, tmp_path):
    p = tmp_path / "a.png"
    p.write_bytes(b"old")
    link = tmp_path / "link.png"
    os.symlink(p, link)
    assert run(capsys, "generate", "7", "--seed", "0", "--steps", "2", "-o", str(link))[0] == 0
    assert link.is_symlink() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # written through the link
    assert sorted(q.name for q in tmp_path.iterdir()) == ["a.png", "link.png"]


# ------------------------------------------------------------------------- no raw traceback, ever ---
def _one_line_exit_2(capsys, argv, match):
    import re

    code, out, err = run(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, (code, err)
    assert lines[0].startswith("diffusion-fast: error: "), lines[0]
    assert re.search(match, lines[0]), lines[0]
    return lines[0]


@pytest.mark.parametrize("argv, match", [
    (["--seed", "18446744073709551616"], r"seed must be .*< 2\*\*64.*18446744073709551616"),
    (["--seed", "-1"], "seed must be"),
    (["--device", "meta"], "device must be .*cpu.*cuda.*'meta'"),
    (["--device", "nonsense"], "device must be .*'nonsense'"),
    (["--guidance", "1e300"], "guidance_scale"),
    (["--guidance", "-5"], "guidance_scale must be .*>= 0"),
    (["--steps", "100000"], "steps must be .*at most 1000.*100000"),
    (["--scale", "100000"], "pixels.*limit"),
    (["--scale", "0"], "scale must be >= 1, got 0"),
    (["--num-images", "100000"], "pixels.*limit"),
    (["--num-images", "0"], "num_images must be >= 1"),
])
def test_bad_values_are_refused_before_sampling(capsys, tmp_path, monkeypatch, argv, match):
    _no_sampling(monkeypatch)
    monkeypatch.chdir(tmp_path)
    _one_line_exit_2(capsys, ["generate", "7", *argv], match)
    assert list(tmp_path.iterdir()) == []


def test_largest_seed_works(capsys, tmp_path):
    code, out, err = run(capsys, "generate", "7", "--seed", str(2**64 - 1), "--steps", "2", "-o",
                         str(tmp_path / "a.png"))
    assert code == 0 and f"seed {2**64 - 1}" in out, err


def test_guidance_that_overflows_during_sampling_is_an_error_not_a_black_image(capsys, tmp_path):
    # 3e38 fits the float32 coefficient table, but the guided estimate overflows to inf/NaN on the way.
    _one_line_exit_2(capsys, ["generate", "7", "--seed", "0", "--guidance", "3e38", "-o", str(tmp_path / "a.png")],
                     "not finite")
    assert not (tmp_path / "a.png").exists()


def test_ten_thousand_word_prompt_gives_a_short_error(capsys):
    line = _one_line_exit_2(capsys, ["generate", " ".join(["seven"] * 10_000)], "10000 words")
    assert len(line) < 400
    line = _one_line_exit_2(capsys, ["generate", " ".join(["banana"] * 10_000)], "unknown word")
    assert len(line) < 400


def test_ctrl_c_exits_130_without_a_traceback(capsys, monkeypatch):
    from diffusion_fast import pipeline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.Pipeline, "__call__", interrupted)
    code, out, err = run(capsys, "generate", "7")
    assert code == 130 and err == "diffusion-fast: interrupted\n"


def test_ctrl_c_in_a_real_process_exits_130_without_a_traceback(tmp_path):
    import signal
    import time

    # A run of a minute or more, interrupted after 4 s: while importing torch on a slow machine, sampling on a
    # fast one. Both must end the same way.
    p = subprocess.Popen([sys.executable, "-m", "diffusion_fast", "generate", "7", "--steps", "1000",
                          "--num-images", "64", "-o", str(tmp_path / "a.png")], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(4)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 130 and "Traceback" not in err and err.strip() == "diffusion-fast: interrupted", err
    assert not (tmp_path / "a.png").exists()


def test_threads_option_makes_the_image_independent_of_the_callers_thread_count(capsys, tmp_path):
    import torch

    before = torch.get_num_threads()
    try:
        files = []
        for preset in (1, 2):
            torch.set_num_threads(preset)
            files.append(tmp_path / f"t{preset}.png")
            assert run(capsys, "generate", "7", "--seed", "3", "--steps", "4", "-o", str(files[-1]))[0] == 0
            assert torch.get_num_threads() == preset  # main() puts the caller's setting back
    finally:
        torch.set_num_threads(before)
    assert files[0].read_bytes() == files[1].read_bytes()
