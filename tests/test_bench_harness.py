"""The benchmark harness itself, on CPU: the ops suite end to end (every case checked against the float64
oracle), the results schema and environment, the noise-aware compare gate and its exit codes, the plot (never
over an input, always complete), merge, the timers, the sync counters and the end-to-end suite on diffusers'
tiny SD1.5 pipeline."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from io import StringIO
from pathlib import Path

import pytest
import torch

from diffusion_fast.bench import results as R
from diffusion_fast.bench.cli import main
from diffusion_fast.bench.compare import compare, parse_threshold
from diffusion_fast.bench.progress import Progress
from diffusion_fast.bench.timing import measure, quantile, rotation_count
from diffusion_fast.ops import registry

REPO = Path(__file__).resolve().parents[1]
FAST_ARGS = ["--device", "cpu", "--budget-ms", "5", "--quick-peaks", "--threads", "1", "--no-progress"]


# ------------------------------------------------------------------------------------------------ ops suite


@pytest.fixture(scope="module")
def ops_doc(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "ops.json"
    rc = main(["ops", *FAST_ARGS, "--json", str(path)])
    assert rc == 0
    return path, json.loads(path.read_text())


def test_bench_ops_cpu_writes_a_valid_results_file(ops_doc):
    path, doc = ops_doc
    R.validate(doc)
    assert R.load(path)["cases"] == doc["cases"]
    env = doc["env"]
    assert env["torch"] == torch.__version__
    assert env["python"] == ".".join(map(str, sys.version_info[:3]))
    assert env["device"]["type"] == "cpu" and env["device"]["name"]
    assert doc["suites"] == ["ops"]
    assert doc["peaks"]["copy_gbps"] > 0 and doc["peaks"]["matmul_tflops"] > 0


def test_bench_ops_covers_every_op_and_baseline_on_every_tiny_shape(ops_doc):
    _, doc = ops_doc
    cases = doc["cases"]
    from diffusion_fast.bench.ops import ATTENTION_SETS, GROUP_NORM_SETS, SAMPLER_STEP_SETS

    n_shapes = {"group_norm": len(GROUP_NORM_SETS["tiny"]), "attention": len(ATTENTION_SETS["tiny"]),
                "sampler_step": len(SAMPLER_STEP_SETS["tiny"])}
    for op, n in n_shapes.items():
        for impl in ("torch", "auto") + (("eager",) if op != "attention" else ("sdpa_math", "sdpa")):
            got = [c for c in cases if c["op"] == op and c["impl"] == impl]
            assert len(got) == n, (op, impl, [c["key"] for c in got])
    for c in cases:
        op, set_name, _, dtype, impl = c["key"].split("/")
        assert (op, set_name, dtype, impl) == (c["op"], "tiny", "fp32", c["impl"])
        assert 0 < c["p20_ms"] <= c["median_ms"] <= c["p80_ms"]
        assert c["gbps"] > 0 and c["frac_copy_peak"] > 0 and c["roofline_frac"] > 0
        # every implementation computed the op: its result against the float64 oracle, within the rule
        assert c["correct"] is True and c["max_abs_err"] <= c["tolerance"] < 1e-3, c["key"]
        assert "graph_median_ms" not in c  # GPU time in a graph is measured on CUDA only
        if c["op"] == "attention":
            assert c["tflops"] > 0 and c["flops"] == 4 * math_prod(c["params"], "B", "H", "Sq", "Sk", "D")
        else:
            assert c["flops"] is None
    gn = next(c for c in cases if c["op"] == "group_norm" and c["impl"] == "torch")
    assert set(gn["speedup"]) == {"eager"}
    assert all(c["params"]["auto_pick"] == "torch" for c in cases if c["impl"] == "auto")  # auto on a CPU
    assert gn["speedup"]["eager"] == pytest.approx(
        next(c for c in cases if c["key"] == gn["key"].replace("/torch", "/eager"))["median_ms"] / gn["median_ms"])


def test_ops_check_catches_a_wrong_result():
    from diffusion_fast.bench.ops import SPECS, check_outputs

    for spec in SPECS.values():
        shape = spec.shapes("tiny", torch.float32)[0]
        t = shape.make(torch.device("cpu"), torch.float32, torch.Generator().manual_seed(0))
        expected = spec.oracle({k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in t.items()})
        got = spec.outputs(spec.call(t, "torch"), t)
        assert check_outputs(spec, got, expected).ok, spec.name
        got[0].mul_(1.01)
        v = check_outputs(spec, got, expected)
        assert not v.ok and v.max_abs_err > v.tolerance and "first mismatches" in v.detail, spec.name
        got[0].view(-1)[0] = float("nan")  # an element never written
        assert check_outputs(spec, got, expected).max_abs_err == float("inf")


def math_prod(d, *names):
    out = 1
    for n in names:
        out *= d[n]
    return out


def test_bench_ops_records_why_implementations_did_not_run(ops_doc):
    _, doc = ops_doc
    reasons = {s["key"]: s["reason"] for s in doc["skipped"]}
    for op in ("group_norm", "attention", "sampler_step"):
        assert f"{op}/*/*/fp32/compile" in reasons
        for name, why in registry.status(op).items():
            key = f"{op}/*/*/fp32/{name}"
            if why is not None:
                assert reasons[key] == why
            elif name == "triton":  # tests run Triton in its interpreter on CPU
                assert "interpreter" in reasons[key]
    # torch's memory-efficient and cuDNN SDPA kernels do not exist on CPU: each shape says so
    eff = [k for k in reasons if k.startswith("attention/tiny/") and k.endswith("/sdpa_efficient")]
    assert len(eff) == 2 and all("RuntimeError" in reasons[k] for k in eff)


def test_bench_ops_restricts_to_named_ops_and_implementations(tmp_path):
    path = tmp_path / "gn.json"
    assert main(["ops", *FAST_ARGS, "--ops", "group_norm", "--impls", "torch", "--json", str(path)]) == 0
    doc = R.load(path)
    assert {c["op"] for c in doc["cases"]} == {"group_norm"}
    assert {c["impl"] for c in doc["cases"]} == {"torch"}


@pytest.mark.parametrize("args, message", [
    (["ops", "--device", "cpu", "--sets", "huge"], "unknown shape set 'huge'"),
    (["ops", "--device", "cpu", "--ops", "conv"], "unknown op 'conv'"),
    (["ops", "--device", "tpu"], "--device"),
    (["ops", "--device", "cpu", "--threads", "0"], "--threads must be >= 1"),
])
def test_bench_ops_bad_arguments_exit_2_with_one_line(args, message, capsys):
    assert main([*args, "--budget-ms", "1", "--quick-peaks"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


# ------------------------------------------------------------------------------------------------ schema


def _doc(medians: dict[str, float], device: str = "Test GPU", noise: dict[str, float] | None = None) -> dict:
    """A results document with one case per key; each case's p20/p80 spread by ``noise[key]`` (default 1%)."""
    cases = []
    for key, ms in medians.items():
        op, set_name, _, dtype, impl = key.split("/")
        half = (noise or {}).get(key, 0.01) / 2
        cases.append({"key": key, "suite": "ops", "op": op, "set": set_name, "impl": impl, "kind": "backend",
                      "dtype": dtype, "params": {}, "median_ms": ms, "p20_ms": ms * (1 - half),
                      "p80_ms": ms * (1 + half), "samples": 10, "speedup": {}})
    return {"schema": R.SCHEMA, "created": "2026-01-01T00:00:00+00:00", "suites": ["ops"],
            "env": {"python": "3.12.0", "torch": "2.11.0", "triton": "3.6.0", "cuda": "13.0", "driver": None,
                    "git_commit": None, "platform": "Linux", "device": {"type": "cuda", "name": device,
                                                                          "memory_bytes": 80 << 30}},
            "config": {}, "peaks": {"copy_gbps": 3000.0, "matmul_tflops": 700.0, "matmul_dtype": "bfloat16"},
            "cases": cases, "skipped": []}


BASE = {"group_norm/sd15/a/bf16/triton": 1.0, "attention/sd15/b/bf16/triton": 2.0,
        "sampler_step/sd15/c/bf16/cuda": 0.5}


def _mutate(path: str, value):
    def apply(doc):
        parts = path.split(".")
        obj = doc
        for p in parts[:-1]:
            obj = obj[int(p)] if p.isdigit() else obj[p]
        last = parts[-1]
        if value is _DELETE:
            del obj[last]
        else:
            obj[int(last) if last.isdigit() else last] = value
    return apply


_DELETE = object()


@pytest.mark.parametrize("path, value, field", [
    ("schema", "diffusion-fast-bench/0", "schema"),
    ("schema", _DELETE, "schema"),
    ("env.device.name", _DELETE, "env.device.name"),
    ("peaks.copy_gbps", 0.0, "peaks.copy_gbps"),
    ("cases.0.median_ms", -1.0, "cases[0].median_ms"),
    ("cases.0.median_ms", "1.0", "cases[0].median_ms"),
    ("cases.1.p20_ms", 5.0, "cases[1]"),
    ("cases.1.key", "group_norm/sd15/a/bf16/triton", "cases[1].key"),
    ("cases.2.kind", "fast", "cases[2].kind"),
    ("cases.2.speedup", {"eager": "x"}, "cases[2].speedup"),
    ("cases.2.graph_speedup", {"eager": None}, "cases[2].graph_speedup"),
    ("cases.0.correct", "yes", "cases[0].correct"),
    ("cases.0.graph_median_ms", -2.0, "cases[0].graph_median_ms"),
    ("cases.0.samples", 0, "cases[0].samples"),
    ("suites", ["ops", "training"], "suites"),
    ("skipped", [{"key": "x"}], "skipped[0].reason"),
])
def test_validate_names_the_bad_field(path, value, field):
    doc = _doc(BASE)
    R.validate(copy.deepcopy(doc))
    _mutate(path, value)(doc)
    with pytest.raises(R.SchemaError) as info:
        R.validate(doc)
    assert str(info.value).startswith(f"results.{field}")


def test_validate_rejects_non_objects():
    with pytest.raises(R.SchemaError, match="expected a JSON object"):
        R.validate([1, 2])


# ------------------------------------------------------------------------------------------------ compare


def _write(tmp_path: Path, name: str, doc) -> str:
    p = tmp_path / name
    p.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return str(p)


def test_compare_fails_on_a_synthetic_regression(tmp_path, capsys):
    new = dict(BASE, **{"attention/sd15/b/bf16/triton": 2.0 * 1.08})
    rc = main(["compare", _write(tmp_path, "b.json", _doc(BASE)), _write(tmp_path, "n.json", _doc(new)),
               "--max-regression", "5%"])
    out = capsys.readouterr().out
    assert rc == 1
    first = out.splitlines()[1]  # worst ratio first
    assert first.startswith("attention/sd15/b/bf16/triton") and "1.080" in first and "SLOWER" in first
    assert out.strip().splitlines()[-1].startswith("FAIL: 3 shared cases, 1 slower than +5.0% or 2 x noise")


def test_compare_passes_on_an_improvement_and_within_threshold(tmp_path, capsys):
    new = dict(BASE, **{"group_norm/sd15/a/bf16/triton": 0.5, "attention/sd15/b/bf16/triton": 2.0 * 1.04})
    rc = main(["compare", _write(tmp_path, "b.json", _doc(BASE)), _write(tmp_path, "n.json", _doc(new)),
               "--max-regression", "5"])
    out = capsys.readouterr().out
    assert rc == 0
    line = next(ln for ln in out.splitlines() if ln.startswith("group_norm/"))
    assert "0.500" in line and "faster" in line
    assert out.strip().splitlines()[-1].startswith("ok: 3 shared cases, 0 slower than +5.0% or 2 x noise, 1 faster")
    # the same 4% slowdown fails a tighter gate
    assert main(["compare", str(tmp_path / "b.json"), str(tmp_path / "n.json"), "--max-regression", "3%"]) == 1


def test_compare_lists_one_sided_cases_without_failing(tmp_path, capsys):
    base = dict(BASE, **{"attention/sdxl/gone/bf16/sdpa_math": 9.0})
    new = dict(BASE, **{"attention/sd15/b/bf16/cuda": 3.0})  # a new backend, even slow, is not a regression
    rc = main(["compare", _write(tmp_path, "b.json", _doc(base)), _write(tmp_path, "n.json", _doc(new))])
    out = capsys.readouterr().out
    assert rc == 0
    assert "only in base (not compared):\n  attention/sdxl/gone/bf16/sdpa_math" in out
    assert "only in new (not compared):\n  attention/sd15/b/bf16/cuda" in out
    cmp = compare(_doc(base), _doc(new), 0.05)
    assert [r.key for r in cmp.rows] and len(cmp.rows) == 3 and not cmp.regressions


def test_compare_notes_different_devices(tmp_path, capsys):
    rc = main(["compare", _write(tmp_path, "b.json", _doc(BASE, "H100")), _write(tmp_path, "n.json",
                                                                                 _doc(BASE, "H200"))])
    assert rc == 0
    assert "base ran on 'H100' and new on 'H200'" in capsys.readouterr().out


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    ("{not json", "not JSON"),
    (json.dumps({"schema": "something-else"}), "schema: expected 'diffusion-fast-bench/1'"),
    (json.dumps([1, 2, 3]), "expected a JSON object"),
])
def test_compare_bad_files_exit_2_with_a_one_line_error(tmp_path, capsys, content, message):
    good = _write(tmp_path, "good.json", _doc(BASE))
    bad = str(tmp_path / "bad.json") if content is None else _write(tmp_path, "bad.json", content)
    for args in ([bad, good], [good, bad]):
        assert main(["compare", *args]) == 2
        cap = capsys.readouterr()
        lines = cap.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0] and "bad.json" in lines[0]
        assert cap.out == ""


@pytest.mark.parametrize("text", ["-5%", "abc", "nan", "inf%"])
def test_compare_rejects_bad_thresholds(tmp_path, capsys, text):
    good = _write(tmp_path, "good.json", _doc(BASE))
    assert main(["compare", good, good, "--max-regression", text]) == 2
    assert "--max-regression" in capsys.readouterr().err


def test_parse_threshold_reads_percentages():
    assert parse_threshold("5%") == pytest.approx(0.05)
    assert parse_threshold("2.5") == pytest.approx(0.025)
    assert parse_threshold("0%") == 0.0


def test_compare_plot_draws_regressions_in_red(tmp_path, capsys):
    from PIL import Image

    new = dict(BASE, **{"attention/sd15/b/bf16/triton": 3.0, "group_norm/sd15/a/bf16/triton": 0.5})
    png = tmp_path / "cmp.png"
    rc = main(["compare", _write(tmp_path, "b.json", _doc(BASE)), _write(tmp_path, "n.json", _doc(new)),
               "--plot", str(png)])
    assert rc == 1 and f"plot written to {png}" in capsys.readouterr().out
    img = Image.open(png)
    assert img.format == "PNG"
    colors = {c for _, c in img.convert("RGB").getcolors(1 << 20)}
    assert (200, 40, 40) in colors and (40, 150, 60) in colors  # one slower bar, one faster bar


def test_compare_plot_unwritable_path_exits_2(tmp_path, capsys):
    good = _write(tmp_path, "good.json", _doc(BASE))
    assert main(["compare", good, good, "--plot", str(tmp_path / "no" / "such" / "dir" / "x.png")]) == 2
    assert "--plot" in capsys.readouterr().err


def test_compare_judges_each_case_against_its_measured_noise(tmp_path, capsys):
    noisy = "attention/sd15/b/bf16/triton"
    noise = {noisy: 0.12}  # its repeats spread by 12%: an 8% slowdown is within 2 x that noise
    new = dict(BASE, **{noisy: 2.0 * 1.08, "group_norm/sd15/a/bf16/triton": 1.0 * 1.08})
    b, n = _write(tmp_path, "b.json", _doc(BASE, noise=noise)), _write(tmp_path, "n.json", _doc(new, noise=noise))
    assert main(["compare", b, n]) == 1
    out = capsys.readouterr().out
    quiet = next(ln for ln in out.splitlines() if ln.startswith("group_norm/"))
    loud = next(ln for ln in out.splitlines() if ln.startswith(noisy))
    assert "SLOWER" in quiet and "5.0%" in quiet  # a quiet case is held to the flat threshold
    assert "SLOWER" not in loud and "12.0%" in loud and "24.0%" in loud  # noise 12%, limit 2 x 12%
    assert "1 case(s) vary more than the flat threshold" in out
    cmp = compare(_doc(BASE, noise=noise), _doc(new, noise=noise), 0.05, noise_k=0)
    assert {r.key for r in cmp.regressions} == {noisy, "group_norm/sd15/a/bf16/triton"}  # flat gate: both fail
    assert main(["compare", b, n, "--noise-k", "-1"]) == 2 and "--noise-k" in capsys.readouterr().err


def test_compare_plot_never_overwrites_an_input_file(tmp_path, capsys):
    b, n = _write(tmp_path, "b.json", _doc(BASE)), _write(tmp_path, "n.json", _doc(BASE))
    before = Path(b).read_bytes()
    for target in (b, n, str(tmp_path / "." / "b.json")):
        assert main(["compare", b, n, "--plot", target]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "refusing to overwrite" in err
    assert Path(b).read_bytes() == before and R.load(n)
    link = tmp_path / "link.png"
    link.symlink_to(b)  # a .png name that is the input file itself
    assert main(["compare", b, n, "--plot", str(link)]) == 2
    assert Path(b).read_bytes() == before


@pytest.mark.parametrize("name", ["x.txt", "x.json", "x", "x.jpg"])
def test_compare_plot_refuses_a_path_that_is_not_png(tmp_path, capsys, name):
    good = _write(tmp_path, "good.json", _doc(BASE))
    assert main(["compare", good, good, "--plot", str(tmp_path / name)]) == 2
    assert "ending in .png" in capsys.readouterr().err
    assert not (tmp_path / name).exists()


def test_compare_plot_is_written_atomically(tmp_path, monkeypatch, capsys):
    from PIL import Image

    from diffusion_fast.bench import plot

    good = _write(tmp_path, "good.json", _doc(BASE))
    png = tmp_path / "cmp.png"
    png.write_bytes(b"an older plot")
    assert main(["compare", good, good, "--plot", str(png)]) == 0
    assert Image.open(png).format == "PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cmp.png", "good.json"]  # no temporary file left

    def broken(cmp):  # drawing fails half way: the existing file must stay as it was
        raise OSError("disk full")

    before = png.read_bytes()
    monkeypatch.setattr(plot, "render_comparison", broken)
    assert main(["compare", good, good, "--plot", str(png)]) == 2
    assert png.read_bytes() == before and "disk full" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cmp.png", "good.json"]


def test_compare_deeply_nested_json_is_a_one_line_error(tmp_path, capsys):
    good = _write(tmp_path, "good.json", _doc(BASE))
    deep = _write(tmp_path, "deep.json", "[" * 200_000 + "]" * 200_000)
    assert main(["compare", good, deep]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nested too deeply" in err[0] and "deep.json" in err[0]


def test_merge_joins_runs_of_one_machine(tmp_path, capsys):
    a = _doc({"group_norm/sd15/a/bf16/triton": 1.0})
    b = _doc({"attention/sd15/b/bf16/triton": 2.0})
    b["suites"] = ["e2e"]
    out = tmp_path / "all.json"
    assert main(["merge", _write(tmp_path, "a.json", a), _write(tmp_path, "b.json", b), "--json", str(out)]) == 0
    doc = R.load(out)
    assert [c["key"] for c in doc["cases"]] == ["group_norm/sd15/a/bf16/triton", "attention/sd15/b/bf16/triton"]
    assert doc["suites"] == ["ops", "e2e"] and [p["file"] for p in doc["config"]["parts"]] == ["a.json", "b.json"]
    capsys.readouterr()
    other = _doc({"attention/sd15/c/bf16/triton": 2.0}, device="Other GPU")
    assert main(["merge", str(tmp_path / "a.json"), _write(tmp_path, "o.json", other), "--json", str(out)]) == 2
    assert "one machine" in capsys.readouterr().err
    assert main(["merge", str(tmp_path / "a.json"), str(tmp_path / "a.json"), "--json", str(out)]) == 2
    assert "already in an earlier file" in capsys.readouterr().err
    assert main(["merge", str(tmp_path / "a.json"), "--json", str(tmp_path / "a.json")]) == 2


def test_results_record_commit_host_and_write_atomically(tmp_path, monkeypatch):
    env = R.environment(torch.device("cpu"))
    assert len(env["git_commit"]) == 40 and all(ch in "0123456789abcdef" for ch in env["git_commit"])
    host = env["host"]
    assert host["cpu"] and host["logical_cpus"] >= 1 and host["torch_threads"] >= 1
    # A copy of the tree without .git (as a GPU machine receives it): the commit the caller passed on.
    monkeypatch.setattr(R, "_run", lambda cmd: None)
    monkeypatch.setenv("GIT_COMMIT", "0123abc")
    assert R.git_commit() == ("0123abc", None)
    monkeypatch.delenv("GIT_COMMIT")
    assert R.git_commit() == ("unknown", None)  # neither a checkout nor a commit passed on
    target = tmp_path / "r.json"
    target.write_text("old")
    with pytest.raises(R.SchemaError):
        R.save({"schema": "wrong"}, target)  # an invalid document never replaces a file
    assert target.read_text() == "old"


def test_show_prints_the_summary_of_a_results_file(ops_doc, capsys):
    path, doc = ops_doc
    assert main(["show", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(doc["env"]["device"]["name"])
    assert "group_norm/tiny/2x64x8x8-g32-silu/fp32" in out


def test_python_m_entry_point_runs_the_same_cli(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "diffusion_fast.bench", "compare", str(tmp_path / "a.json"),
                           str(tmp_path / "b.json")], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2
    assert "no such file" in proc.stderr


# ------------------------------------------------------------------------------------------------ pieces


def test_quantile_matches_linear_interpolation():
    import numpy as np

    vals = [5.0, 1.0, 4.0, 2.0, 3.0, 10.0]
    for q in (0.0, 0.2, 0.5, 0.8, 1.0):
        assert quantile(vals, q) == pytest.approx(float(np.quantile(vals, q)))
    with pytest.raises(ValueError):
        quantile([], 0.5)


def test_measure_cycles_through_every_input_set():
    calls = [0, 0, 0]
    fns = [lambda i=i: calls.__setitem__(i, calls[i] + 1) for i in range(3)]
    t = measure(fns, torch.device("cpu"), budget_ms=2, min_samples=3, max_samples=5, sample_ms=0.01)
    assert t.input_sets == 3 and t.calls_per_sample % 3 == 0 and 3 <= t.samples <= 5
    assert calls[0] == calls[1] == calls[2]
    assert t.p20_ms <= t.median_ms <= t.p80_ms


def test_rotation_count_exceeds_the_cache_within_memory():
    assert rotation_count(1 << 20, 50 << 20, max_total_bytes=1 << 30) == 16
    assert rotation_count(40 << 20, 50 << 20, max_total_bytes=1 << 30) == 4
    assert rotation_count(1 << 30, 50 << 20, max_total_bytes=1 << 30) == 1
    assert rotation_count(100 << 20, 50 << 20, max_total_bytes=150 << 20) == 1


def test_progress_writes_only_to_terminals():
    s = StringIO()
    p = Progress(2, enabled=True, stream=s)
    p.step("group_norm/sd15")
    p.close()
    assert "[1/2" in s.getvalue() and "group_norm/sd15" in s.getvalue()
    quiet = StringIO()  # not a TTY: the default is silence
    p = Progress(2, stream=quiet)
    p.step("x")
    p.close()
    assert quiet.getvalue() == ""


def test_scalar_read_counter_sees_item_and_device_reads():
    from diffusion_fast.bench.e2e import ScalarReadCounter

    x = torch.randn(4)
    with ScalarReadCounter() as c:
        float(x.sum())
        x.max().item()
        y = x * 2
        if bool(y[0] > 0):
            pass
    assert c.count == 3


# ------------------------------------------------------------------------------------------------ e2e


@pytest.fixture(scope="module")
def tiny_ctx():
    """diffusers' tiny SD1.5 pipeline with random weights and its inputs (built once: importing diffusers and
    building the pipeline is most of an e2e test's time). Tests copy it with ``dataclasses.replace``."""
    from diffusion_fast.bench.e2e import build_context

    return build_context("sd15-tiny", torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def e2e_run(tiny_ctx):
    """One run: the stock pipeline, our UNet with the same weights, and the compile recipe (dynamo with the
    eager backend: the recipe's plumbing without Inductor's compile time)."""
    import dataclasses

    from diffusion_fast.bench.e2e import run_e2e

    ctx = dataclasses.replace(tiny_ctx, compile_cap_s=300, compile_backend="eager")
    return run_e2e(torch.device("cpu"), torch.float32, steps=4, repeats=2, context=ctx,
                   variants=["diffusers_eager", "diffusers_graph", "diffusers_compile", "ours_eager", "ours_fast",
                             "ours_fast_graph", "ours_fast_cl", "df_kernels", "df_fused_graph"])


def test_e2e_times_every_variant_that_runs_on_a_cpu(e2e_run, tmp_path):
    from diffusion_fast.bench.e2e import _df_api

    cases, skipped = e2e_run
    by = {c["impl"]: c for c in cases}
    df_runs = _df_api()[1] is None
    assert set(by) == {"diffusers_eager", "diffusers_compile", "ours_eager", "ours_fast", "ours_fast_cl"} | (
        {"df_kernels"} if df_runs else set())
    reasons = {s["key"].rsplit("/", 1)[1]: s["reason"] for s in skipped}
    for name in ("diffusers_graph", "ours_fast_graph", "df_fused_graph"):
        assert reasons[name] == "needs a CUDA device (CUDA graphs)"
    if not df_runs:  # the integration is not importable here: recorded, never faked
        assert reasons["df_kernels"].startswith("not available: ")
    for c in cases:
        assert c["key"].startswith("e2e/sd15-tiny/b1-cfg-16x16-dpmsolver++2m-4steps/fp32/")
        assert c["family"] == c["impl"].split("_")[0] and c["samples"] == 2 and len(c["params"]["times_ms"]) == 2
        assert c["steps_per_s"] == pytest.approx(4 / (c["median_ms"] * 1e-3))
        assert c["ms_per_image"] == c["median_ms"] and c["spread"] is not None
        if c["impl"] != "diffusers_compile":  # compiled code cannot run under the counting dispatch mode
            assert c["scalar_reads_per_step"] == 0, c["impl"]  # no variant reads a device value per step
        assert c["params"]["output_finite"]
        assert c["kind"] == ("baseline" if c["family"] == "diffusers" else "variant")
    eager = by["diffusers_eager"]
    for name in ("ours_eager", "ours_fast", "ours_fast_cl", "diffusers_compile"):
        c = by[name]
        # same weights, same inputs, same schedule: the same trajectory to float32 rounding
        assert c["params"]["rel_l2_diff"] < 1e-4, (name, c["params"]["rel_l2_diff"])
        assert c["vs_diffusers_eager"] == pytest.approx(eager["median_ms"] / c["median_ms"])
        assert c["speedup"]["diffusers_eager"] == pytest.approx(eager["median_ms"] / c["median_ms"])
    assert eager["params"]["rel_l2_diff"] == 0.0
    comp = by["diffusers_compile"]["params"]
    assert comp["compile_mode"] == comp["compile_mode_requested"] == "max-autotune-no-cudagraphs"
    assert comp["compile_backend"] == "eager" and by["diffusers_compile"]["compile_s"] >= 0
    best = min((c for c in cases if c["impl"] != "ours_eager" and c["family"] != "df"), key=lambda c: c["median_ms"])
    assert by["ours_eager"]["best_baseline"] == best["impl"]  # the fastest non-df variant other than itself
    doc = _doc({})
    doc["suites"], doc["cases"], doc["skipped"] = ["e2e"], cases, skipped
    R.save(doc, tmp_path / "e2e.json")
    assert R.load(tmp_path / "e2e.json")["cases"][0]["impl"] == "diffusers_eager"
    from diffusion_fast.bench.summary import summary_table

    table = summary_table(R.load(tmp_path / "e2e.json"))
    assert "e2e sd15-tiny" in table and "ours_fast" in table and "df_fused_graph: needs a CUDA device" in table


def test_e2e_compile_falls_back_to_a_cheaper_mode_and_says_so(monkeypatch, tiny_ctx):
    import dataclasses

    from diffusion_fast.bench import e2e

    ctx = dataclasses.replace(tiny_ctx, compile_cap_s=60, compile_backend="eager")
    real = e2e.E2EContext.compile

    def slow_recipe(self, module, mode, *, in_place=False):
        if mode == "max-autotune-no-cudagraphs":
            raise e2e._CompileTimeout()  # what the cap's alarm raises when the compile outlives it
        return module  # "default" mode: compiled instantly (the plumbing, not the compiler, is under test)

    monkeypatch.setattr(e2e.E2EContext, "compile", slow_recipe)
    cases, skipped = e2e.run_e2e(torch.device("cpu"), torch.float32, steps=4, repeats=1,
                                 variants=["diffusers_compile"], context=ctx)
    p = cases[0]["params"]
    assert p["compile_mode"] == "default" and p["compile_mode_requested"] == "max-autotune-no-cudagraphs"
    assert p["attempts"] == {"max-autotune-no-cudagraphs": "compile did not finish within the 60 s cap"}
    monkeypatch.setattr(e2e.E2EContext, "compile", lambda self, m, mode, in_place=False: (_ for _ in ()).throw(
        e2e._CompileTimeout()))
    cases, skipped = e2e.run_e2e(torch.device("cpu"), torch.float32, steps=4, repeats=1,
                                 variants=["diffusers_compile"], context=ctx)
    assert cases == [] and "did not run" in skipped[0]["reason"] and "default: compile did not finish" in \
        skipped[0]["reason"]  # never dropped silently
    monkeypatch.setattr(e2e.E2EContext, "compile", real)
    ctx.compile_cap_s = 0
    cases, skipped = e2e.run_e2e(torch.device("cpu"), torch.float32, steps=4, repeats=1,
                                 variants=["diffusers_compile"], context=ctx)
    assert cases == [] and "compile cap 0 s" in skipped[0]["reason"]


def test_e2e_cap_interrupts_a_long_call():
    import time

    from diffusion_fast.bench import e2e

    t0 = time.perf_counter()
    with pytest.raises(e2e._CompileTimeout):
        with e2e._cap(0.2):
            while time.perf_counter() - t0 < 5:
                pass
    assert time.perf_counter() - t0 < 2


@pytest.mark.parametrize("args, message", [
    (["--variants", "fast"], "unknown variant 'fast'"),
    (["--compile-mode", "fastest"], "unknown mode 'fastest'"),
    (["--steps", "2"], "--steps must be >= 4"),
    (["--graph-methods", "stable-fast"], "unknown method 'stable-fast'"),
    (["--compile-cap", "-1"], "--compile-cap"),
])
def test_bench_e2e_bad_arguments_exit_2_before_measuring(args, message, capsys):
    assert main(["e2e", "--device", "cpu", "--model", "sd15-tiny", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_measure_graph_needs_cuda():
    from diffusion_fast.bench.timing import measure_graph

    with pytest.raises(ValueError, match="CUDA"):
        measure_graph([lambda: None], torch.device("cpu"))


def test_a_time_limit_records_what_did_not_run_and_still_writes(tmp_path, tiny_ctx):
    import time

    path = tmp_path / "ops.json"
    assert main(["ops", *FAST_ARGS, "--ops", "group_norm", "--time-limit", "1e-9", "--json", str(path)]) == 1
    doc = R.load(path)  # written although nothing was measured in time
    assert doc["cases"] == [] and doc["config"]["time_limit_s"] == 1e-9
    assert all("time limit" in s["reason"] for s in doc["skipped"] if s["key"].startswith("group_norm/tiny/"))
    from diffusion_fast.bench.e2e import run_e2e

    cases, skipped = run_e2e(torch.device("cpu"), torch.float32, steps=4, repeats=1, context=tiny_ctx,
                             variants=["diffusers_eager", "ours_eager"], deadline=time.perf_counter())
    assert cases == [] and [s["reason"] for s in skipped] == ["not run: this run's time limit (--time-limit) "
                                                              "was reached"] * 2


def test_diffusers_graph_keeps_the_faster_method_and_records_the_other():
    from diffusion_fast.bench.e2e import _pick_graph_method

    def case(method, ms):
        return {"impl": "diffusers_graph", "key": f"e2e/sd15/x/bf16/diffusers_graph@{method}", "median_ms": ms,
                "params": {"graph_method": method}}

    cases = [{"impl": "diffusers_eager", "key": "e2e/sd15/x/bf16/diffusers_eager", "median_ms": 9.0, "params": {}},
             case("cuda_graph", 5.0), case("reduce-overhead", 4.0)]
    _pick_graph_method(cases, ("cuda_graph", "reduce-overhead"))
    assert [c["key"] for c in cases] == ["e2e/sd15/x/bf16/diffusers_eager", "e2e/sd15/x/bf16/diffusers_graph"]
    g = cases[1]["params"]
    assert g["graph_method"] == "reduce-overhead" and g["candidates"] == {"cuda_graph": "5.000 ms",
                                                                          "reduce-overhead": "4.000 ms"}
    cases = [case("cuda_graph", 5.0)]
    _pick_graph_method(cases, ("cuda_graph",))
    assert cases[0]["params"]["candidates"]["reduce-overhead"].startswith("not measured")


# ------------------------------------------------------------------------------------------------ transformers


def test_cli_model_names_are_the_e2e_models():
    from diffusion_fast.bench import cli
    from diffusion_fast.bench.e2e import MODELS

    assert cli.E2E_MODELS == MODELS


@pytest.fixture(scope="module")
def flux_run():
    """diffusers' tiny Flux pipeline with 2 double- and 3 single-stream blocks (the config's own: 1 and 1), built
    through the meta-device path, every variant asked for (the compile recipe through dynamo's eager backend)."""
    import dataclasses

    from diffusion_fast.bench.e2e import VARIANT_NAMES, build_context, run_e2e

    ctx = build_context("flux-tiny", torch.device("cpu"), torch.float32, blocks=(2, 3))
    ctx = dataclasses.replace(ctx, compile_cap_s=300, compile_backend="eager")
    return ctx, run_e2e(torch.device("cpu"), torch.float32, steps=4, repeats=2, context=ctx, variants=VARIANT_NAMES)


def test_e2e_flux_runs_every_variant_a_cpu_can_and_says_why_not_the_others(flux_run):
    from diffusion_fast.bench.e2e import _df_api

    ctx, (cases, skipped) = flux_run
    by = {c["impl"]: c for c in cases}
    df_runs = _df_api()[1] is None
    assert set(by) == {"diffusers_eager", "diffusers_compile"} | ({"df_kernels", "df_fused"} if df_runs else set())
    reasons = {s["key"].rsplit("/", 1)[1]: s["reason"] for s in skipped}
    assert set(reasons) | set(by) == {
        "diffusers_eager", "diffusers_graph", "diffusers_compile", "ours_eager", "ours_fast", "ours_fast_graph",
        "ours_fast_cl", "ours_fast_graph_cl", "df_kernels", "df_fused", "df_fused_graph", "df_fused_graph_compile"}
    for name in ("ours_eager", "ours_fast", "ours_fast_graph", "ours_fast_cl", "ours_fast_graph_cl"):
        assert reasons[name] == ("not available: our own network is a UNet; flux-tiny runs FluxTransformer2DModel "
                                 "(ours_* do not apply; df_* run it)")
    for name in ("diffusers_graph", "df_fused_graph", "df_fused_graph_compile"):
        assert reasons[name] in ("needs a CUDA device (CUDA graphs)",) or reasons[name].startswith("not available: ")
    assert reasons["diffusers_graph"] == "needs a CUDA device (CUDA graphs)"
    prefix = "e2e/flux-tiny/b1-guidance-32x32-flowmatch_euler-4steps-blocks2+3/fp32/"
    eager = by["diffusers_eager"]
    for c in cases:
        p = c["params"]
        assert c["key"] == prefix + c["impl"] and c["samples"] == 2 and p["output_finite"]
        assert p["blocks"] == {"num_layers": 2, "num_single_layers": 3} and p["full_depth"] is False
        assert p["blocks_published"] == {"num_layers": 19, "num_single_layers": 38}
        assert (p["image_tokens"], p["text_tokens"], p["heads"], p["head_dim"]) == (64, 7, 2, 16)
        assert p["cfg_batch"] == 1 and p["guidance"] == "guidance embedding" and p["guidance_scale"] == 3.5
        assert p["scheduler"] == "FlowMatchEulerDiscreteScheduler" and p["latent"] == [1, 64, 16]
        assert p["denoiser"] == "diffusers FluxTransformer2DModel" and "unet" not in p
        if c["impl"] != "diffusers_compile":
            assert c["scalar_reads_per_step"] == 0, c["impl"]
        # the same weights and inputs: every variant follows diffusers_eager's trajectory to float32 rounding
        assert p["rel_l2_diff"] < 1e-5, (c["impl"], p["rel_l2_diff"])
        if c is not eager:
            assert c["vs_diffusers_eager"] == pytest.approx(eager["median_ms"] / c["median_ms"])
    assert eager["params"]["rel_l2_diff"] == 0.0
    assert "fuse_qkv_projections" in by["diffusers_compile"]["params"]["recipe"]
    if df_runs:  # optimize() served every attention module of the transformer, and its calls
        for name in ("df_kernels", "df_fused"):
            p = by[name]["params"]
            assert p["attention_modules_on_df"] == "5/5" and p["attention_calls_on_df"] > 0
            assert p["attention_calls_on_stock"] == 0
    den = ctx.denoiser
    assert (den.config.num_layers, den.config.num_single_layers) == (2, 3)
    assert all(t.device.type == "cpu" for t in den.parameters())  # nothing left on the meta device


def test_e2e_flux_results_file_and_summary(flux_run, tmp_path):
    from diffusion_fast.bench.summary import summary_table

    _, (cases, skipped) = flux_run
    doc = _doc({})
    doc["suites"], doc["cases"], doc["skipped"] = ["e2e"], cases, skipped
    R.save(doc, tmp_path / "flux.json")
    table = summary_table(R.load(tmp_path / "flux.json"))
    assert "e2e flux-tiny: b1-guidance-32x32-flowmatch_euler-4steps-blocks2+3" in table
    assert "flux-tiny/ours_fast: not available: our own network is a UNet" in table
    assert "e2e variants whose output is not finite" in table and "diffusers_compile" in table


def test_e2e_a_variant_that_writes_the_shared_transformer_weights_fails_the_run(monkeypatch):
    from diffusion_fast.bench import e2e

    ctx = e2e.build_context("flux-tiny", torch.device("cpu"), torch.float32)

    def rogue(ctx, mode):
        pipe = ctx.fresh_pipeline()
        next(pipe.transformer.parameters()).data.mul_(1.5)  # through .data: invisible to the version counter
        return e2e._pipe_runner(ctx, pipe)

    table = tuple(dataclass_replace(v, setup=rogue) if v.name == "df_kernels" else v for v in e2e.VARIANTS)
    monkeypatch.setattr(e2e, "VARIANTS", table)
    with pytest.raises(RuntimeError, match="df_kernels changed the shared weights of the flux-tiny transformer"):
        e2e.run_e2e(torch.device("cpu"), torch.float32, steps=4, repeats=1, context=ctx,
                    variants=["diffusers_eager", "df_kernels"])


def dataclass_replace(obj, **kw):
    import dataclasses

    return dataclasses.replace(obj, **kw)


def test_e2e_sd3_tiny_runs_with_classifier_free_guidance():
    from diffusion_fast.bench.e2e import run_e2e

    cases, skipped = run_e2e(torch.device("cpu"), torch.float32, model="sd3-tiny", steps=4, repeats=1,
                             variants=["diffusers_eager", "diffusers_compile", "df_kernels", "ours_fast"],
                             compile_cap_s=300, compile_backend="eager")
    c = cases[0]
    assert c["key"] == "e2e/sd3-tiny/b1-cfg-16x16-flowmatch_euler-4steps-blocks2/fp32/diffusers_eager"
    assert c["params"]["cfg_batch"] == 2 and c["params"]["guidance_scale"] == 7.0 and c["params"]["output_finite"]
    assert c["params"]["blocks"] == {"num_layers": 2} and c["params"]["image_tokens"] == 64
    assert {case["impl"] for case in cases} >= {"diffusers_eager", "diffusers_compile"}
    for case in cases:  # the recipe's fused QKV projections included: the same trajectory to float32 rounding
        assert case["params"]["rel_l2_diff"] < 1e-5, case["impl"]
    assert [s["reason"].startswith("not available: our own network is a UNet") for s in skipped] == [True]


@pytest.mark.parametrize("model, blocks, message", [
    ("sd15-tiny", (2,), "sd15-tiny is a UNet; block counts apply to the transformer models (flux, sd3)"),
    ("flux", (4,), "flux takes 2 count(s) (num_layers, num_single_layers), got 1"),
    ("flux", (20, 8), "num_layers must be an integer from 1 to 19"),
    ("sd3-tiny", (0,), "num_layers must be an integer from 1 to 24"),
    ("flux", (4, 2.5), "num_single_layers must be an integer from 1 to 38"),
])
def test_e2e_block_counts_are_checked(model, blocks, message):
    from diffusion_fast.bench.e2e import check_blocks

    with pytest.raises(ValueError, match=re_escape(message)):
        check_blocks(model, blocks)
    assert check_blocks("flux", (19, 38)) == {"num_layers": 19, "num_single_layers": 38}
    assert check_blocks("flux", None) == {}


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


@pytest.mark.parametrize("args, message", [
    (["--model", "flux-tiny", "--blocks", "1,x"], "--blocks: expected comma-separated integers, got '1,x'"),
    (["--model", "flux-tiny", "--blocks", "1,39"], "--blocks: num_single_layers must be an integer from 1 to 38"),
    (["--model", "sd15-tiny", "--blocks", "2"], "--blocks: sd15-tiny is a UNet"),
])
def test_bench_e2e_bad_blocks_exit_2_before_measuring(args, message, capsys):
    assert main(["e2e", "--device", "cpu", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


# ------------------------------------------------------------------------------------------------ fast init


def test_fast_init_draws_seeded_weights_on_the_device_at_fan_in_scale():
    from diffusion_fast.integrations.diffusers import configs

    def build(seed, dtype=torch.float32, init="fast"):
        return configs.pipeline("sd3", "tiny", init=init, seed=seed, dtype=dtype).transformer

    a, b, c = build(0), build(0), build(1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # same seed, same weights
    assert not torch.equal(sa["pos_embed.proj.weight"], sc["pos_embed.proj.weight"])
    # buffers are computed, not drawn: SD3's sin-cos position table equals the module-init build's
    assert torch.equal(sa["pos_embed.pos_embed"], build(0, init="module").state_dict()["pos_embed.pos_embed"])
    assert torch.nn.Module.register_parameter.__name__ == "register_parameter"  # the builder's patch is undone
    lin = a.transformer_blocks[0].ff.net[2]  # [32, 128]: N(0, 1/128)
    assert lin.weight.std().item() == pytest.approx(128 ** -0.5, rel=0.1)
    assert lin.weight.mean().abs().item() < 0.01
    for p in a.parameters():
        assert p.device.type == "cpu" and p.dtype == torch.float32 and torch.isfinite(p).all()
    flux = configs.pipeline("flux", "tiny", init="fast", dtype=torch.bfloat16).transformer
    norm = flux.transformer_blocks[0].attn.norm_q.weight  # RMSNorm weight: 1 + N(0, 0.1^2), not exactly one
    assert norm.dtype == torch.bfloat16 and 0.0 < (norm.float() - 1).abs().max().item() < 0.5
    # a bf16 forward of the drawn model stays finite and of order one
    kw = dict(hidden_states=torch.randn(1, 16, 16, dtype=torch.bfloat16),
              encoder_hidden_states=torch.randn(1, 7, 32, dtype=torch.bfloat16),
              pooled_projections=torch.randn(1, 32, dtype=torch.bfloat16), timestep=torch.tensor([0.5]),
              guidance=torch.tensor([3.5]), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(7, 3), return_dict=False)
    with torch.no_grad():
        out = flux(**kw)[0]
    assert torch.isfinite(out).all() and 0.05 < out.float().std().item() < 20


def test_fast_init_keeps_tied_parameters_tied():
    from diffusion_fast.integrations.diffusers import configs

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(8, 8)
            self.b = torch.nn.Linear(8, 8)
            self.b.weight = self.a.weight

    with configs._parameters_on_meta():
        m = Tied()
    assert m.a.weight.device.type == "meta"
    configs.fill_random(m, seed=0, dtype=torch.float32, device="cpu")
    assert m.b.weight is m.a.weight and m.a.weight.device.type == "cpu"


@pytest.mark.parametrize("kw, message", [
    (dict(init="lazy"), "init must be one of module, fast; got 'lazy'"),
    (dict(overrides={"num_blocks": 2}), "overrides: 'num_blocks' is not a key of this denoiser's config"),
])
def test_pipeline_builder_rejects_bad_init_and_overrides(kw, message):
    from diffusion_fast.integrations.diffusers import configs

    with pytest.raises(ValueError, match=re_escape(message)):
        configs.pipeline("flux", "tiny", **kw)


# ------------------------------------------------------------------------------------------------ dit op shapes


def test_dit_set_holds_the_flux_and_sd3_joint_attention_shapes():
    from diffusion_fast.bench.ops import SETS, shapes

    assert "dit" in SETS
    att = {s.name: s.params for s in shapes("attention", "dit", torch.bfloat16)}
    assert att["joint-b1-h24-s4096+512-d128"] == {"B": 1, "Sq": 4608, "Sk": 4608, "H": 24, "D": 128, "kind": "joint",
                                                  "layout": "BSHD", "image_tokens": 4096, "text_tokens": 512}
    assert att["joint-b2-h24-s4096+333-d64"]["Sq"] == 4429 and att["joint-b2-h24-s4096+333-d64"]["H"] == 24
    assert shapes("group_norm", "dit", torch.bfloat16) == []  # DiTs have no GroupNorm
    assert [s.name for s in shapes("sampler_step", "dit", torch.bfloat16)] == ["1x16x128x128-cfg-k1"]


def _tiny_dit(entry):
    """The same batch, heads and head dim, image and text tokens divided by 64 (at least 5 text tokens) and the
    joint length made odd: an odd sequence no kernel tile divides, as 4429 is."""
    B, Sq, _, H, D, text = entry
    t = max(5, text // 64)
    s = (Sq - text) // 64 + t
    if s % 2 == 0:
        t, s = t + 1, s + 1
    return (B, s, s, H, D, t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("index", [0, 1], ids=["flux", "sd3"])
def test_dit_attention_cases_check_against_the_oracle_on_a_tiny_version(index, dtype, monkeypatch):
    from diffusion_fast.bench import ops
    from diffusion_fast.bench.peaks import measure_peaks

    entry = ops.ATTENTION_SETS["dit"][index]
    tiny = _tiny_dit(entry)
    assert tiny[1] % 2 == 1 and tiny[3:5] == entry[3:5]
    monkeypatch.setitem(ops.ATTENTION_SETS, "dit", [tiny])
    run = ops.run_ops(torch.device("cpu"), dtype, ops=["attention"], sets=["dit"], budget_ms=1.0,
                      peaks=measure_peaks(torch.device("cpu"), quick=True))
    got = {c["impl"]: c for c in run.cases}
    assert {"torch", "sdpa", "auto", "sdpa_math"} <= set(got), sorted(got)
    for c in run.cases:
        assert c["params"]["kind"] == "joint" and c["params"]["Sq"] == tiny[1]
        assert c["correct"] is True and c["max_abs_err"] <= c["tolerance"], (c["key"], c["max_abs_err"])


@pytest.mark.parametrize("index", [0, 1], ids=["flux", "sd3"])
def test_dit_attention_triton_kernel_against_the_oracle_on_a_tiny_version(index):
    """Our Triton kernel (the interpreter here) at the dit head dims and an odd joint length; the compiled
    kernels and CUDA are checked on these shapes, full size, by the GPU run's op phase."""
    from diffusion_fast import ops as dfops
    from diffusion_fast.bench import ops
    from diffusion_fast.kernels.reference import oracle

    if dfops.registry.status("attention").get("triton") is not None:
        pytest.skip(f"triton: {dfops.registry.status('attention')['triton']}")
    B, S, _, _, D, _ = _tiny_dit(ops.ATTENTION_SETS["dit"][index])
    g = torch.Generator().manual_seed(index)
    q, k, v = (torch.randn(1, S, 2, D, generator=g) for _ in range(3))  # 2 heads: the interpreter is slow
    out = dfops.attention(q, k, v, backend="triton")
    scale = D ** -0.5
    oracle.assert_close(out, oracle.attention(q, k, v, scale), oracle.attention_lowp(q, k, v, scale),
                        what=f"triton dit d{D} s{S}")
