"""Noise sources for the stochastic samplers: k-diffusion's ``noise_sampler(sigma, sigma_next)`` contract.

:class:`BrownianTreeNoiseSampler` gives what k-diffusion's class of that name gives (``torchsde`` not needed):
one Brownian path ``W`` over ``t = transform(sigma)`` and, for a call ``(sigma, sigma_next)``, the increment
``(W(t1) - W(t0)) / sqrt(|t1 - t0|)``, a standard normal tensor of ``x``'s shape. Because every increment comes
from the same path, the noise a sampler injects between two noise levels does not depend on how many steps
it takes to get there: a stochastic sampler's result changes little when the step count changes, where
fresh ``randn`` draws would give a different picture for every step count.

The path is a *virtual Brownian tree* on the dyadic grid of ``[t_lo, t_hi]`` at a fixed depth ``L``: the value
at the right end is ``sqrt(t_hi - t_lo) * xi_root``, and the value at the midpoint of a dyadic interval
``[a, b]`` is the Brownian bridge ``(W(a) + W(b)) / 2 + sqrt((b - a) / 4) * xi_node``, where ``xi_node`` is a
standard normal drawn from a generator seeded by ``(seed, node)`` alone. ``W`` at a query point is ``W`` at
the nearest grid point, reached by descending the tree; so the value at a point never depends on which
other points were asked for, in which order, or how many (the defining property; torchsde's tree has it only
up to its tolerance). Queries are snapped to the grid (spacing ``(t_hi - t_lo) / 2^L``, by default at most
``1e-7 * t_lo``), and increments are normalised by the snapped length, so each is exactly ``N(0, 1)``.

Evaluating a point costs one ``randn`` of ``x``'s shape per tree level below the part of the path it shares
with the previous query (the last path is cached); nothing reads a device value, so calling it inside the
sampling loop does not synchronise, and the CUDA-graph path calls it before each replay.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Optional, Union

import torch

_MASK64 = (1 << 64) - 1


def _mix(*words: int) -> int:
    """A 63-bit seed from integers (SplitMix64 finaliser over each word in turn)."""
    z = 0x9E3779B97F4A7C15
    for w in words:
        z = (z ^ (w & _MASK64)) & _MASK64
        z = (z + 0x9E3779B97F4A7C15) & _MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        z ^= z >> 31
    return z >> 1


def _as_seed(v: object, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    return int(v)


class BrownianTreeNoiseSampler:
    """A noise sampler backed by one Brownian path (k-diffusion's ``BrownianTreeNoiseSampler`` contract).

    Args:
        x: ``[B, ...]`` tensor whose shape, device and dtype the noise takes (float32 or float64).
        sigma_min, sigma_max: the range of noise levels the sampler will ask about (k-diffusion passes the
            smallest nonzero sigma and the largest); ``transform`` maps it to the path's time interval.
        seed: an int, or one int per batch item (then item ``b`` of every draw depends on ``seed[b]`` only,
            so it does not change with the batch size or order). None: a seed from torch's default CPU
            generator (:func:`seed_from`).
        transform: sigma -> the path's time (default: the identity, as k-diffusion).
        depth: tree depth ``L`` (grid spacing ``(t_hi - t_lo) / 2^L``), 1..62. Default: the smallest that keeps
            the spacing at most ``1e-7 * t_lo`` (at least 16; 62 when ``t_lo`` is 0).

    Calling it: ``ns(sigma, sigma_next)`` (floats or 0-dim tensors) returns ``[B, ...]`` noise.
    """

    def __init__(self, x: torch.Tensor, sigma_min: float, sigma_max: float,
                 seed: Union[int, Sequence[int], None] = None,
                 transform: Optional[Callable[[float], float]] = None, depth: Optional[int] = None) -> None:
        if not isinstance(x, torch.Tensor) or x.dtype not in (torch.float32, torch.float64) or x.dim() < 1:
            raise TypeError("x must be a float32 or float64 tensor [B, ...] (the shape, device and dtype of the "
                            f"noise), got {type(x).__name__}" + (f" {x.dtype}" if isinstance(x, torch.Tensor) else ""))
        self.shape, self.device, self.dtype = tuple(x.shape), x.device, x.dtype
        self.transform = transform if transform is not None else (lambda s: s)
        t_a, t_b = self._t(sigma_min, "sigma_min"), self._t(sigma_max, "sigma_max")
        if t_a == t_b:
            raise ValueError(f"sigma_min and sigma_max must map to different times, got {sigma_min} and {sigma_max}")
        self.t_lo, self.t_hi = min(t_a, t_b), max(t_a, t_b)
        span = self.t_hi - self.t_lo
        if depth is None:
            depth = 62 if self.t_lo <= 0 else min(62, max(16, math.ceil(math.log2(span / (1e-7 * self.t_lo)))))
        if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= 62:
            raise ValueError(f"depth must be an int in 1..62, got {depth!r}")
        self.depth = depth
        if seed is None:
            seed = seed_from(None)
        if isinstance(seed, (list, tuple)):
            if len(seed) != self.shape[0]:
                raise ValueError(f"seed holds {len(seed)} values; x has batch size {self.shape[0]} (one per item)")
            self.seeds = [_as_seed(s, "seed[i]") for s in seed]
        else:
            self.seeds = [_as_seed(seed, "seed")]
        self._span = span
        root = self._normal(1 << depth) * math.sqrt(span)
        self._path: list[tuple[int, int, torch.Tensor, torch.Tensor]] = [(0, 1 << depth, torch.zeros_like(root), root)]

    def _t(self, sigma, name: str) -> float:
        if isinstance(sigma, torch.Tensor):
            if sigma.numel() != 1:
                raise ValueError(f"{name} must be a single value, got shape {tuple(sigma.shape)}")
            sigma = sigma.item()  # host-side; the loop passes Python floats
        t = float(self.transform(float(sigma)))
        if not math.isfinite(t):
            raise ValueError(f"{name}={sigma} maps to a non-finite time {t}")
        return t

    def _normal(self, node: int) -> torch.Tensor:
        """The standard normal of one tree node, float64, [*shape]."""
        outs = []
        per_item = len(self.seeds) > 1
        shape = self.shape[1:] if per_item else self.shape
        for s in self.seeds:
            g = torch.Generator(device=self.device)
            g.manual_seed(_mix(s, node))
            outs.append(torch.randn(shape, generator=g, device=self.device, dtype=torch.float64))
        return torch.stack(outs) if per_item else outs[0]

    def _index(self, t: float, name: str) -> int:
        if not self.t_lo - 1e-12 * self._span <= t <= self.t_hi + 1e-12 * self._span:
            raise ValueError(f"{name} maps to t={t}, outside the tree's interval [{self.t_lo}, {self.t_hi}]; build "
                             "the noise sampler over the sigma range the sampler uses")
        k = round((t - self.t_lo) / self._span * (1 << self.depth))
        return min(max(k, 0), 1 << self.depth)

    def _w(self, k: int) -> torch.Tensor:
        """W at grid index k (float64), descending from the deepest cached interval that contains k."""
        path = self._path
        while not path[-1][0] <= k <= path[-1][1]:
            path.pop()
        while True:
            a, b, wa, wb = path[-1]
            if k == a:
                return wa
            if k == b:
                return wb
            m = (a + b) // 2
            wm = 0.5 * (wa + wb) + math.sqrt(self._span * (b - a) / (1 << self.depth) / 4.0) * self._normal(m)
            path.append((a, m, wa, wm) if k <= m else (m, b, wm, wb))

    def __call__(self, sigma, sigma_next) -> torch.Tensor:
        """``[B, ...]`` standard normal: the path's increment between the two noise levels, normalised."""
        k0 = self._index(self._t(sigma, "sigma"), "sigma")
        k1 = self._index(self._t(sigma_next, "sigma_next"), "sigma_next")
        if k0 == k1:
            raise ValueError(f"sigma={sigma} and sigma_next={sigma_next} fall on the same point of the tree's grid "
                             f"(spacing {self._span / (1 << self.depth):.3g}); pass a larger depth")
        lo, hi = min(k0, k1), max(k0, k1)
        w_lo = self._w(lo)
        w_hi = self._w(hi)
        sign = 1.0 if k1 > k0 else -1.0
        return (sign * (w_hi - w_lo) / math.sqrt(self._span * (hi - lo) / (1 << self.depth))).to(self.dtype)


def seed_from(generator: Optional[torch.Generator]) -> int:
    """A tree seed that follows ``generator`` without reading a device value: a hash of its state (a CPU
    tensor even for a CUDA generator), after which the generator is advanced by one draw on its own device,
    so the next call gets another seed. None: torch's default CPU generator."""
    import hashlib

    g = generator if generator is not None else torch.default_generator
    digest = hashlib.blake2b(g.get_state().numpy().tobytes(), digest_size=8).digest()
    torch.empty((), device=g.device).normal_(generator=g)
    return int.from_bytes(digest, "little") >> 2


def brownian_for_plan(x: torch.Tensor, draws: Sequence[tuple[int, float, float]],
                      generator) -> BrownianTreeNoiseSampler:
    """The tree ``sample(..., noise_sampler="brownian")`` uses: over the range of every noise level the plan's
    draws name, seeded by :func:`seed_from` ``(generator)`` (a list of generators: row ``b`` by ``generator[b]``)."""
    levels = [v for _, s0, s1 in draws for v in (s0, s1) if v > 0]
    lo, hi = (min(levels), max(levels)) if levels else (1.0, 2.0)
    if lo == hi:
        lo = hi / 2
    if isinstance(generator, (list, tuple)):  # one generator per row: one tree seed per row
        return BrownianTreeNoiseSampler(x, lo, hi, seed=[seed_from(g) for g in generator])
    return BrownianTreeNoiseSampler(x, lo, hi, seed=seed_from(generator))
