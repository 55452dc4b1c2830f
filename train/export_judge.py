"""Export the digits judge (the classifier of ``train/evaluate_digits.py``) as safetensors for the package.

    python train/export_judge.py        # writes diffusion_fast/weights/judge/digits_svc.safetensors

The judge is the scikit-learn SVC (RBF kernel, gamma="scale", C=10) that ``evaluate_digits.train_classifier``
fits on a fixed stratified 70% of scikit-learn's real 8x8 digits. Its parameters (support vectors, dual
coefficients, intercepts, gamma, the class of every support vector) are written as float64/int64 tensors;
``diffusion_fast.judge.DigitsJudge`` evaluates them in torch, so ``diffusion-fast explain`` needs neither
scikit-learn nor pickle at run time. Deterministic: the split is fixed and the SVC fit has no randomness,
so a rerun writes the same tensors (safetensors may order the metadata keys differently in the header).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from evaluate_digits import real_digits, train_classifier  # noqa: E402

from diffusion_fast.judge import FORMAT, JUDGE_PATH  # noqa: E402

RECIPE = ("sklearn.svm.SVC(kernel='rbf', gamma='scale', C=10.0) fitted on a stratified 70% split "
          "(random_state=0) of sklearn.datasets.load_digits; held-out accuracy on the other 30%")


def export(path: Path = JUDGE_PATH) -> float:
    """Fit the judge, write its parameters to ``path``; returns its held-out accuracy."""
    import sklearn

    clf, held_out = train_classifier()
    _, xte, _, yte = real_digits()
    tensors = {
        "support_vectors": torch.from_numpy(np.ascontiguousarray(clf.support_vectors_, dtype=np.float64)),
        "dual_coef": torch.from_numpy(np.ascontiguousarray(clf.dual_coef_, dtype=np.float64)),
        "intercept": torch.from_numpy(np.ascontiguousarray(clf.intercept_, dtype=np.float64)),
        "n_support": torch.from_numpy(np.ascontiguousarray(clf.n_support_, dtype=np.int64)),
        "classes": torch.from_numpy(np.ascontiguousarray(clf.classes_, dtype=np.int64)),
        "gamma": torch.tensor(float(clf._gamma), dtype=torch.float64),
    }
    metadata = {
        "format": FORMAT,
        "recipe": RECIPE,
        "held_out_accuracy": f"{held_out:.6f}",
        "held_out_images": str(len(yte)),
        "scikit_learn": sklearn.__version__,
        "command": "python train/export_judge.py",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)
    return held_out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=JUDGE_PATH, help=f"output file (default {JUDGE_PATH})")
    args = p.parse_args(argv)
    held_out = export(args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes); held-out accuracy {held_out:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
