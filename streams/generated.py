"""Generated sources whose difficulty is a parameter: held-out benchmarks beyond digits.

Registered by name on import (`source: tabular`, `source: signals`, with `source_args`), so any
stream builder and config can use them. Each is a pure function of its arguments: the same
arguments give the same arrays, fingerprint and stream.

- `tabular`: scikit-learn's `make_classification` (Guyon's hypercube clusters); `class_sep`
  and `flip_y` set the difficulty.
- `signals`: 1-D signals `(1, length)`; each class is a smooth random template (a few sines),
  seen with a random circular shift, amplitude and Gaussian noise; `noise` and `jitter` set the
  difficulty.
"""

from __future__ import annotations

import numpy as np

from .core import Purpose, rng
from .sources import SourceData, from_arrays, register_source

__all__ = ["signals", "tabular"]


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int, name: str,
           params: dict) -> SourceData:
    """A stratified, seeded train/test split, each side in generation order."""
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction: must be in (0, 1), got {test_fraction!r}")
    idx_tr, idx_te = train_test_split(np.arange(len(y)), test_size=test_fraction, stratify=y,
                                      random_state=seed)
    idx_tr, idx_te = np.sort(idx_tr), np.sort(idx_te)
    return from_arrays(x[idx_tr], y[idx_tr], x[idx_te], y[idx_te], name=name, params=params)


def tabular(
    n_classes: int = 10, n_features: int = 20, n_informative: int = 10,
    class_sep: float = 1.0, flip_y: float = 0.0, n_samples: int = 3000,
    test_fraction: float = 0.3, seed: int = 0,
) -> SourceData:
    """Flat features (n_features,): `n_classes` Gaussian clusters on hypercube vertices."""
    from sklearn.datasets import make_classification

    params = dict(n_classes=n_classes, n_features=n_features, n_informative=n_informative,
                  class_sep=class_sep, flip_y=flip_y, n_samples=n_samples,
                  test_fraction=test_fraction, seed=seed)
    x, y = make_classification(
        n_samples=n_samples, n_features=n_features, n_informative=n_informative,
        n_redundant=0, n_classes=n_classes, n_clusters_per_class=1, class_sep=class_sep,
        flip_y=flip_y, random_state=seed,
    )
    x = (x - x.mean(0)) / x.std(0)
    return _split(x, y, test_fraction, seed, "tabular", params)


def signals(
    n_classes: int = 10, length: int = 40, noise: float = 1.0, jitter: int = 4,
    n_components: int = 3, n_samples: int = 3000, test_fraction: float = 0.3, seed: int = 0,
) -> SourceData:
    """Sequences (1, length): class template, circular shift in [-jitter, jitter], amplitude
    in [0.8, 1.2], plus N(0, noise^2) per step. Templates have unit RMS."""
    params = dict(n_classes=n_classes, length=length, noise=noise, jitter=jitter,
                  n_components=n_components, n_samples=n_samples,
                  test_fraction=test_fraction, seed=seed)
    g = rng(seed, Purpose.SPLIT, 1)
    t = np.arange(length) / length
    freq = g.integers(1, 6, (n_classes, n_components))
    phase = g.uniform(0, 2 * np.pi, (n_classes, n_components))
    weight = g.normal(size=(n_classes, n_components))
    templates = (weight[..., None] * np.sin(2 * np.pi * freq[..., None] * t + phase[..., None]))
    templates = templates.sum(1)
    templates /= np.sqrt((templates**2).mean(1, keepdims=True))
    y = g.permutation(np.arange(n_samples) % n_classes)
    shift = g.integers(-jitter, jitter + 1, n_samples) if jitter else np.zeros(n_samples, int)
    rows = (np.arange(length)[None] - shift[:, None]) % length
    x = templates[y[:, None], rows] * g.uniform(0.8, 1.2, (n_samples, 1))
    x = x + noise * g.normal(size=x.shape)
    return _split(x[:, None, :], y, test_fraction, seed, "signals", params)


register_source("tabular", tabular, replace=True)
register_source("signals", signals, replace=True)
