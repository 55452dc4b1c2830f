"""The benchmark harness itself, on CPU: the ops suite end to end, the results schema, the compare gate and its
exit codes, the plot, the sync counters and the end-to-end suite on the small UNet."""

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
        for impl in ("torch",) + (("eager",) if op != "attention" else ("sdpa_math",)):
            got = [c for c in cases if c["op"] == op and c["impl"] == impl]
            assert len(got) == n, (op, impl, [c["key"] for c in got])
    for c in cases:
        op, set_name, _, dtype, impl = c["key"].split("/")
        assert (op, set_name, dtype, impl) == (c["op"], "tiny", "fp32", c["impl"])
        assert 0 < c["p20_ms"] <= c["median_ms"] <= c["p80_ms"]
        assert c["gbps"] > 0 and c["frac_copy_peak"] > 0 and c["roofline_frac"] > 0
        # every implementation computed the op: fp32 result against the fp32 reference on the same inputs
        assert c["max_abs_err"] < 1e-3, c["key"]
        if c["op"] == "attention":
            assert c["tflops"] > 0 and c["flops"] == 4 * math_prod(c["params"], "B", "H", "Sq", "Sk", "D")
        else:
            assert c["flops"] is None
    gn = next(c for c in cases if c["op"] == "group_norm" and c["impl"] == "torch")
    assert set(gn["speedup"]) == {"eager"}
    assert gn["speedup"]["eager"] == pytest.approx(
        next(c for c in cases if c["key"] == gn["key"].replace("/torch", "/eager"))["median_ms"] / gn["median_ms"])


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


def _doc(medians: dict[str, float], device: str = "Test GPU") -> dict:
    cases = []
    for key, ms in medians.items():
        op, set_name, _, dtype, impl = key.split("/")
        cases.append({"key": key, "suite": "ops", "op": op, "set": set_name, "impl": impl, "kind": "backend",
                      "dtype": dtype, "params": {}, "median_ms": ms, "p20_ms": ms * 0.98, "p80_ms": ms * 1.02,
                      "samples": 10, "speedup": {}})
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
    assert out.strip().splitlines()[-1].startswith("FAIL: 3 shared cases, 1 slower than +5.0%")


def test_compare_passes_on_an_improvement_and_within_threshold(tmp_path, capsys):
    new = dict(BASE, **{"group_norm/sd15/a/bf16/triton": 0.5, "attention/sd15/b/bf16/triton": 2.0 * 1.04})
    rc = main(["compare", _write(tmp_path, "b.json", _doc(BASE)), _write(tmp_path, "n.json", _doc(new)),
               "--max-regression", "5"])
    out = capsys.readouterr().out
    assert rc == 0
    line = next(ln for ln in out.splitlines() if ln.startswith("group_norm/"))
    assert "0.500" in line and "faster" in line
    assert out.strip().splitlines()[-1].startswith("ok: 3 shared cases, 0 slower than +5.0%, 1 faster")
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


def test_e2e_on_cpu_times_eager_and_fast_without_host_reads(tmp_path):
    from diffusion_fast.bench.e2e import run_e2e

    cases, skipped = run_e2e(torch.device("cpu"), torch.float32, config="digits", steps=4, repeats=1)
    assert [c["impl"] for c in cases] == ["eager", "fast"]
    assert skipped == [{"key": cases[0]["key"].replace("/eager", "/fast_graph"),
                        "reason": "CUDA graphs need a CUDA device"}]
    for c in cases:
        assert c["steps_per_s"] == pytest.approx(4 / (c["median_ms"] * 1e-3))
        assert c["scalar_reads_per_step"] == 0  # the loop reads no device value per step
        assert c["params"]["output_finite"]
    assert cases[1]["speedup"]["eager"] == pytest.approx(cases[0]["median_ms"] / cases[1]["median_ms"])
    doc = _doc({})
    doc["suites"], doc["cases"], doc["skipped"] = ["e2e"], cases, skipped
    R.save(doc, tmp_path / "e2e.json")
    assert R.load(tmp_path / "e2e.json")["cases"][1]["key"].endswith("/fp32/fast")
