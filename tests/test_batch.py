"""diffusion-fast batch / diffusion_fast.batch.generate: every image's bytes are independent of world size, batch
size and order; runs resume after a kill; bad input is refused before any work."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import diffusion_fast.batch as batch_mod
from diffusion_fast import Pipeline
from diffusion_fast.batch import (
    EXIT_HOOK_ENV,
    MANIFEST,
    STATE_DIR,
    BatchError,
    batch_invariant,
    generate,
    read_prompts,
)
from diffusion_fast.cli import main

ROOT = Path(__file__).resolve().parents[1]

# Six lines x 2 images: plain prompts, a line seed, per-line steps / sampler (a stochastic one: its noise must
# come from each item's own generator) / guidance / negative, and a blank line that keeps its number.
LINES = [
    {"prompt": "3"},
    {"prompt": "a handwritten seven", "negative": "1"},
    {"prompt": "the digit 0", "seed": 1234},
    {"prompt": "5", "sampler": "euler_ancestral"},
    None,
    {"prompt": "8", "steps": 2, "guidance": 1.0},
    {"prompt": "two", "sampler": "euler_ancestral", "seed": 7},
]
K = 2
N_ITEMS = 6 * K
OPTS = ["--steps", "3", "--seed", "100", "--images-per-prompt", str(K)]


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_pretrained("digits")


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "p.jsonl"
    path.write_text("".join((json.dumps(line) if line else "") + "\n" for line in LINES))
    return path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def pngs(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.png"))}


def manifest(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / MANIFEST).read_text().splitlines()]


def leftovers(folder: Path) -> list[str]:
    """Anything but the images and manifest.jsonl: temporary files, manifest parts, run markers."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.name != MANIFEST and p.suffix != ".png" or p.name.startswith("."))


def check_complete(folder: Path, ref: dict[str, str]) -> None:
    assert pngs(folder) == ref
    recs = manifest(folder)
    assert [r["file"] for r in recs] == sorted(ref), "each image exactly once, in order"
    assert all(r["sha256"] == ref[r["file"]] for r in recs)
    assert leftovers(folder) == []


@pytest.fixture(scope="module")
def reference(pipe, prompts, tmp_path_factory):
    """One process, batch size 16 (items with equal settings share network calls)."""
    out = tmp_path_factory.mktemp("ref")
    s = generate(pipe, prompts, out, seed=100, steps=3, images_per_prompt=K, batch_size=16, progress=False)
    assert s.generated == N_ITEMS and s.already == 0
    return out, pngs(out)


def subprocess_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", EXIT_HOOK_ENV)}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def torchrun(*argv, **env) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "diffusion_fast", "batch", *map(str, argv)]
    return subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(**env), timeout=300)


# -- batch invariance -------------------------------------------------------------------------------------------

def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("call", [
    lambda x, w, b: F.linear(x, w, b),
    lambda x, w, b: F.linear(x, w),
])
@pytest.mark.parametrize("shape", [(7, 24), (5, 13, 24), (3, 2, 5, 24)])
def test_linear_rows_do_not_depend_on_the_batch(call, shape):
    x, w, b = _rand(*shape, seed=0), _rand(40, 24, seed=1), _rand(40, seed=2)
    with batch_invariant():
        whole = call(x, w, b)
        rows = torch.cat([call(x[i:i + 1], w, b) for i in range(x.shape[0])])
        pair = call(x[2:4], w, b)
    assert torch.equal(whole, rows) and torch.equal(whole[2:4], pair)
    torch.testing.assert_close(whole, call(x, w, b), rtol=1e-5, atol=1e-5)  # plain kernel: float32 rounding


@pytest.mark.parametrize("kw", [
    dict(), dict(stride=2, padding=1), dict(padding=(0, 2)), dict(bias=False),
    dict(groups=3), dict(dilation=2, padding=2), dict(padding="same"),  # served one sample per call
])
def test_conv2d_rows_do_not_depend_on_the_batch(kw):
    kw = dict(kw)
    groups = kw.get("groups", 1)
    x, w = _rand(6, 9, 11, 7, seed=3), _rand(12, 9 // groups, 3, 3, seed=4)
    b = None if kw.pop("bias", True) is False else _rand(12, seed=5)
    with batch_invariant():
        whole = F.conv2d(x, w, b, **kw)
        rows = torch.cat([F.conv2d(x[i:i + 1], w, b, **kw) for i in range(x.shape[0])])
    assert torch.equal(whole, rows)
    torch.testing.assert_close(whole, F.conv2d(x, w, b, **kw), rtol=1e-5, atol=1e-5)


def test_digits_samples_are_bit_identical_across_batch_sizes(pipe):
    """Float32 samples, not only PNGs: 8-bit rounding hides last-bit differences in most images (plain batched
    calls differ here in every sample, yet 200 of 200 PNGs came out equal), so this is the test of
    batch_invariant() itself; the PNG comparisons below test the plumbing around it."""
    prompts = [str(i % 10) for i in range(10)]

    def run(bs):
        out = []
        for s in range(0, len(prompts), bs):
            gens = [torch.Generator().manual_seed(40 + s + j) for j in range(len(prompts[s:s + bs]))]
            with batch_invariant(), torch.no_grad():
                out.append(pipe(prompts[s:s + bs], steps=3, sampler="euler_ancestral", generator=gens,
                                progress=False).samples)
        return torch.cat(out)

    one = run(1)
    for bs in (2, 3, 10):
        got = run(bs)
        assert all(torch.equal(got[i], one[i]) for i in range(len(prompts))), f"batch size {bs}"


def test_digits_images_do_not_depend_on_batch_size(pipe, prompts, reference, tmp_path):
    ref_dir, ref = reference
    for bs in (1, 5):
        s = generate(pipe, prompts, tmp_path / f"bs{bs}", seed=100, steps=3, images_per_prompt=K, batch_size=bs,
                     progress=False)
        assert s.generated == N_ITEMS
        check_complete(tmp_path / f"bs{bs}", ref)
    deterministic = ("index", "image", "prompt", "negative", "seed", "sampler", "steps", "guidance", "file", "sha256")
    strip = lambda recs: [{k: r[k] for k in deterministic} for r in recs]  # noqa: E731
    assert strip(manifest(tmp_path / "bs5")) == strip(manifest(ref_dir))


def test_torchrun_two_processes_match_one_process(prompts, reference, tmp_path):
    _, ref = reference
    out = tmp_path / "ddp"
    r = torchrun(prompts, "--out-dir", out, *OPTS, "--batch-size", "3")
    assert r.returncode == 0, r.stdout + r.stderr
    check_complete(out, ref)
    assert {rec["rank"] for rec in manifest(out)} == {0, 1}
    assert f"wrote {N_ITEMS} images" in r.stdout and "2 ranks: rank 0" in r.stdout and "images/s" in r.stdout


# -- resuming ---------------------------------------------------------------------------------------------------

def test_killed_process_resumes_without_making_anything_twice(pipe, prompts, reference, tmp_path):
    _, ref = reference
    out = tmp_path / "killed"
    r = subprocess.run([sys.executable, "-m", "diffusion_fast", "batch", str(prompts), "--out-dir", str(out), *OPTS,
                        "--batch-size", "4"], capture_output=True, text=True, timeout=300,
                       env=subprocess_env(**{EXIT_HOOK_ENV: "5:temp"}))
    assert r.returncode == 3, r.stdout + r.stderr
    made = {p.name: p.stat().st_ino for p in out.glob("*.png")}
    assert len(made) == 5 and len(list(out.glob(".*.tmp"))) == 1  # killed with item 5 half written
    assert not (out / MANIFEST).exists()
    s = generate(pipe, prompts, out, seed=100, steps=3, images_per_prompt=K, batch_size=4, progress=False)
    assert (s.already, s.generated) == (5, N_ITEMS - 5)
    check_complete(out, ref)
    assert all((out / f).stat().st_ino == ino for f, ino in made.items()), "a finished image was made again"


@pytest.mark.slow
def test_one_killed_rank_resumes_on_another_world_size(pipe, prompts, reference, tmp_path):
    _, ref = reference
    out = tmp_path / "ddp-killed"
    r = torchrun(prompts, "--out-dir", out, *OPTS, "--batch-size", "2", **{EXIT_HOOK_ENV: "2:file@1"})
    assert r.returncode != 0
    recorded = sum(f.read_bytes().count(b"\n") for f in (out / STATE_DIR).glob("part-*.jsonl"))  # whole lines
    assert 2 <= recorded < N_ITEMS
    s = generate(pipe, prompts, out, seed=100, steps=3, images_per_prompt=K, progress=False)
    assert s.already == recorded and s.generated == N_ITEMS - recorded
    check_complete(out, ref)


def test_rerun_trusts_only_a_file_with_its_manifest_line(pipe, prompts, reference, tmp_path):
    _, ref = reference
    out = tmp_path / "state"
    kw = dict(seed=100, steps=3, images_per_prompt=K, progress=False)
    generate(pipe, prompts, out, **kw)
    recs = manifest(out)
    # 000000-1.png deleted; 000001-0.png's line dropped; 000002-0.png's bytes changed; a part left by a killed
    # run holding a torn line and a complete one for 000003-0.png (whose merged line is dropped); stale
    # temporary files of an image and of the manifest.
    (out / "000000-1.png").unlink()
    keep = [r for r in recs if r["file"] not in ("000001-0.png", "000003-0.png")]
    (out / MANIFEST).write_text("".join(json.dumps(r) + "\n" for r in keep))
    (out / STATE_DIR).mkdir()
    part = next(r for r in recs if r["file"] == "000003-0.png")
    (out / STATE_DIR / "part-old-r1.jsonl").write_text(json.dumps(part) + "\n" + '{"index": 5, "ima')
    (out / ".000005-0.png.old.r1.tmp").write_bytes(b"\x89PNG half")
    (out / f".{MANIFEST}.old.tmp").write_bytes(b"{")
    (out / "000002-0.png").write_bytes(b"\x89PNG not the recorded bytes")  # e.g. lost data after an OS crash
    before = {p.name: p.stat().st_ino for p in out.glob("*.png")}
    s = generate(pipe, prompts, out, **kw)
    assert (s.already, s.generated) == (N_ITEMS - 3, 3)
    check_complete(out, ref)
    remade = {p.name for p in out.glob("*.png") if before.get(p.name) != p.stat().st_ino}
    assert remade == {"000000-1.png", "000001-0.png", "000002-0.png"}


def test_other_settings_in_the_same_out_dir_are_refused(capsys, prompts, reference, tmp_path):
    out = tmp_path / "conflict"
    assert run(capsys, "batch", prompts, "--out-dir", out, *OPTS)[0] == 0
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.iterdir()}
    code, out_, err = run(capsys, "batch", prompts, "--out-dir", out, *OPTS[:2], "--seed", "5",
                          "--images-per-prompt", str(K))
    assert code == 2 and out_ == ""
    assert err.startswith("diffusion-fast: error: --out-dir")
    assert "already holds 000000-0.png made with other settings (seed 100 there, 5 now)" in err
    assert "and 3 more" in err  # 8 conflicts: the 4 images of the two lines that name a seed are unchanged
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.iterdir()} == before


# -- bad input --------------------------------------------------------------------------------------------------

BAD = [
    ('{"prompt": "3"}', None),
    ('{"prompt": "a banana"}', r"p.jsonl:2: unknown word 'banana'"),
    ('{"prompt": "3", "seed": -1}', r"p.jsonl:3: seed must be in \[0, "),
    ('{"prompt": "3", "steps": "ten"}', r'p.jsonl:4: steps must be an integer, got "ten"'),
    ('{"prompt": "3", "sampler": "magic"}', r'p.jsonl:5: sampler must be one of euler.*; got "magic"'),
    ('{"prompt": "3", "guidance": -2}', r"p.jsonl:6: guidance must be a finite number >= 0, got -2"),
    ('{"prompt": "3", "promt": "4"}', r"p.jsonl:7: unknown field 'promt'; the fields are prompt, negative"),
    ('{"prompt": "3",', r"p.jsonl:8: bad JSON: "),
    ('["3"]', r"p.jsonl:9: must be a JSON object"),
    ('{"prompt": "3", "negative": "kiwi"}', r"p.jsonl:10: negative: unknown word 'kiwi'"),
    ('{"prompt": 3, "steps": 2.5}', r"p.jsonl:11: prompt must be a string, got 3; steps must be an integer"),
]


@pytest.fixture
def bad_prompts(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(line for line, _ in BAD) + "\n")
    return path


def test_bad_lines_are_reported_with_line_numbers_before_any_work(capsys, bad_prompts, tmp_path):
    import re

    out = tmp_path / "never"
    code, stdout, err = run(capsys, "batch", bad_prompts, "--out-dir", out, "--steps", "2")
    assert code == 2 and stdout == ""
    lines = err.strip().split("\n")
    assert all(line.startswith("diffusion-fast: error: ") for line in lines)
    expected = [m for _, m in BAD if m]
    assert len(lines) == len(expected) + 1 and "10 bad lines; nothing was generated" in lines[-1]
    for line, pattern in zip(lines, expected):
        assert re.search(pattern, line), (pattern, line)
    assert not out.exists()


def test_skip_bad_reports_and_makes_the_others(capsys, bad_prompts, tmp_path):
    out = tmp_path / "some"
    code, stdout, err = run(capsys, "batch", bad_prompts, "--out-dir", out, "--steps", "2", "--skip-bad")
    assert code == 0, err
    assert sorted(pngs(out)) == ["000000-0.png"]
    assert err.count("skipped p.jsonl:") == 10 and "10 bad lines skipped" in stdout


def test_nothing_to_make_is_an_error(capsys, tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("\n  \n")
    code, _, err = run(capsys, "batch", path, "--out-dir", tmp_path / "o")
    assert code == 2 and err == "diffusion-fast: error: nothing to make: no usable prompt lines\n"
    assert not (tmp_path / "o").exists()


def test_json_in_a_text_file_gets_a_hint(capsys, tmp_path):
    path = tmp_path / "p.txt"
    path.write_text('{"prompt": "3"}\n')
    code, _, err = run(capsys, "batch", path, "--out-dir", tmp_path / "o")
    assert code == 2 and "name the file .jsonl" in err


@pytest.mark.parametrize("make, match", [
    (lambda d: d / "missing.txt", r"PROMPTS '.*missing.txt': cannot read: No such file"),
    (lambda d: (d / "latin.txt", (d / "latin.txt").write_bytes(b"caf\xe9\n"))[0], r"not UTF-8 text \(byte 0xe9"),
])
def test_unreadable_prompts_file(capsys, tmp_path, make, match):
    import re

    code, _, err = run(capsys, "batch", make(tmp_path), "--out-dir", tmp_path / "o")
    assert code == 2 and re.search(match, err) and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_unwritable_out_dir_is_exit_2_and_writes_nothing(capsys, prompts, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run(capsys, "batch", prompts, "--out-dir", blocker / "sub", *OPTS)
    assert code == 2 and "--out-dir" in err and "is not writable: Not a directory" in err and err.count("\n") == 1
    code, _, err = run(capsys, "batch", prompts, "--out-dir", blocker, *OPTS)
    assert code == 2 and "is not a directory" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.parametrize("model", ["no/such/model", "garbage"])
def test_a_model_that_does_not_load_is_exit_2(capsys, prompts, tmp_path, model):
    if model == "garbage":
        d = tmp_path / "garbage"
        d.mkdir()
        (d / "config.json").write_text('{"format": "diffusion_fast.pipeline/1"}')
        (d / "model.safetensors").write_bytes(b"not a safetensors file")
        model = d
    code, _, err = run(capsys, "batch", prompts, "--out-dir", tmp_path / "o", "--model", model)
    assert code == 2 and err.startswith(f"diffusion-fast: error: --model '{model}' does not load: ")
    assert err.count("\n") == 1 and not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv, match", [
    (["--sampler", "magic"], "sampler must be one of euler, euler_ancestral"),
    (["--batch-size", "0"], "argument --batch-size: must be >= 1"),
    (["--images-per-prompt", "x"], "argument --images-per-prompt: must be an integer"),
    (["--device", "tpu"], "--device 'tpu'"),
    (["--negative", "kiwi"], "negative 'kiwi': unknown word 'kiwi'"),
])
def test_bad_options_are_one_line(capsys, prompts, tmp_path, argv, match):
    code, _, err = run(capsys, "batch", prompts, "--out-dir", tmp_path / "o", *argv)
    assert code == 2 and match in err and err.count("\n") == 1


# -- the Python API ---------------------------------------------------------------------------------------------

def test_seeds_file_names_and_precedence(pipe, tmp_path):
    items = ["3", {"prompt": "4", "seed": 50, "steps": 2, "sampler": "euler", "guidance": 1.5}, {"negative": "3"}]
    s = generate(pipe, items, tmp_path, seed=10, steps=3, sampler="heun", guidance=3.0, negative="0",
                 images_per_prompt=3, progress=False)
    assert s.planned == 9 and s.generated == 9 and s.bad == []
    got = {r["file"]: (r["seed"], r["steps"], r["sampler"], r["guidance"], r["prompt"], r["negative"])
           for r in manifest(tmp_path)}
    assert got == {
        "000000-0.png": (10, 3, "heun", 3.0, "3", "0"), "000000-1.png": (11, 3, "heun", 3.0, "3", "0"),
        "000000-2.png": (12, 3, "heun", 3.0, "3", "0"),
        "000001-0.png": (50, 2, "euler", 1.5, "4", "0"), "000001-1.png": (51, 2, "euler", 1.5, "4", "0"),
        "000001-2.png": (52, 2, "euler", 1.5, "4", "0"),
        "000002-0.png": (16, 3, "heun", 3.0, "", "3"), "000002-1.png": (17, 3, "heun", 3.0, "", "3"),
        "000002-2.png": (18, 3, "heun", 3.0, "", "3"),
    }
    # An item's image is the pipeline's own image for that seed (same bits under batch_invariant()).
    with batch_invariant():
        alone = pipe("4", seed=51, steps=2, sampler="euler", guidance_scale=1.5, negative_prompt="0", progress=False)
    from PIL import Image

    assert Image.open(tmp_path / "000001-1.png").tobytes() == alone.images[0].tobytes()


def test_read_prompts_text_keeps_line_numbers(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes("\ufeff3\r\n\n  a handwritten seven  \n".encode())
    entries = read_prompts(path)
    assert [(e.index, e.where, e.fields) for e in entries] == [
        (0, "p.txt:1", {"prompt": "3"}), (2, "p.txt:3", {"prompt": "a handwritten seven"})]


def test_progress_bar_and_summary_line(pipe, capsys, tmp_path):
    s = generate(pipe, ["3", "7"], tmp_path, steps=2, images_per_prompt=2, progress=True)
    err = capsys.readouterr().err
    assert "batch" in err and "4/4" in err
    line = s.line()
    assert line.startswith(f"wrote 4 images to {tmp_path} in ") and "images/s (cpu); 0 already there" in line
    assert s.ranks[0].images == 4 and s.images_per_second > 0


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(batch_size=0), ValueError, "batch_size must be an int >= 1, got 0"),
    (dict(images_per_prompt=True), ValueError, "images_per_prompt must be an int >= 1"),
    (dict(seed=-3), ValueError, r"seed must be an int in \[0, "),
    (dict(sampler="magic"), ValueError, "sampler must be one of"),
    (dict(steps=0), ValueError, "steps must be >= 1, got 0"),
    (dict(guidance=float("inf")), ValueError, "guidance must be a finite number >= 0, got inf"),
    (dict(negative=3), TypeError, "negative must be a str or None, got int"),
    (dict(items={"prompt": "3"}), TypeError, "items must be a PROMPTS path or a list"),
    (dict(items=["3", 4]), BatchError, r"items\[1\]: must be a str or a dict"),
    (dict(pipe=object()), TypeError, "pipe must be a diffusion_fast Pipeline or a diffusers pipeline"),
])
def test_api_argument_errors(pipe, tmp_path, kwargs, exc, match):
    args = dict(pipe=pipe, items=["3"], out_dir=tmp_path / "o")
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        generate(args.pop("pipe"), args.pop("items"), args.pop("out_dir"), progress=False, **args)
    assert not (tmp_path / "o").exists()


# -- diffusers pipelines ----------------------------------------------------------------------------------------

def test_diffusers_pipeline_images_do_not_depend_on_batch_size(tmp_path):
    pytest.importorskip("diffusers")
    from diffusion_fast.integrations.diffusers.configs import pipeline

    sd = pipeline("sd15")  # tiny random weights; its tokenizer takes any text
    items = [f"a photo of thing {i}" for i in range(4)] + [{"prompt": "a red cube", "negative": "blue"}]
    kw = dict(seed=3, steps=3, guidance=5.0, progress=False)
    a = generate(sd, items, tmp_path / "a", batch_size=5, **kw)
    b = generate(sd, items, tmp_path / "b", batch_size=2, **kw)
    assert a.generated == b.generated == 5
    assert pngs(tmp_path / "a") == pngs(tmp_path / "b") and len(set(pngs(tmp_path / "a").values())) == 5
    recs = manifest(tmp_path / "a")
    assert {r["sampler"] for r in recs} == {"PNDMScheduler"} and recs[4]["negative"] == "blue"
    with pytest.raises(BatchError, match=r"items\[0\]: sampler: a diffusers pipeline samples with its scheduler"):
        generate(sd, [{"prompt": "x", "sampler": "euler"}], tmp_path / "c", progress=False)


# -- what a rank checks before any work -------------------------------------------------------------------------

class _Rank1(batch_mod._World):
    """Rank 1 of 2, receiving ``state`` as rank 0's broadcast (no processes needed)."""

    def __init__(self, state):
        super().__init__(rank=1, size=2)
        self.state = state

    def broadcast(self, obj):
        return self.state

    def all_gather(self, obj):
        return [None, obj]


@pytest.mark.parametrize("case, match", [
    ("unseen", r"rank 1 on .* cannot see .* --out-dir must be a folder every node shares"),
    ("other items", r"rank 1 on .* planned other items \(different PROMPTS or options\)"),
    ("error", r"rank 0 found this"),
])
def test_a_rank_that_cannot_share_the_work_stops_before_any_work(pipe, tmp_path, case, match):
    engine = batch_mod._engine(pipe)
    items, _ = batch_mod._plan(batch_mod._entries(["3", "7"]), engine, seed=0, steps=2, sampler=None, guidance=None,
                               negative=None, images_per_prompt=1)
    digest = batch_mod._digest(items)
    (tmp_path / STATE_DIR).mkdir()
    (tmp_path / STATE_DIR / "run-seen.json").write_text("{}")
    state = {"unseen": {"run": "elsewhere", "todo": [0, 1], "already": 0, "digest": digest},
             "other items": {"run": "seen", "todo": [0, 1], "already": 0, "digest": "0" * 64},
             "error": {"error": ["rank 0 found this"]}}[case]
    with pytest.raises(BatchError, match=match):
        batch_mod._run(engine, items, [], tmp_path, _Rank1(state), 4, True, False)
    assert list(tmp_path.glob("*.png")) == [] and list((tmp_path / STATE_DIR).glob("part-*")) == []
