"""Synthetic image corruptions with CIFAR-10-C's constants, batched and keyed per sample.

``corrupt(x, name, severity, seed=..., keys=..., segment=...)`` applies one corruption of
Hendrycks & Dietterich (2019) at severity 1-5 to a batch ``(N, C, H, W)`` of float images in
[0, 1] (C in {1, 3}, H, W >= 8), with the constants of the CIFAR-10-C generator
(``make_cifar_c.py``). Everything runs as batched torch ops on ``x``'s device; only JPEG goes
through ``torchvision.io`` one image at a time.

Randomness is counter-based: every random number is a fixed integer hash of
``(seed, segment, corruption purpose code, keys[i], stream, element index)``. A sample's noise
therefore depends only on its own key, never on the batch it is in, its position, the device
RNG or any global RNG (none is touched). The severity is deliberately *not* hashed, so the same
sample sees the same underlying noise at every severity and only the amplitude changes.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

__all__ = ["CORRUPTIONS", "DEFAULT_ORDER", "EXTRA", "corrupt"]

# --------------------------------------------------------------------------------------------
# Counter-based random numbers
# --------------------------------------------------------------------------------------------

_M32 = 0xFFFFFFFF
_LANE_INIT = (0x243F6A88, 0x85A308D3)  # digits of pi: two independent 32-bit hash lanes
_CHUNK_ELEMENTS = 1 << 20  # samples are processed in chunks of about this many values


def _mul32(x: Any, c: int) -> Any:
    """``(x * c) mod 2**32`` for ``0 <= x < 2**32``, exact in int64.

    The constant is split into 16-bit halves so no product exceeds 2**48: torch's int64
    multiply would wrap on overflow, but relying on that is relying on undefined behaviour in
    the C++ kernels. Works on Python ints and int64 tensors alike.
    """
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _hash32(x: Any) -> Any:
    """A bijective 32-bit integer mixer (xorshift-multiply, "lowbias32" constants).

    Values stay in ``[0, 2**32)`` held in int64, so ``>>`` is a logical shift.
    """
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


class _CounterRNG:
    """Per-sample random numbers addressed by (stream, element) instead of a running state.

    Each sample gets a 64-bit key (two 32-bit lanes) from a hash chain over
    ``(seed, segment, purpose, stream, keys[i])``; element ``j`` of a stream is
    ``hash(hash(lane0 ^ mix(j)) ^ lane1)``, ``mix`` being a fixed scrambling of the index.
    Two lanes make key collisions between samples ~2**-64 events; within one lane the chain
    is injective in a key below 2**32.
    """

    def __init__(self, seed: int, segment: int, purpose: int, keys: torch.Tensor) -> None:
        self.prefix = (seed & _M32, seed >> 32, segment & _M32, segment >> 32, purpose)
        self.keys = keys.to(torch.int64)

    def bits(self, stream: int, shape: Sequence[int]) -> torch.Tensor:
        """Uniform 32-bit integers (in int64) of shape ``(N, *shape)``."""
        key_lo, key_hi = self.keys & _M32, (self.keys >> 32) & _M32
        lanes = []
        for init in _LANE_INIT:
            h = init
            for word in (*self.prefix, stream):
                h = _hash32(h ^ word)
            lanes.append(_hash32(_hash32(key_lo ^ h) ^ key_hi))
        n = math.prod(shape)
        j = torch.arange(n, device=self.keys.device, dtype=torch.int64)
        j = _hash32(_hash32(j ^ 0x9E3779B9))
        out = _hash32(lanes[0][:, None] ^ j[None, :])
        out = _hash32(out ^ lanes[1][:, None])
        return out.view(len(self.keys), *shape)

    def uniform(
        self, stream: int, shape: Sequence[int], dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Uniform floats in the open interval (0, 1): 24 bits for float32, 32 for float64."""
        b = self.bits(stream, shape)
        if dtype == torch.float64:
            return (b.to(torch.float64) + 0.5) * 2.0**-32
        return ((b >> 8).to(torch.float32) + 0.5) * 2.0**-24

    def normal(self, stream: int, shape: Sequence[int]) -> torch.Tensor:
        """Standard normals by Box-Muller: uniform pair j of streams ``2*stream`` and
        ``2*stream + 1`` gives elements 2j (cosine) and 2j + 1 (sine)."""
        n = math.prod(shape)
        pairs = ((n + 1) // 2,)
        radius = torch.sqrt(-2.0 * torch.log(self.uniform(2 * stream, pairs)))
        angle = (2.0 * math.pi) * self.uniform(2 * stream + 1, pairs)
        z = torch.stack((radius * torch.cos(angle), radius * torch.sin(angle)), -1)
        return z.flatten(1)[:, :n].reshape(len(self.keys), *shape)


def _poisson_inverse_cdf(mean: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Exact Poisson sampling by inversion: the smallest k with P(X <= k) >= u.

    ``torch.poisson`` only takes a generator, so it cannot be keyed per sample; inversion
    turns one keyed uniform into one Poisson draw. Start from the Cornish-Fisher quantile
    (almost always within a step or two), evaluate the CDF there once with the regularised
    incomplete gamma function, then walk with the pmf recursion ``p(k+1) = p(k) * m / (k+1)``.
    Works in float64; ``mean`` and ``u`` are flat.
    """
    mean = mean.to(torch.float64)
    pos = mean > 0
    m = torch.where(pos, mean, torch.ones_like(mean))  # placeholder 1 where mean == 0
    z = math.sqrt(2.0) * torch.special.erfinv(2.0 * u - 1.0)
    k = torch.floor(m + m.sqrt() * z + (z * z - 1.0) / 6.0 + 0.5).clamp_min(0.0)
    cdf = torch.special.gammaincc(k + 1.0, m)  # P(X <= k)
    pmf = torch.exp(k * m.log() - m - torch.lgamma(k + 1.0))  # P(X = k)

    # Walk down while P(X <= k - 1) >= u, then up while P(X <= k) < u.
    for direction in (-1, 1):
        if direction < 0:
            idx = torch.nonzero((k > 0) & (cdf - pmf >= u)).squeeze(1)
        else:
            idx = torch.nonzero(cdf < u).squeeze(1)
        for _ in range(10_000):  # a guard; the walk is a few steps in practice
            if idx.numel() == 0:
                break
            ki, ci, pi, mi, ui = k[idx], cdf[idx], pmf[idx], m[idx], u[idx]
            if direction < 0:
                ci, pi, ki = ci - pi, pi * ki / mi, ki - 1.0
                more = (ki > 0) & (ci - pi >= ui)
            else:
                ki = ki + 1.0
                pi = pi * mi / ki
                ci = ci + pi
                more = ci < ui
            k[idx], cdf[idx], pmf[idx] = ki, ci, pi
            idx = idx[more]
    return torch.where(pos, k, torch.zeros_like(k))


# --------------------------------------------------------------------------------------------
# Colour and filtering helpers
# --------------------------------------------------------------------------------------------


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """RGB ``(N, 3, H, W)`` in [0, 1] to HSV with hue in [0, 1) (skimage's convention)."""
    r, g, b = x.unbind(1)
    v, _ = x.max(1)
    delta = v - x.min(1).values
    s = torch.where(v > 0, delta / v.clamp_min(1e-12), torch.zeros_like(v))
    d = delta.clamp_min(1e-12)
    h = torch.where(v == r, (g - b) / d, torch.where(v == g, 2.0 + (b - r) / d, 4.0 + (r - g) / d))
    h = torch.where(delta > 0, torch.remainder(h / 6.0, 1.0), torch.zeros_like(h))
    return torch.stack((h, s, v), 1)


def _hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_rgb_to_hsv`: channel n is ``v - v*s*clamp(min(k, 4-k), 0, 1)``
    with ``k = (n + 6h) mod 6`` and n = 5, 3, 1 for R, G, B."""
    h, s, v = hsv.unbind(1)
    n = torch.tensor([5.0, 3.0, 1.0], device=hsv.device, dtype=hsv.dtype).view(1, 3, 1, 1)
    k = torch.remainder(n + 6.0 * h[:, None], 6.0)
    weight = torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)
    return v[:, None] - (v * s)[:, None] * weight


def _filter(x: torch.Tensor, kernel: torch.Tensor, mode: str) -> torch.Tensor:
    """Correlate every channel of ``x`` with one odd-sized 2-D ``kernel``.

    A weighted sum of shifted views rather than ``conv2d``: convolution backends pick their
    algorithm by batch size, which would make a sample's result depend on its batch by a few
    ulps. Here each output value is the same sequence of float operations in any batch.
    """
    n, c, h, w = x.shape
    kh, kw = kernel.shape
    pad = (kw // 2, kw // 2, kh // 2, kh // 2)
    padded = F.pad(x.reshape(n * c, 1, h, w), pad, mode=mode).view(n, c, h + kh - 1, w + kw - 1)
    out = torch.zeros_like(x)
    for dy in range(kh):
        for dx in range(kw):
            weight = float(kernel[dy, dx])
            if weight != 0.0:
                out += weight * padded[:, :, dy : dy + h, dx : dx + w]
    return out


def _gaussian_taps(sigma: float, radius: int) -> torch.Tensor:
    """Normalised 1-D Gaussian taps at integer offsets ``-radius..radius`` (float64)."""
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    return g / g.sum()


def _disk_kernel(radius: float, alias_sigma: float) -> torch.Tensor:
    """Defocus kernel: the integer points of a disk of ``radius``, normalised, then smoothed
    by a 3x3 Gaussian of ``alias_sigma`` (the benchmark's anti-aliasing of a tiny disk).

    The support is trimmed to ``floor(radius) + 1`` on each side; everything outside it is 0.
    """
    r = math.floor(radius) + 1
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    disk = ((t[:, None] ** 2 + t[None, :] ** 2) <= radius**2).to(torch.float64)
    disk /= disk.sum()
    g = _gaussian_taps(alias_sigma, 1)
    kernel = F.conv2d(disk[None, None], torch.outer(g, g)[None, None], padding=1)[0, 0]
    return kernel / kernel.sum()


def _box_resample(x: torch.Tensor, dim: int, n_out: int) -> torch.Tensor:
    """Resample ``x`` along ``dim`` to ``n_out`` pixels with PIL's BOX filter.

    Downsampling: each source pixel goes, with equal weight, to the output pixel whose
    footprint holds its centre (output i averages sources j with
    ``floor((2j + 1) * n_out / (2 * n_in)) == i``). Upsampling: nearest neighbour with centre
    alignment. Integer index arithmetic, and a fixed sum of gathers instead of a matmul, so
    a sample's result does not depend on its batch.
    """
    x = x.movedim(dim, -1)
    n_in = x.shape[-1]
    if n_out > n_in:
        src = ((2 * torch.arange(n_out) + 1) * n_in) // (2 * n_out)
        return x[..., src.to(x.device)].movedim(-1, dim)
    owner = ((2 * torch.arange(n_in) + 1) * n_out) // (2 * n_in)  # non-decreasing
    counts = torch.bincount(owner, minlength=n_out)
    start = torch.cumsum(counts, 0) - counts
    out = x[..., start.to(x.device)]
    for t in range(1, int(counts.max())):
        present = counts > t
        idx = torch.where(present, start + t, start).to(x.device)
        out = out + x[..., idx] * present.to(x)
    return (out / counts.to(x)).movedim(-1, dim)


def _plasma(rng: _CounterRNG, n: int, size: int, decay: float) -> torch.Tensor:
    """Plasma fractal ``(n, size, size)`` in [0, 1] by diamond-square on a torus.

    As in the benchmark: the map starts at 0, each new point is the mean of its four
    neighbours plus ``w * U(-w, w)`` noise, with ``w = 100`` divided by ``decay`` per level,
    then the map is rescaled to [0, 1]. ``size`` is a power of two.
    """
    maps = torch.zeros(n, size, size, dtype=torch.float64, device=rng.keys.device)
    step, wibble, level = size, 100.0, 0

    def noisy_mean(total: torch.Tensor, phase: int) -> torch.Tensor:
        u = rng.uniform(3 * level + phase, total.shape[1:], dtype=torch.float64)
        return total / 4.0 + wibble * wibble * (2.0 * u - 1.0)

    while step >= 2:
        half = step // 2
        corners = maps[:, ::step, ::step]
        # Squares: the centre of each square gets the mean of its four corners.
        total = corners + corners.roll(-1, 1)
        total = total + total.roll(-1, 2)
        maps[:, half::step, half::step] = noisy_mean(total, 0)
        # Diamonds: edge midpoints get the two corners and the two centres beside them.
        centres = maps[:, half::step, half::step]
        total = centres + centres.roll(1, 1) + corners + corners.roll(-1, 2)
        maps[:, ::step, half::step] = noisy_mean(total, 1)
        total = centres + centres.roll(1, 2) + corners + corners.roll(-1, 1)
        maps[:, half::step, ::step] = noisy_mean(total, 2)
        step, wibble, level = half, wibble / decay, level + 1
    lo = maps.amin((1, 2), keepdim=True)
    hi = maps.amax((1, 2), keepdim=True)
    return (maps - lo) / (hi - lo).clamp_min(1e-12)


# --------------------------------------------------------------------------------------------
# The corruptions: f(x, constant, rng) -> unclipped result
# --------------------------------------------------------------------------------------------


def _gaussian_noise(x: torch.Tensor, sigma: float, rng: _CounterRNG) -> torch.Tensor:
    return x + sigma * rng.normal(0, x.shape[1:])


def _shot_noise(x: torch.Tensor, lam: float, rng: _CounterRNG) -> torch.Tensor:
    """Poisson(x * lam) / lam, sampled exactly by inversion (see _poisson_inverse_cdf)."""
    u = rng.uniform(0, x.shape[1:], dtype=torch.float64)
    counts = _poisson_inverse_cdf((x.to(torch.float64) * lam).flatten(), u.flatten())
    return (counts / lam).view(x.shape).to(torch.float32)


def _impulse_noise(x: torch.Tensor, amount: float, rng: _CounterRNG) -> torch.Tensor:
    """Salt and pepper per value (each channel separately): 0 with probability amount/2,
    1 with probability amount/2, as skimage's ``random_noise(mode="s&p")``."""
    u = rng.uniform(0, x.shape[1:])
    out = torch.where(u < amount / 2, torch.zeros_like(x), x)
    return torch.where((u >= amount / 2) & (u < amount), torch.ones_like(x), out)


def _speckle_noise(x: torch.Tensor, sigma: float, rng: _CounterRNG) -> torch.Tensor:
    return x + x * sigma * rng.normal(0, x.shape[1:])


def _gaussian_blur(x: torch.Tensor, sigma: float, rng: _CounterRNG) -> torch.Tensor:
    """Separable Gaussian truncated at 4 sigma, edges replicated (skimage's default
    ``mode="nearest"``, which the benchmark's ``gaussian`` call uses)."""
    g = _gaussian_taps(sigma, int(4.0 * sigma + 0.5))
    return _filter(_filter(x, g[None, :], "replicate"), g[:, None], "replicate")


def _defocus_blur(x: torch.Tensor, c: tuple[float, float], rng: _CounterRNG) -> torch.Tensor:
    """Disk kernel per channel, edges reflected without repeating the edge pixel (OpenCV's
    ``filter2D`` default, BORDER_REFLECT_101 == torch's "reflect")."""
    return _filter(x, _disk_kernel(*c), "reflect")


def _clipped_zoom(x: torch.Tensor, factor: float) -> torch.Tensor:
    """The benchmark's ``clipped_zoom``: the centre ``ceil(H / factor)`` square, zoomed by
    linear interpolation to ``round(side * factor)`` pixels (scipy's ``zoom(order=1)``, which
    maps corner to corner: ``align_corners=True``), then its centre ``H x W`` kept."""
    h, w = x.shape[2:]
    ch, cw = math.ceil(h / factor), math.ceil(w / factor)
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = x[:, :, top : top + ch, left : left + cw]
    size = (round(ch * factor), round(cw * factor))
    zoomed = crop if size == (ch, cw) else F.interpolate(
        crop.to(torch.float64), size=size, mode="bilinear", align_corners=True).to(x.dtype)
    th, tw = (size[0] - h) // 2, (size[1] - w) // 2
    return zoomed[:, :, th : th + h, tw : tw + w]


def _zoom_blur(x: torch.Tensor, factors: tuple[float, ...], rng: _CounterRNG) -> torch.Tensor:
    """Mean of the image and its zooms by each factor (no randomness)."""
    out = x.clone()
    for f in factors:
        out = out + _clipped_zoom(x, f)
    return out / (len(factors) + 1)


def _contrast(x: torch.Tensor, c: float, rng: _CounterRNG) -> torch.Tensor:
    mean = x.mean((2, 3), keepdim=True)
    return (x - mean) * c + mean


def _brightness(x: torch.Tensor, c: float, rng: _CounterRNG) -> torch.Tensor:
    """HSV value + c (clipped) for RGB; the intensity itself for grey images."""
    if x.shape[1] == 1:
        return x + c
    hsv = _rgb_to_hsv(x)
    hsv[:, 2] = (hsv[:, 2] + c).clamp(0.0, 1.0)
    return _hsv_to_rgb(hsv)


def _saturate(x: torch.Tensor, c: tuple[float, float], rng: _CounterRNG) -> torch.Tensor:
    """HSV saturation * a + b (clipped); RGB only, checked in :func:`corrupt`."""
    hsv = _rgb_to_hsv(x)
    hsv[:, 1] = (hsv[:, 1] * c[0] + c[1]).clamp(0.0, 1.0)
    return _hsv_to_rgb(hsv)


def _pixelate(x: torch.Tensor, c: float, rng: _CounterRNG) -> torch.Tensor:
    """BOX down to ``floor(size * c)`` (the benchmark's ``int(32 * c)``), BOX (= nearest) up."""
    h, w = x.shape[2:]
    hs, ws = (max(1, math.floor(s * c + 1e-9)) for s in (h, w))
    small = _box_resample(_box_resample(x, 2, hs), 3, ws)
    return _box_resample(_box_resample(small, 2, h), 3, w)


def _jpeg_compression(x: torch.Tensor, quality: int, rng: _CounterRNG) -> torch.Tensor:
    """Round to uint8, encode and decode with libjpeg (torchvision.io), on the CPU."""
    images = (x.detach() * 255.0).round().clamp(0, 255).to(torch.uint8).cpu()
    encoded = encode_jpeg(list(images), quality=quality)
    decoded = decode_jpeg(encoded, mode=ImageReadMode.UNCHANGED)
    return torch.stack(decoded).to(x.device, torch.float32) / 255.0


def _fog(x: torch.Tensor, c: tuple[float, float], rng: _CounterRNG) -> torch.Tensor:
    """``x + a * plasma``, then rescaled by ``max / (max + a)`` with the clean image's max.

    The fractal is generated on the next power of two >= max(H, W) and cropped top-left.
    """
    a, decay = c
    h, w = x.shape[2:]
    size = 1 << (max(h, w) - 1).bit_length()
    fog = _plasma(rng, x.shape[0], size, decay)[:, None, :h, :w].to(x)
    peak = x.amax((1, 2, 3), keepdim=True)
    return (x + a * fog) * peak / (peak + a)


# --------------------------------------------------------------------------------------------
# Registry and entry point
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    fn: Callable[[torch.Tensor, Any, _CounterRNG], torch.Tensor]
    constants: tuple[Any, ...]  # severity 1..5
    purpose: int  # fixed code hashed into the noise, so corruptions draw independent noise


_REGISTRY: dict[str, _Spec] = {
    "gaussian_noise": _Spec(_gaussian_noise, (0.04, 0.06, 0.08, 0.09, 0.10), 1),
    "shot_noise": _Spec(_shot_noise, (500, 250, 100, 75, 50), 2),
    "impulse_noise": _Spec(_impulse_noise, (0.01, 0.02, 0.03, 0.05, 0.07), 3),
    "defocus_blur": _Spec(
        _defocus_blur, ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)), 4
    ),
    "fog": _Spec(_fog, ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)), 5),
    "brightness": _Spec(_brightness, (0.05, 0.1, 0.15, 0.2, 0.3), 6),
    "contrast": _Spec(_contrast, (0.75, 0.5, 0.4, 0.3, 0.15), 7),
    "pixelate": _Spec(_pixelate, (0.95, 0.9, 0.85, 0.75, 0.65), 8),
    "jpeg_compression": _Spec(_jpeg_compression, (80, 65, 58, 50, 40), 9),
    "speckle_noise": _Spec(_speckle_noise, (0.06, 0.10, 0.12, 0.16, 0.20), 10),
    "gaussian_blur": _Spec(_gaussian_blur, (0.4, 0.6, 0.7, 0.8, 1.0), 11),
    "saturate": _Spec(_saturate, ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)), 12),
    # the benchmark's np.arange(1, end, 0.01) to the bit: its float steps decide output sizes
    "zoom_blur": _Spec(_zoom_blur, tuple(tuple(float(v) for v in np.arange(1, end, 0.01))
                                         for end in (1.06, 1.11, 1.16, 1.21, 1.26)), 13),
}

#: CIFAR-10-C's benchmark order, restricted to the corruptions generated here.
DEFAULT_ORDER: tuple[str, ...] = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "zoom_blur",
    "fog",
    "brightness",
    "contrast",
    "pixelate",
    "jpeg_compression",
)
#: The benchmark's extra set (available by name, not in ``DEFAULT_ORDER``).
EXTRA: tuple[str, ...] = ("speckle_noise", "gaussian_blur", "saturate")
#: Every generated corruption.
CORRUPTIONS: tuple[str, ...] = DEFAULT_ORDER + EXTRA


def _check_int(value: Any, what: str) -> int:
    try:
        out = operator.index(value)
    except TypeError:
        raise ValueError(f"{what} must be an integer, got {value!r}") from None
    if isinstance(value, bool) or out < 0 or out >= 2**64:
        raise ValueError(f"{what} must be an integer in [0, 2**64), got {value!r}")
    return out


def corrupt(
    x: torch.Tensor,
    name: str,
    severity: int,
    *,
    seed: int,
    keys: torch.Tensor,
    segment: int = 0,
) -> torch.Tensor:
    """Apply corruption ``name`` at ``severity`` (1-5) to images ``x`` ``(N, C, H, W)``.

    ``x`` is float in [0, 1] with C in {1, 3} and H, W >= 8; the result has the same shape,
    is float32, on ``x``'s device, clipped to [0, 1]. ``keys`` ``(N,)`` are integer ids of the
    samples (the source index): sample i's noise is a function of ``(seed, segment, keys[i])``
    only, so it is the same in any batch, order or chunking.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown corruption {name!r}; valid names: {', '.join(CORRUPTIONS)}")
    spec = _REGISTRY[name]
    try:
        level = operator.index(severity)
    except TypeError:
        level = None
    if isinstance(severity, bool) or level is None or not 1 <= level <= 5:
        raise ValueError(f"severity must be an integer in 1..5, got {severity!r}")
    seed = _check_int(seed, "seed")
    segment = _check_int(segment, "segment")
    if x.ndim != 4 or x.shape[1] not in (1, 3) or x.shape[2] < 8 or x.shape[3] < 8:
        raise ValueError(
            f"corruption {name!r} needs images (N, C, H, W) with C in {{1, 3}} and H, W >= 8, "
            f"got shape {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise ValueError(f"corruption {name!r} needs float images in [0, 1], got {x.dtype}")
    integer_keys = not (keys.is_floating_point() or keys.is_complex() or keys.dtype == torch.bool)
    if keys.ndim != 1 or len(keys) != len(x) or not integer_keys:
        raise ValueError(
            f"keys must be an integer tensor of shape ({len(x)},), "
            f"got {keys.dtype} {tuple(keys.shape)}"
        )
    if name == "saturate" and x.shape[1] != 3:
        raise ValueError(f"corruption 'saturate' needs RGB images (C=3), got C={x.shape[1]}")

    x = x.to(torch.float32)
    if len(x) == 0:
        return x.clone()
    keys = keys.to(x.device, torch.int64)
    constant = spec.constants[level - 1]
    # Chunking bounds the float64/int64 temporaries; results are per sample, so it is exact.
    per_chunk = max(1, _CHUNK_ELEMENTS // x[0].numel())
    outs = [
        spec.fn(xc, constant, _CounterRNG(seed, segment, spec.purpose, kc))
        for xc, kc in zip(x.split(per_chunk), keys.split(per_chunk), strict=True)
    ]
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return out.to(torch.float32).clamp(0.0, 1.0)
