"""The shipped digits judge (torch, safetensors) against the scikit-learn SVC it was exported from."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import diffusion_fast.judge as judge_mod
from diffusion_fast.judge import FORMAT, JUDGE_PATH, DigitsJudge

TRAIN = Path(__file__).resolve().parents[1] / "train"


@pytest.fixture(scope="module")
def judge() -> DigitsJudge:
    return DigitsJudge.load()


@pytest.fixture(scope="module")
def reference():
    """The classifier train/export_judge.py exports: evaluate_digits.train_classifier, refitted here with
    scikit-learn, with its held-out split."""
    pytest.importorskip("sklearn")
    sys.path.insert(0, str(TRAIN))
    try:
        from evaluate_digits import real_digits, train_classifier
    finally:
        sys.path.remove(str(TRAIN))
    clf, held_out = train_classifier()
    _, xte, _, yte = real_digits()
    return clf, held_out, xte, yte


def test_shipped_judge_is_small_safetensors_with_provenance(judge):
    assert JUDGE_PATH.stat().st_size < 1_000_000
    assert judge.metadata["format"] == FORMAT and judge.metadata["command"] == "python train/export_judge.py"
    assert "SVC(kernel='rbf', gamma='scale', C=10.0)" in judge.metadata["recipe"]
    assert judge.held_out_accuracy >= 0.97


def test_judge_is_read_without_pickle():
    src = inspect.getsource(judge_mod)
    assert "torch.load" not in src and "pickle" not in src.replace("unpickled", "") and "import sklearn" not in src


def test_labels_and_decision_values_match_scikit_learn(judge, reference):
    clf, _, xte, _ = reference
    rng = np.random.default_rng(0)
    off_distribution = np.concatenate([rng.uniform(0, 16, (300, 64)),                       # noise
                                       np.clip(xte[:200] + rng.normal(0, 3, (200, 64)), 0, 16)])  # noisy digits
    for x in (xte, off_distribution):
        assert np.array_equal(judge.predict(x).numpy(), clf.predict(x))
        clf.decision_function_shape = "ovo"
        ref = clf.decision_function(x)
        got = judge.decision_function(torch.from_numpy(x)).numpy()
        assert got.shape == ref.shape == (len(x), 45)
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-9)


def test_held_out_accuracy_is_the_recorded_one(judge, reference):
    _, held_out, xte, yte = reference
    acc = judge.accuracy(xte, yte)
    assert acc == pytest.approx(held_out, abs=1e-12)
    assert f"{acc:.6f}" == judge.metadata["held_out_accuracy"]
    assert acc >= 0.97


def test_input_forms(judge, reference):
    _, _, xte, _ = reference
    x = torch.from_numpy(xte[:7])
    labels = judge.predict(x)
    assert labels.dtype == torch.int64 and labels.shape == (7,)
    assert torch.equal(judge.predict(x.reshape(7, 1, 8, 8).float()), labels)  # float32 images: exact 0..16
    assert torch.equal(judge.predict(x.to(torch.uint8)), labels)
    assert judge.predict(torch.empty(0, 64)).shape == (0,)


@pytest.mark.parametrize("x, err, match", [
    (torch.zeros(3, 63), ValueError, r"pixels must be \[N, 64\]"),
    (torch.zeros(2, 1, 7, 7), ValueError, r"got \(2, 1, 7, 7\)"),
    (torch.zeros(64), ValueError, r"got \(64,\)"),
    (torch.full((1, 64), float("nan")), ValueError, "NaN or infinity"),
    (torch.zeros(1, 64, dtype=torch.bool), TypeError, "pixels must be a real tensor"),
])
def test_bad_pixels(judge, x, err, match):
    with pytest.raises(err, match=match):
        judge.predict(x)


def test_accuracy_needs_one_label_per_image(judge):
    with pytest.raises(ValueError, match="labels has 2 entries for 3 images"):
        judge.accuracy(torch.zeros(3, 64), [1, 2])


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        DigitsJudge.load(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    save_file({"gamma": torch.tensor(1.0)}, str(bad), metadata={"format": "other"})
    with pytest.raises(ValueError, match="format must be"):
        DigitsJudge.load(bad)
    save_file({"gamma": torch.tensor(1.0)}, str(bad), metadata={"format": FORMAT})
    with pytest.raises(ValueError, match="missing tensors"):
        DigitsJudge.load(bad)
