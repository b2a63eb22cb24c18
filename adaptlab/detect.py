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
Losses, EWMAs and thresholds are float32 tensors on the learner's device; the per-channel
counters (`count`, `head`, `steps`) are Python lists, saved in the state_dict as tensors, so
a checkpoint restores everything exactly and reading a counter never waits for the device.
"""

from __future__ import annotations

import math
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
    """

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
        f32 = torch.float32
        self.register_buffer("window", torch.zeros(0, window, dtype=f32))
        # Python counters (a device read per batch would be a host sync): valid entries <= W,
        # next slot to write, committed losses. `_save_to_state_dict` stores them as tensors.
        self.count: list[int] = []
        self.head: list[int] = []
        self.steps: list[int] = []
        # ring[s : s + n] = (s + arange(n)) % W: a channel's slots without building them
        self.register_buffer("ring", torch.arange(2 * window) % window, persistent=False)
        self.register_buffer("sbar", torch.zeros(0, dtype=f32))  # NaN = no EWMA yet
        self.register_buffer("s_all", torch.zeros(0, dtype=f32))
        # every channel's loss on the last `recent // 2` batches (NaN: not evaluated), for
        # the two-sample tests' recognition of an old expert
        self.register_buffer("last", torch.zeros(0, max(recent // 2, 1), dtype=f32))
        self.register_buffer("mu", torch.zeros(0, dtype=f32))
        self.register_buffer("tau", torch.zeros(0, dtype=f32))
        self.register_buffer("seed_value", torch.zeros(0, dtype=f32))

    @property
    def n_channels(self) -> int:
        return int(self.window.shape[0])

    # -- channels -----------------------------------------------------------------------------
    def add_channel(self, seed: float) -> int:
        """A new channel whose window holds only `seed` (ln C for a C-way classifier)."""
        dev = self.window.device
        row = torch.zeros(1, self.W, device=dev)
        row[0, 0] = seed
        nan = torch.full((1,), math.nan, device=dev)
        self.window = torch.cat([self.window, row])
        self.count.append(1)
        self.head.append(1)
        self.sbar = torch.cat([self.sbar, nan])
        self.s_all = torch.cat([self.s_all, nan])
        self.last = torch.cat([self.last, torch.full((1, self.last.shape[1]), math.nan,
                                                     device=dev)])
        self.mu = torch.cat([self.mu, torch.zeros(1, device=dev)])
        self.tau = torch.cat([self.tau, torch.zeros(1, device=dev)])
        self.steps.append(0)
        self.seed_value = torch.cat([self.seed_value, torch.full((1,), float(seed), device=dev)])
        k = self.n_channels - 1
        self.refresh_threshold(k)
        return k

    def reset_channel(self, k: int, seed: float | None = None) -> None:
        """Start channel k afresh (window `[seed]`, no EWMA, grace again)."""
        seed = float(self.seed_value[k]) if seed is None else seed
        self.window[k].zero_()
        self.window[k, 0] = seed
        self.count[k], self.head[k], self.steps[k] = 1, 1, 0
        self.sbar[k] = math.nan
        self.s_all[k] = math.nan
        self.last[k] = math.nan
        self.refresh_threshold(k)

    # -- the rule -----------------------------------------------------------------------------
    def _slots(self, k: int) -> torch.Tensor:
        """Indices of channel k's entries in its circular window, oldest first (a view of
        `ring`: no allocation, no host sync)."""
        n = self.count[k]
        start = (self.head[k] - n) % self.W
        return self.ring[start : start + n]

    def _entries(self, k: int) -> torch.Tensor:
        """Channel k's window in arrival order (oldest first)."""
        return self.window[k].index_select(0, self._slots(k))

    def refresh_threshold(self, k: int) -> None:
        """tau_k = mu + n_sigma * max(sigma, floor) over k's window (population std; `chart`:
        sigma scaled to the EWMA's spread)."""
        w = self._entries(k)
        mu = w.mean()
        var = ((w - mu) ** 2).mean()
        sigma = torch.clamp(var.sqrt(), min=self.sigma_floor)
        self.mu[k] = mu
        self.tau[k] = mu + self.n_sigma * self._spread * sigma

    def candidate(self, loss: torch.Tensor) -> torch.Tensor:
        """EWMA each channel would have after `loss[K]` (the loss itself where none yet)."""
        loss = loss.to(self.sbar.dtype)
        return torch.where(torch.isnan(self.sbar), loss,
                           self.alpha * loss + (1 - self.alpha) * self.sbar)

    def trigger_value(self, k: int, loss: torch.Tensor) -> torch.Tensor:
        """What channel k's trigger compares with tau: the candidate on its `own` chain, or on
        the `all` chain (advanced on every batch)."""
        lk = loss[k].to(self.sbar.dtype)
        # the candidate of channel k alone (NaN EWMA exactly when nothing was committed yet)
        own = lk if self.steps[k] == 0 else self.alpha * lk + (1 - self.alpha) * self.sbar[k]
        if self.chain == "own":
            return own
        s = self.s_all[k]
        return torch.where(torch.isnan(s), own, self.alpha * loss[k].float() + (1 - self.alpha) * s)

    def exceeds(self, k: int, c: float, loss: float | None = None,
                tau: float | None = None) -> bool:
        """The test itself, without grace: does candidate `c` (raw `loss`) reject channel k?
        `tau` may pass tau_k already read to the host (saves a device read)."""
        if self.test not in TWO_SAMPLE:
            return c > (float(self.tau[k]) if tau is None else tau)
        if loss is None:
            raise ValueError(f"ShiftDetector(test={self.test!r}) needs the raw loss: "
                             "fired(k, c, loss)")
        hist = self._entries(k).double().cpu().numpy()
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

    def recognises(self, c: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        """[K] bool from candidates `c` and raw `loss` [K]: does this batch fit each channel's
        (frozen) state? Threshold rules: the candidate EWMA stays under tau. Two-sample tests
        (whose firing took several post-shift batches): the mean of the channel's losses on
        the last `recent // 2` batches and this one stays under mu + n_sigma * sigma / sqrt(n),
        n the losses averaged (one batch where only the active expert was evaluated)."""
        if self.test not in TWO_SAMPLE:
            return c < self.tau
        seen = torch.cat([self.last[:, 1:], loss.to(self.last.dtype).unsqueeze(1)], 1)
        n = (~torch.isnan(seen)).sum(1).clamp(min=1)
        mean = torch.nan_to_num(seen).sum(1) / n
        return mean < self.mu + (self.tau - self.mu) / n.to(self.mu.dtype).sqrt()

    def plateaued(self, k: int, p: float = 0.05) -> bool:
        """Channel k's loss has stopped falling: its window is full and the newer half is not
        lower than the older half (one-sided Mann-Whitney, p >= `p`). Used to hold pruning
        until an expert has converged."""
        if self.count[k] < self.W:
            return False
        hist = self._entries(k).double().cpu().numpy()
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
        loss = torch.as_tensor(loss, dtype=self.sbar.dtype, device=self.sbar.device)
        # sbar[k] is NaN exactly while steps[k] == 0: the first EWMA is the loss itself
        self.sbar[k] = loss if self.steps[k] == 0 else \
            self.alpha * loss + (1 - self.alpha) * self.sbar[k]
        h = self.head[k]
        self.window[k, h] = loss
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

    def advance_all(self, loss: torch.Tensor) -> None:
        """Every batch, every channel's loss on it (NaN where not evaluated): `chain="all"`
        advances `s_all`; the two-sample tests keep the last few for recognition."""
        if self.test not in TWO_SAMPLE and self.chain != "all":
            return  # nothing to keep: no device work
        loss = loss.to(self.s_all.dtype)
        if self.test in TWO_SAMPLE:
            self.last = torch.cat([self.last[:, 1:], loss.unsqueeze(1)], 1)
        if self.chain != "all":
            return
        self.s_all = torch.where(torch.isnan(self.s_all), loss,
                                 self.alpha * loss + (1 - self.alpha) * self.s_all)

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
        c = self.candidate(torch.tensor([value], device=self.sbar.device))[0]
        if self.fired(0, c, value):
            self.reset_channel(0, seed=value if seed is None else seed)
            if seed is None:
                self.commit(0, value)
            return True
        self.commit(0, value)
        return False

    # -- checkpoint ---------------------------------------------------------------------------
    COUNTERS = ("count", "head", "steps")

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str,
                            keep_vars: bool) -> None:
        """The Python counters go into the state_dict as long tensors (as before they were
        Python, so old checkpoints load too)."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name in self.COUNTERS:
            destination[prefix + name] = torch.tensor(getattr(self, name), dtype=torch.long,
                                                      device=self.window.device)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str,
                              local_metadata: Any, strict: bool, missing: list[str],
                              unexpected: list[str], errors: list[str]) -> None:
        """Resize every buffer to the saved number of channels before loading; the counters
        come back as Python lists."""
        for name, buf in list(self._buffers.items()):
            saved = state_dict.get(prefix + name)
            if saved is not None and buf is not None and saved.shape != buf.shape:
                self._buffers[name] = torch.empty(saved.shape, dtype=buf.dtype, device=buf.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing,
                                      unexpected, errors)
        for name in self.COUNTERS:
            key = prefix + name
            if key in state_dict:
                setattr(self, name, [int(v) for v in state_dict[key].tolist()])
                if key in unexpected:
                    unexpected.remove(key)
            elif strict:
                missing.append(key)
