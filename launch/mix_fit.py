"""A model of held-out BPB against the mix, fitted on a sweep's proxy runs, and the mix
it proposes.

Three regressions per domain (a corpus or a group), each least squares on the shares x
of the sweep's components:

- linear (RegMix):                          BPB ≈ Σ β_i x_i
- log-linear (Data Mixing Laws' exponential law without its constant offset):
                                            BPB ≈ exp(Σ β_i x_i)
- log-log (a power law in each share, as in BiMix):
                                            BPB ≈ exp(β_0 + Σ β_i log(x_i + ε))

The shares sum to 1, so the first two need no intercept. ε = 1e-3 keeps a share of
zero finite. Loss usually falls steeply while a domain's share is small and flattens as
it grows, which only the power law follows (on the demo sweep its held-out error was a
fifth of the others'). Fit quality is measured on runs the fit has not seen:
leave-one-out mean absolute error and R²; each domain keeps the model with the smaller
error. The proposal follows RegMix: predict many candidate mixes drawn from the simplex,
inside the range of shares the runs covered (a fit says little outside it), and keep
the best one that satisfies the objective.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MODELS = ("linear", "log-linear", "log-log")
CANDIDATES = 100_000
EPSILON = 1e-3


@dataclass(frozen=True)
class Fit:
    domain: str
    model: str
    coefficients: list[float]
    loo_mae: float
    """Mean absolute error (in BPB) of predictions of each run by a fit on the others."""
    loo_r2: float
    """R² of those held-out predictions (1: perfect; 0: no better than the mean)."""

    def predict(self, shares: np.ndarray) -> np.ndarray:
        return predict(self.model, np.asarray(self.coefficients), shares)


def _features(model: str, shares: np.ndarray) -> np.ndarray:
    shares = np.atleast_2d(shares)
    if model == "log-log":
        return np.column_stack([np.ones(len(shares)), np.log(shares + EPSILON)])
    return shares


def fit_coefficients(model: str, shares: np.ndarray, bpb: np.ndarray) -> np.ndarray:
    target = bpb if model == "linear" else np.log(bpb)
    return np.linalg.lstsq(_features(model, shares), target, rcond=None)[0]


def predict(model: str, coefficients: np.ndarray, shares: np.ndarray) -> np.ndarray:
    value = _features(model, shares) @ coefficients
    return value if model == "linear" else np.exp(value)


def leave_one_out(model: str, shares: np.ndarray, bpb: np.ndarray) -> np.ndarray:
    """Each run's BPB as predicted by a fit on all the other runs."""
    held_out = np.empty_like(bpb)
    for i in range(len(bpb)):
        keep = np.arange(len(bpb)) != i
        held_out[i] = predict(model, fit_coefficients(model, shares[keep], bpb[keep]), shares[i])[0]
    return held_out


def fit_domain(domain: str, shares: np.ndarray, bpb: np.ndarray) -> Fit:
    """Every model fitted on all runs; the one with the smaller leave-one-out error is kept."""
    best = None
    for model in MODELS:
        held_out = leave_one_out(model, shares, bpb)
        spread = np.sum((bpb - bpb.mean()) ** 2)
        r2 = 1 - np.sum((bpb - held_out) ** 2) / spread if spread > 0 else float("nan")
        fit = Fit(domain, model, fit_coefficients(model, shares, bpb).tolist(),
                  float(np.mean(np.abs(bpb - held_out))), float(r2))
        if best is None or fit.loo_mae < best.loo_mae:
            best = fit
    return best


def enough_runs(components: int) -> int:
    """Runs needed before a fit is worth reporting: one per weight, plus two to judge it
    (the log-log model has an intercept besides, so a fit on all runs but one is still determined)."""
    return components + 2


def propose(fits: dict[str, Fit], run_shares: np.ndarray, base: np.ndarray, minimise: str,
            no_worse: list[str], tolerance: float, seed: int) -> dict | None:
    """The candidate mix with the lowest predicted BPB of `minimise` among those where every
    domain of `no_worse` stays within (1 + tolerance) × its predicted BPB under `base`;
    None when no candidate qualifies."""
    low, high = run_shares.min(axis=0), run_shares.max(axis=0)
    candidates = np.random.default_rng(seed).dirichlet(np.ones(run_shares.shape[1]), size=CANDIDATES)
    candidates = np.vstack([candidates, run_shares, base])
    candidates = candidates[np.all((candidates >= low - 1e-9) & (candidates <= high + 1e-9), axis=1)]
    allowed = np.ones(len(candidates), dtype=bool)
    limits = {}
    for domain in no_worse:
        limits[domain] = float(fits[domain].predict(base)[0] * (1 + tolerance))
        allowed &= fits[domain].predict(candidates) <= limits[domain]
    if not allowed.any():
        return None
    scores = np.where(allowed, fits[minimise].predict(candidates), np.inf)
    best = candidates[int(np.argmin(scores))]
    return {
        "shares": best.tolist(),
        "predicted_bpb": {domain: float(fit.predict(best)[0]) for domain, fit in fits.items()},
        "base_predicted_bpb": {domain: float(fit.predict(base)[0]) for domain, fit in fits.items()},
        "limits": limits,
    }
