"""Pairwise outcomes -> win matrix and Elo ratings (Bradley-Terry, bootstrap intervals).

The data of a comparison is one outcome per (prompt, model pair): ``outcomes[p, k]`` is
1.0 when the first model of pair ``k`` won prompt ``p``, 0.0 when the second won, 0.5 for
a tie (NaN: not judged). A Bradley-Terry model, ``P(i beats j) = sigmoid(t_i - t_j)``,
is fitted by maximum likelihood with ties counted as half a win for each side (the usual
Elo convention; it has no separate tie parameter). Strengths are reported on the Elo
scale, ``400 * log10(odds)``, anchored so the **mean rating is 1000**.

Intervals come from a percentile bootstrap over prompts: prompts, not games, are the
independent units (every pair is judged on the same prompt), so whole prompts are
resampled with replacement and the model refitted on each resample.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import combinations

import numpy as np

ELO_SCALE = 400.0 / math.log(10.0)  # natural-log odds -> Elo points
ELO_MEAN = 1000.0
# A Gaussian prior N(0, 1/PRIOR) on each log-strength. Tiny against any real number of
# games (its pull on a rating is ~PRIOR / games), but it keeps the maximum finite when a
# model never loses (or never wins), where the plain likelihood grows without bound.
PRIOR = 1e-2


def pairs_of(n_models: int) -> list[tuple[int, int]]:
    """The model pairs ``(i, j)``, ``i < j``, in the order of an outcome array's columns."""
    return list(combinations(range(n_models), 2))


def win_counts(outcomes: np.ndarray, n_models: int) -> np.ndarray:
    """Wins with ties split: float [M, M], ``W[i, j]`` = i's wins over j + half the ties.

    Args:
      outcomes: float [P, K] (K = M(M-1)/2 pairs of :func:`pairs_of`), values 1 / 0.5 / 0,
        NaN for a missing judgment.
    """
    w = np.zeros((n_models, n_models))
    for k, (i, j) in enumerate(pairs_of(n_models)):
        col = outcomes[:, k]
        col = col[~np.isnan(col)]
        w[i, j] += col.sum()
        w[j, i] += (1.0 - col).sum()
    return w


def win_matrix(outcomes: np.ndarray, n_models: int) -> dict[str, np.ndarray]:
    """Counts per ordered pair: ``{"wins", "ties", "losses"}``, each int [M, M].

    ``wins[i, j]`` = prompts on which i beat j; ``losses`` is ``wins.T``; diagonals are 0.
    """
    wins = np.zeros((n_models, n_models), int)
    ties = np.zeros((n_models, n_models), int)
    for k, (i, j) in enumerate(pairs_of(n_models)):
        col = outcomes[:, k]
        wins[i, j] = int((col == 1.0).sum())
        wins[j, i] = int((col == 0.0).sum())
        ties[i, j] = ties[j, i] = int((col == 0.5).sum())
    return {"wins": wins, "ties": ties, "losses": wins.T.copy()}


def fit_bradley_terry(wins: np.ndarray, prior: float = PRIOR, iters: int = 100) -> np.ndarray:
    """Maximum a-posteriori Bradley-Terry log-strengths, batched.

    Newton's method on the concave log-posterior (``sum W_ij log sigmoid(t_i - t_j) -
    prior/2 |t|^2``); it converges in a handful of steps. The prior's gradient is the only
    term that does not cancel over models, so at the optimum the strengths sum to zero.

    Args:
      wins: float [..., M, M] win counts (ties split, :func:`win_counts`).

    Returns:
      float [..., M] natural-log strengths, mean 0.
    """
    wins = np.asarray(wins, float)
    games = wins + np.swapaxes(wins, -1, -2)
    m = wins.shape[-1]
    theta = np.zeros(wins.shape[:-1])
    eye = np.eye(m)
    for _ in range(iters):
        diff = theta[..., :, None] - theta[..., None, :]
        p = 1.0 / (1.0 + np.exp(-diff))
        grad = (wins - games * p).sum(-1) - prior * theta
        c = games * p * (1.0 - p)  # Fisher information of each pair
        hess = c - eye * (c.sum(-1)[..., None] + prior)  # negative definite
        step = np.linalg.solve(hess, grad[..., None])[..., 0]
        theta = theta - step
        if np.abs(step).max() < 1e-10:
            break
    return theta - theta.mean(-1, keepdims=True)


def to_elo(theta: np.ndarray) -> np.ndarray:
    """Natural-log strengths -> Elo ratings with mean :data:`ELO_MEAN` (same shape)."""
    theta = np.asarray(theta, float)
    return ELO_MEAN + ELO_SCALE * (theta - theta.mean(-1, keepdims=True))


def elo_ratings(
    outcomes: np.ndarray,
    n_models: int,
    *,
    bootstrap: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, np.ndarray]:
    """Elo ratings of M models from per-prompt pairwise outcomes, with bootstrap intervals.

    Args:
      outcomes: float [P, K] (see the module docstring; K pairs of :func:`pairs_of`).
      bootstrap: resamples of the P prompts (0: no intervals, ``low``/``high`` NaN).
      seed: seed of the resampling.
      level: coverage of the percentile interval.

    Returns:
      ``{"rating": [M], "low": [M], "high": [M], "samples": [bootstrap, M]}`` in Elo
      points, mean rating 1000.
    """
    outcomes = np.asarray(outcomes, float)
    rating = to_elo(fit_bradley_terry(win_counts(outcomes, n_models)))
    nan = np.full(n_models, np.nan)
    if bootstrap <= 0 or len(outcomes) == 0:
        return {"rating": rating, "low": nan, "high": nan, "samples": np.zeros((0, n_models))}
    # Each prompt's own win matrix; a resample's matrix is a count-weighted sum of them.
    per_prompt = np.stack([win_counts(row[None], n_models) for row in outcomes])
    rng = np.random.default_rng(seed)
    n = len(outcomes)
    counts = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(bootstrap)])
    wins = np.einsum("bp,pij->bij", counts.astype(float), per_prompt)
    samples = to_elo(fit_bradley_terry(wins))
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(samples, [alpha, 1.0 - alpha], axis=0)
    return {"rating": rating, "low": low, "high": high, "samples": samples}


def outcome_value(winner: str) -> float:
    """``"a"`` -> 1.0, ``"b"`` -> 0.0, ``"tie"`` -> 0.5 (the first model of a pair is a)."""
    return {"a": 1.0, "b": 0.0, "tie": 0.5}[winner]


def outcome_array(judgments: Sequence[dict], n_prompts: int, n_models: int) -> np.ndarray:
    """float [P, K] outcomes from judgment records ``{"id", "pair": [i, j], "outcome"}``."""
    index = {pair: k for k, pair in enumerate(pairs_of(n_models))}
    out = np.full((n_prompts, len(index)), np.nan)
    for j in judgments:
        out[j["id"], index[tuple(j["pair"])]] = outcome_value(j["outcome"])
    return out
