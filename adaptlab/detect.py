"""`ShiftDetector`: loss-statistics shift detection, one channel per expert or signal.

The rule (TAME, Zhu et al. 2022; `docs/methods/tame.md`), per channel k:

    window_k  = the last W pre-update losses of k, seeded with [ln C] (CE of a uniform output)
    tau_k     = mean(window_k) + n_sigma * max(std(window_k), sigma_floor)    (population std)
    s_k       = alpha * loss + (1 - alpha) * s_k        (EWMA; the first value is the loss)
    fired     = s_k > tau_k  and  steps_k >= grace

A caller refreshes tau of the channel it watches *before* appending the new loss
(`refresh_threshold`), asks `candidate` for the EWMA the new loss would give, decides with
`fired`, and only then `commit`s the loss to the one channel that trained on it. Inactive
channels keep a frozen tau, which is what lets TAME recognise a recurring segment.
Other rules (`test`), for losses too noisy for mu + 3 sigma of the raw loss (spec §2):

    chart        EWMA control chart (Roberts 1959): the EWMA's own spread is
                 sigma * sqrt(alpha / (2 - alpha)), so tau = mu + n_sigma * that. The paper's rule
                 compares a smoothed value with the raw loss's sigma and needs a shift of about
                 3 sigma; the chart sees about 1.5 sigma.
    welch        one-sided Welch t-test, recent losses > the rest of the window (scipy)
    mannwhitney  one-sided Mann-Whitney U test of the same samples (rank-based: skewed,
                 heavy-tailed per-batch losses are fine)
    ks           one-sided two-sample Kolmogorov-Smirnov test (any change of distribution
                 towards larger losses)

The two-sample tests fire when p < `p_value`; "recent" is the last `recent` losses (the new
one included), the reference the rest of the window. Their `tau` is the one-batch bound
mu + n_sigma * sigma, used to recognise an old expert from a single batch (`recognises`).
The state lives on the host as Python values: windows, EWMAs and thresholds are float32
numbers (each operation rounded to float32, as float32 tensors would store it), counters are
ints. A caller reads a batch's losses to the host once (one transfer for all channels); after
that a decision is a few dozen float operations instead of as many tiny tensor ops (each a
few microseconds on a CPU, a kernel launch on a GPU). The state_dict holds the same float32
and long tensors as before (`window`, `sbar`, ..., `count`, `head`, `steps`), so checkpoints
load either way and restore everything exactly; `tau`, `mu`, `sbar`, `window`, ... read as
tensors on the module's device.
"""

from __future__ import annotations

import math
from array import array
from collections import deque
from operator import mul
from typing import Any

import numpy as np
import torch
from scipy import stats
from torch import nn

TESTS = ("threshold", "chart", "welch", "mannwhitney", "ks")
TWO_SAMPLE = ("welch", "mannwhitney", "ks")
# Per-test defaults (chosen on constructed sequences, `tools/detect_report.py`): n_sigma
# (threshold: the paper's 3; chart: wide enough for no false alarm in 5,000 stationary steps)
# and the two-sample tests' p-value (one test per step, so far below the usual 0.01).
DEFAULT_N_SIGMA = {"threshold": 3.0, "chart": 5.0}
DEFAULT_P_VALUE = {"welch": 1e-4, "mannwhitney": 1e-4, "ks": 1e-4}
CHAINS = ("own", "all")

_F32 = array("f", [0.0])


def f32(v: float) -> float:
    """`v` rounded to float32 (what a float32 tensor stores), as a Python float."""
    _F32[0] = v
    return _F32[0]


class ShiftDetector(nn.Module):
    """Multi-channel loss-statistics shift detector.

    Args:
        window: W, losses kept per channel (the seed counts as one until W appends push it out).
        alpha: EWMA smoothing; 1 means no smoothing (noise then crosses tau).
        n_sigma: tau = mu + n_sigma * max(sigma, sigma_floor) (`chart`: times the EWMA factor
            sqrt(alpha / (2 - alpha))); None takes the test's default (`DEFAULT_N_SIGMA`, 3).
        sigma_floor: lower bound on sigma, so a flat window cannot make tau equal mu.
        grace: a channel cannot fire before it has committed this many losses.
        test: `threshold` (the paper's rule), `chart`, `welch`, `mannwhitney` or `ks`.
        recent: losses in the recent sample of the two-sample tests (incl. the new one).
        p_value: the two-sample tests fire below this p-value; None takes the test's default.
        chain: `own` (EWMA over the channel's own commits) or `all` (an extra EWMA chain,
            `s_all`, advanced on every batch for every channel: TAME's reference code).

    Losses given as tensors are read to the host (`tolist`); pass Python floats or lists to
    keep that read under the caller's control (TAME reads a batch's losses once).
    """

    FLOATS = ("window", "sbar", "s_all", "last", "mu", "tau", "seed_value")
    COUNTERS = ("count", "head", "steps")

    def __init__(
        self,
        window: int = 100,
        alpha: float = 0.2,
        n_sigma: float | None = None,
        sigma_floor: float = 0.005,
        grace: int = 20,
        test: str = "threshold",
        recent: int = 10,
        p_value: float | None = None,
        chain: str = "own",
    ) -> None:
        super().__init__()
        if not isinstance(window, int) or window < 2:
            raise ValueError(f"window: must be an integer >= 2, got {window!r}")
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha: must be in (0, 1], got {alpha!r}")
        if grace < 0:
            raise ValueError(f"grace: must be >= 0, got {grace!r}")
        if test not in TESTS:
            raise ValueError(f"test: {test!r} is not one of {TESTS}")
        if chain not in CHAINS:
            raise ValueError(f"chain: {chain!r} is not one of {CHAINS}")
        if test in TWO_SAMPLE and not 2 <= recent < window:
            raise ValueError(f"recent: must be in [2, window), got {recent!r}")
        p_value = DEFAULT_P_VALUE.get(test, 0.01) if p_value is None else p_value
        if not 0 < p_value < 1:
            raise ValueError(f"p_value: must be in (0, 1), got {p_value!r}")
        self.W, self.alpha, self.sigma_floor = window, alpha, sigma_floor
        self.n_sigma = DEFAULT_N_SIGMA.get(test, 3.0) if n_sigma is None else float(n_sigma)
        self.grace, self.test, self.chain = grace, test, chain
        self.recent, self.p_value = recent, p_value
        # tau's sigma multiplier: the EWMA's stationary spread for the control chart
        self._spread = math.sqrt(alpha / (2 - alpha)) if test == "chart" else 1.0
        # the constants as a float32 tensor op sees them (a Python scalar becomes float32)
        self._a, self._b = f32(alpha), f32(1 - alpha)
        self._k = f32(self.n_sigma * self._spread)
        self._floor = f32(sigma_floor)
        self._n_last = max(recent // 2, 1)
        # Per channel: the circular window (float32 storage; slots past `count` are 0), the
        # EWMA (NaN = none yet), the `all` chain, the losses on the last `recent // 2` batches
        # (NaN: not evaluated; the two-sample tests' recognition), mu, tau and the seed.
        self._win: list[array] = []
        self._sbar: list[float] = []
        self._s_all: list[float] = []
        self._last: list[deque[float]] = []
        self._mu: list[float] = []
        self._tau: list[float] = []
        self._seed: list[float] = []
        # valid entries <= W, next slot to write, committed losses
        self.count: list[int] = []
        self.head: list[int] = []
        self.steps: list[int] = []
        # follows `.to()`: the device of the tensors this module hands out
        self.register_buffer("probe", torch.zeros(0), persistent=False)

    @property
    def n_channels(self) -> int:
        return len(self._win)

    # -- tensor views (tests, checkpoints, plots) ---------------------------------------------
    def _tensor(self, values: list, *shape: int) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=self.probe.device).reshape(
            self.n_channels, *shape)

    @property
    def window(self) -> torch.Tensor:
        """[K, W] the circular windows (slot order)."""
        return self._tensor([v for w in self._win for v in w], self.W)

    @property
    def sbar(self) -> torch.Tensor:
        return self._tensor(self._sbar)

    @property
    def s_all(self) -> torch.Tensor:
        return self._tensor(self._s_all)

    @property
    def last(self) -> torch.Tensor:
        return self._tensor([v for r in self._last for v in r], self._n_last)

    @property
    def mu(self) -> torch.Tensor:
        return self._tensor(self._mu)

    @property
    def tau(self) -> torch.Tensor:
        return self._tensor(self._tau)

    @property
    def seed_value(self) -> torch.Tensor:
        return self._tensor(self._seed)

    def tau_of(self, k: int) -> float:
        """tau_k as a float (no tensor built)."""
        return self._tau[k]

    # -- channels -----------------------------------------------------------------------------
    def _no_losses(self) -> deque[float]:
        return deque([math.nan] * self._n_last, maxlen=self._n_last)

    def _fresh_window(self, seed: float) -> array:
        w = array("f", [0.0]) * self.W
        w[0] = seed
        return w

    def add_channel(self, seed: float) -> int:
        """A new channel whose window holds only `seed` (ln C for a C-way classifier)."""
        self._win.append(self._fresh_window(seed))
        self.count.append(1)
        self.head.append(1)
        self.steps.append(0)
        self._sbar.append(math.nan)
        self._s_all.append(math.nan)
        self._last.append(self._no_losses())
        self._mu.append(0.0)
        self._tau.append(0.0)
        self._seed.append(f32(seed))
        k = self.n_channels - 1
        self.refresh_threshold(k)
        return k

    def reset_channel(self, k: int, seed: float | None = None) -> None:
        """Start channel k afresh (window `[seed]`, no EWMA, grace again)."""
        self._win[k] = self._fresh_window(self._seed[k] if seed is None else seed)
        self.count[k], self.head[k], self.steps[k] = 1, 1, 0
        self._sbar[k] = math.nan
        self._s_all[k] = math.nan
        self._last[k] = self._no_losses()
        self.refresh_threshold(k)

    # -- the rule -----------------------------------------------------------------------------
    def _entries(self, k: int) -> list[float]:
        """Channel k's window in arrival order (oldest first)."""
        n, w = self.count[k], self._win[k]
        start = (self.head[k] - n) % self.W
        end = start + n
        if end <= self.W:
            return w[start:end].tolist()
        return w[start:].tolist() + w[: end - self.W].tolist()

    def _ewma(self, loss: float, s: float) -> float:
        """alpha * loss + (1 - alpha) * s, rounded as float32 tensor ops round each step."""
        return f32(f32(self._a * loss) + f32(self._b * s))

    def refresh_threshold(self, k: int) -> None:
        """tau_k = mu + n_sigma * max(sigma, floor) over k's window (population std; `chart`:
        sigma scaled to the EWMA's spread). The sums run in float64 (at most W terms), mu
        and tau are stored as float32."""
        w = self._entries(k)
        n = len(w)
        mean = sum(w) / n
        var = max(sum(map(mul, w, w)) / n - mean * mean, 0.0)
        mu = f32(mean)
        sigma = max(f32(math.sqrt(var)), self._floor)
        self._mu[k] = mu
        self._tau[k] = f32(mu + f32(self._k * sigma))

    @staticmethod
    def _host(loss: Any) -> list[float]:
        return loss.tolist() if isinstance(loss, torch.Tensor) else list(loss)

    def candidate(self, loss: Any) -> list[float]:
        """EWMA each channel would have after `loss[K]` (the loss itself where none yet)."""
        return [f32(v) if s != s else self._ewma(f32(v), s)
                for v, s in zip(self._host(loss), self._sbar, strict=True)]

    def trigger_value(self, k: int, loss: Any) -> float:
        """What channel k's trigger compares with tau: the candidate on its `own` chain, or on
        the `all` chain (advanced on every batch). `loss`: the K losses (a list)."""
        lk = f32(float(loss[k]))
        # the candidate of channel k alone (no EWMA exactly when nothing was committed yet)
        own = lk if self.steps[k] == 0 else self._ewma(lk, self._sbar[k])
        if self.chain == "own":
            return own
        s = self._s_all[k]
        return own if s != s else self._ewma(lk, s)

    def exceeds(self, k: int, c: float, loss: float | None = None,
                tau: float | None = None) -> bool:
        """The test itself, without grace: does candidate `c` (raw `loss`) reject channel k?
        `tau` may pass tau_k already read."""
        if self.test not in TWO_SAMPLE:
            return c > (self._tau[k] if tau is None else tau)
        if loss is None:
            raise ValueError(f"ShiftDetector(test={self.test!r}) needs the raw loss: "
                             "fired(k, c, loss)")
        hist = np.asarray(self._entries(k), dtype=np.float64)
        cut = len(hist) - (self.recent - 1)
        recent = np.append(hist[cut:], float(loss))
        ref = hist[:cut]
        if len(ref) < 2:
            return False
        return bool(self._p_value(recent, ref) < self.p_value)

    def _p_value(self, recent: np.ndarray, ref: np.ndarray) -> float:
        """One-sided p-value of "recent losses are larger than the reference" (scipy)."""
        if self.test == "welch":
            p = stats.ttest_ind(recent, ref, equal_var=False, alternative="greater").pvalue
        elif self.test == "mannwhitney":
            p = stats.mannwhitneyu(recent, ref, alternative="greater").pvalue
        else:  # ks: "less" = recent's CDF lies below the reference's, i.e. larger losses
            p = stats.ks_2samp(recent, ref, alternative="less").pvalue
        return 1.0 if math.isnan(p) else float(p)  # constant samples: no evidence

    def recognises(self, c: Any, loss: Any) -> list[bool]:
        """Per channel, from candidates `c` and raw `loss` [K]: does this batch fit each
        channel's (frozen) state? Threshold rules: the candidate EWMA stays under tau.
        Two-sample tests (whose firing took several post-shift batches): the mean of the
        channel's losses on the last `recent // 2` batches and this one stays under
        mu + n_sigma * sigma / sqrt(n), n the losses averaged (one batch where only the
        active expert was evaluated)."""
        if self.test not in TWO_SAMPLE:
            return [ck < t for ck, t in zip(self._host(c), self._tau, strict=True)]
        out = []
        for k, v in enumerate(self._host(loss)):
            seen = [x for x in [*self._last[k], f32(v)][1:] if x == x]
            n = max(len(seen), 1)
            mean = f32(f32(sum(seen)) / n)
            mu, tau = self._mu[k], self._tau[k]
            out.append(mean < f32(mu + f32(f32(tau - mu) / f32(math.sqrt(n)))))
        return out

    def plateaued(self, k: int, p: float = 0.05) -> bool:
        """Channel k's loss has stopped falling: its window is full and the newer half is not
        lower than the older half (one-sided Mann-Whitney, p >= `p`). Used to hold pruning
        until an expert has converged."""
        if self.count[k] < self.W:
            return False
        hist = np.asarray(self._entries(k), dtype=np.float64)
        half = self.W // 2
        res = stats.mannwhitneyu(hist[:half], hist[half:], alternative="greater")
        return bool(not res.pvalue < p)

    def fired(self, k: int, c: float | torch.Tensor, loss: float | None = None,
              tau: float | None = None) -> bool:
        """Shift on channel k: the test rejects and k is past its grace period."""
        if self.steps[k] < self.grace:
            return False
        return self.exceeds(k, float(c), loss, tau)

    def commit(self, k: int, loss: float | torch.Tensor) -> None:
        """Channel k trained on a batch with pre-update `loss`: EWMA, window, step count."""
        v = f32(float(loss))
        # no EWMA exactly while steps[k] == 0: the first EWMA is the loss itself
        self._sbar[k] = v if self.steps[k] == 0 else self._ewma(v, self._sbar[k])
        h = self.head[k]
        self._win[k][h] = v
        self.head[k] = (h + 1) % self.W
        self.count[k] = min(self.count[k] + 1, self.W)
        self.steps[k] += 1

    def retract(self, k: int) -> None:
        """After channel k fired: the two-sample tests drop the `recent - 1` losses the
        detection was made on, which came from the new segment, so that k, if it returns,
        starts from its own losses and does not fire again at once. The threshold rules keep
        them (the paper's EWMA and window also carry them)."""
        if self.test not in TWO_SAMPLE:
            return
        drop = min(self.recent - 1, self.count[k] - 1)
        self.count[k] -= drop
        self.head[k] = (self.head[k] - drop) % self.W

    def advance_all(self, loss: Any) -> None:
        """Every batch, every channel's loss on it (NaN where not evaluated): `chain="all"`
        advances `s_all`; the two-sample tests keep the last few for recognition."""
        if self.test not in TWO_SAMPLE and self.chain != "all":
            return  # nothing to keep
        values = array("f", self._host(loss)).tolist()  # each rounded as `f32` rounds it
        if len(values) != self.n_channels:
            raise ValueError(f"advance_all: {len(values)} losses for {self.n_channels} channels")
        if self.test in TWO_SAMPLE:  # the oldest leaves (maxlen); the loop runs in C
            deque(map(deque.append, self._last, values), maxlen=0)
        # in place: rebinding a Module attribute goes through nn.Module.__setattr__ (slow)
        if self.chain == "all":
            self._s_all[:] = [v if s != s else self._ewma(v, s)
                              for v, s in zip(values, self._s_all, strict=True)]

    def update(self, loss: float | torch.Tensor, seed: float | None = None) -> bool:
        """Single-signal use (channel 0): refresh, decide, commit.

        `seed` None: the first loss seeds the channel and a shift restarts it from the firing
        loss (the learner carries on, so that loss is the new regime's). A fixed `seed` (e.g.
        the zero-shot loss ln C) seeds it at creation and after a shift, and the firing loss is
        not committed: for a learner that itself restarts on a shift (StreamAdapter's state
        reset), whose next losses are the seed's, not the firing one's.
        """
        value = float(loss)
        if self.n_channels == 0:
            self.add_channel(value if seed is None else seed)
        self.refresh_threshold(0)
        c = self.candidate([value])[0]
        if self.fired(0, c, value):
            self.reset_channel(0, seed=value if seed is None else seed)
            if seed is None:
                self.commit(0, value)
            return True
        self.commit(0, value)
        return False

    # -- checkpoint ---------------------------------------------------------------------------
    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str,
                            keep_vars: bool) -> None:
        """The host state as the tensors it was kept in before: float32 `window` [K, W],
        `sbar`, `s_all`, `last` [K, recent // 2], `mu`, `tau`, `seed_value` [K] and long
        `count`, `head`, `steps` [K]."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name in self.FLOATS:
            destination[prefix + name] = getattr(self, name)
        for name in self.COUNTERS:
            destination[prefix + name] = torch.tensor(getattr(self, name), dtype=torch.long,
                                                      device=self.probe.device)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str,
                              local_metadata: Any, strict: bool, missing: list[str],
                              unexpected: list[str], errors: list[str]) -> None:
        """Back to the host: any number of channels (the saved ones replace these)."""
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing,
                                      unexpected, errors)
        for name in (*self.FLOATS, *self.COUNTERS):
            key = prefix + name
            if key not in state_dict:
                if strict:
                    missing.append(key)
                continue
            if key in unexpected:
                unexpected.remove(key)
            rows = state_dict[key].tolist()
            if name == "window":
                self._win = [array("f", r) for r in rows]
            elif name == "last":
                self._last = [deque(map(float, r), maxlen=self._n_last) for r in rows]
            elif name in self.COUNTERS:
                setattr(self, name, [int(v) for v in rows])
            else:
                attr = {"sbar": "_sbar", "s_all": "_s_all", "mu": "_mu", "tau": "_tau",
                        "seed_value": "_seed"}[name]
                setattr(self, attr, [float(v) for v in rows])
