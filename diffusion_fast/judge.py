"""The digits judge: a classifier trained on real handwritten digits that reads generated ones.

    from diffusion_fast.judge import DigitsJudge
    judge = DigitsJudge.load()
    labels = judge.predict(pixels)          # pixels [N, 64] or [N, 1, 8, 8] on the data's 0..16 scale

It is the support-vector classifier of ``train/evaluate_digits.py`` (scikit-learn's SVC, RBF kernel, trained
on 70% of scikit-learn's 1,797 real 8x8 digits), exported by ``train/export_judge.py`` to
``weights/judge/digits_svc.safetensors`` and evaluated here in float64 torch, so scikit-learn is not needed
at run time and nothing is unpickled. It is independent of the diffusion model: it never saw a generated
digit.

The decision rule is libsvm's one-vs-one vote: for every pair of classes ``(i, j)``, ``i < j``,

    f_ij(x) = sum_{k in SV(i)} a[j-1, k] K(x, s_k) + sum_{k in SV(j)} a[i, k] K(x, s_k) + b_ij,
    K(x, s) = exp(-gamma * |x - s|^2)

votes for ``i`` when ``f_ij(x) > 0`` and for ``j`` otherwise; the label is the class with the most votes
(the lowest class on a tie), as scikit-learn's ``SVC.predict``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

FORMAT = "diffusion_fast.judge/1"
JUDGE_PATH = Path(__file__).resolve().parent / "weights" / "judge" / "digits_svc.safetensors"
_TENSORS = ("support_vectors", "dual_coef", "intercept", "n_support", "classes", "gamma")


class DigitsJudge:
    """One-vs-one RBF support-vector classifier (float64, CPU).

    Args:
        support_vectors: ``[S, F]`` float64, grouped by class in class order.
        dual_coef: ``[C - 1, S]`` float64 (libsvm's layout).
        intercept: ``[C (C - 1) / 2]`` float64, pairs in the order (0,1), (0,2), ..., (1,2), ...
        n_support: ``[C]`` int64, support vectors per class.
        classes: ``[C]`` int64 labels.
        gamma: the RBF kernel's gamma.
        metadata: provenance (recipe, held-out accuracy, scikit-learn version).
    """

    def __init__(self, support_vectors: torch.Tensor, dual_coef: torch.Tensor, intercept: torch.Tensor,
                 n_support: torch.Tensor, classes: torch.Tensor, gamma: float,
                 metadata: Optional[dict[str, str]] = None) -> None:
        C, S = int(classes.numel()), int(support_vectors.shape[0])
        if (support_vectors.dim() != 2 or tuple(dual_coef.shape) != (C - 1, S)
                or intercept.numel() != C * (C - 1) // 2 or n_support.numel() != C or int(n_support.sum()) != S):
            raise ValueError(f"inconsistent judge parameters: support_vectors {tuple(support_vectors.shape)}, "
                             f"dual_coef {tuple(dual_coef.shape)}, intercept {tuple(intercept.shape)}, "
                             f"n_support {n_support.tolist()}, {C} classes")
        self.support_vectors = support_vectors.to(torch.float64)
        self.classes = classes.to(torch.int64)
        self.gamma = float(gamma)
        self.metadata = dict(metadata or {})
        self.num_features = int(support_vectors.shape[1])
        # Dense [S, pairs] weights: column p holds a[j-1, k] for the SVs of class i and a[i, k] for those of j.
        starts = [0] + torch.cumsum(n_support, 0).tolist()
        pairs = [(i, j) for i in range(C) for j in range(i + 1, C)]
        w = torch.zeros(S, len(pairs), dtype=torch.float64)
        for p, (i, j) in enumerate(pairs):
            w[starts[i]:starts[i + 1], p] = dual_coef[j - 1, starts[i]:starts[i + 1]]
            w[starts[j]:starts[j + 1], p] = dual_coef[i, starts[j]:starts[j + 1]]
        self._w = w
        self._b = intercept.to(torch.float64).reshape(-1)
        self._first = torch.tensor([i for i, _ in pairs])
        self._second = torch.tensor([j for _, j in pairs])

    @classmethod
    def load(cls, path: Union[str, Path, None] = None) -> DigitsJudge:
        """Read a judge written by ``train/export_judge.py`` (default: the one shipped with the package)."""
        from safetensors import safe_open

        path = JUDGE_PATH if path is None else Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"judge weights {str(path)!r} not found")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path}: format must be {FORMAT!r}, got {meta.get('format')!r}")
            missing = [k for k in _TENSORS if k not in f.keys()]
            if missing:
                raise ValueError(f"{path}: missing tensors {missing}")
            t = {k: f.get_tensor(k) for k in _TENSORS}
        return cls(t["support_vectors"], t["dual_coef"], t["intercept"], t["n_support"], t["classes"],
                   float(t["gamma"]), meta)

    @property
    def held_out_accuracy(self) -> Optional[float]:
        """Accuracy on the real digits held out from its training (recorded at export), if known."""
        v = self.metadata.get("held_out_accuracy")
        return None if v is None else float(v)

    def _features(self, x: Union[torch.Tensor, np.ndarray]) -> torch.Tensor:
        x = torch.as_tensor(x)
        if not (x.is_floating_point() or x.dtype in (torch.uint8, torch.int16, torch.int32, torch.int64)):
            raise TypeError(f"pixels must be a real tensor or array, got dtype {x.dtype}")
        if x.dim() < 2 or math.prod(x.shape[1:]) != self.num_features:
            raise ValueError(f"pixels must be [N, {self.num_features}] or [N, 1, 8, 8] (N images of "
                             f"{self.num_features} values each), got {tuple(x.shape)}")
        x = x.detach().to("cpu", torch.float64).reshape(-1, self.num_features)
        if not bool(torch.isfinite(x).all()):
            raise ValueError("pixels contain NaN or infinity")
        return x

    def decision_function(self, x: Union[torch.Tensor, np.ndarray]) -> torch.Tensor:
        """One-vs-one decision values: pixels ``[N, 64]`` (0..16 scale) -> ``[N, C (C - 1) / 2]`` float64,
        in scikit-learn's ``decision_function_shape="ovo"`` order."""
        x = self._features(x)
        out = []
        for chunk in x.split(256):  # [n, S, F] differences, a few MB per chunk
            d2 = (chunk[:, None, :] - self.support_vectors[None]).square().sum(-1)
            out.append(torch.exp(-self.gamma * d2) @ self._w + self._b)
        return torch.cat(out) if out else torch.empty(0, self._w.shape[1], dtype=torch.float64)

    def predict(self, x: Union[torch.Tensor, np.ndarray]) -> torch.Tensor:
        """Labels ``[N]`` int64 for pixels ``[N, 64]`` or ``[N, 1, 8, 8]`` on the data's 0..16 scale."""
        dec = self.decision_function(x)
        winner = torch.where(dec > 0, self._first, self._second)  # [N, pairs]
        votes = torch.zeros(dec.shape[0], self.classes.numel(), dtype=torch.int64)
        votes.scatter_add_(1, winner, torch.ones_like(winner))
        # argmax returns the first maximum, libsvm's tie rule.
        return self.classes[votes.argmax(1)]

    def accuracy(self, x: Union[torch.Tensor, np.ndarray], labels: Union[torch.Tensor, np.ndarray]) -> float:
        """Fraction of ``x`` ([N, 64] pixels) labelled as ``labels`` ([N])."""
        labels = torch.as_tensor(labels).reshape(-1).to(torch.int64)
        pred = self.predict(x)
        if labels.numel() != pred.numel():
            raise ValueError(f"labels has {labels.numel()} entries for {pred.numel()} images")
        return float((pred == labels).double().mean()) if labels.numel() else float("nan")
