"""Preference losses on sequence log-probabilities: DPO (sigmoid, IPO, hinge), ORPO, SimPO.

Pure functions of per-pair arrays [B] (one entry per prompt with its chosen and rejected
completion); the model forward that produces the log-probabilities is
:func:`jaxtune.models.losses.row_nll_sums`. Each returns the per-pair loss [B] and the
per-pair metrics under TRL's names (``rewards/chosen``, ``rewards/rejected``,
``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected``, and for
ORPO ``nll_loss``, ``log_odds_ratio``, ``log_odds_chosen``), so a caller can sum them over
valid pairs and divide once by the pair count (accumulation = one big batch).

The formulas are TRL 1.16's: ``DPOTrainer._compute_loss`` (sigmoid, hinge, IPO
normalised by completion length), ``ORPOTrainer.odds_ratio_loss`` and
``CPOTrainer.cpo_loss`` with ``loss_type="simpo"`` (pure SimPO: ``cpo_alpha=0``). One
addition: DPO ``sigmoid`` with ``label_smoothing`` ε > 0 is conservative DPO (cDPO),
``-(1-ε) log σ(βδ) - ε log σ(-βδ)``, TRL's sigmoid loss before 1.0 (1.16 reads ε only in
its ``robust`` and ``exo_pair`` losses).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")
_LOG_HALF = -math.log(2.0)


def _smoothed_sigmoid(x: jax.Array, label_smoothing: float) -> jax.Array:
    """``-(1-ε) log σ(x) - ε log σ(-x)``: x [B] -> [B] (ε = 0: plain ``-log σ(x)``)."""
    loss = -jax.nn.log_sigmoid(x)
    if label_smoothing:
        loss = (1.0 - label_smoothing) * loss - label_smoothing * jax.nn.log_sigmoid(-x)
    return loss


def _reward_metrics(chosen_rewards, rejected_rewards, logps_c, logps_r) -> dict:
    return {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).astype(jnp.float32),
        "rewards/margins": chosen_rewards - rejected_rewards,
        "logps/chosen": logps_c,
        "logps/rejected": logps_r,
    }


def dpo_loss(
    logps_c: jax.Array,
    logps_r: jax.Array,
    ref_c: jax.Array,
    ref_r: jax.Array,
    n_c: jax.Array,
    n_r: jax.Array,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, dict]:
    """DPO loss per pair and its metrics.

    Args:
      logps_c, logps_r: [B] summed log-probabilities of the chosen / rejected completion
        under the policy.
      ref_c, ref_r: [B] the same under the reference model (no gradient flows into them).
      n_c, n_r: [B] completion token counts (IPO averages the log-ratios per token).
      beta: β (for IPO the regulariser τ).
      loss_type: ``sigmoid`` (DPO), ``ipo`` or ``hinge`` (SLiC).
      label_smoothing: ε of conservative DPO (``sigmoid`` only).

    Returns:
      ``(loss [B], metrics {name: [B]})``; rewards are ``β * (policy - reference)``.
    """
    chosen_lr, rejected_lr = logps_c - ref_c, logps_r - ref_r
    delta = chosen_lr - rejected_lr
    if loss_type == "sigmoid":
        loss = _smoothed_sigmoid(beta * delta, label_smoothing)
    elif loss_type == "hinge":
        loss = jax.nn.relu(1.0 - beta * delta)
    elif loss_type == "ipo":
        # TRL normalises IPO's log-ratios by completion length (confirmed with the IPO
        # authors, per TRL's comment), so β is comparable across lengths.
        avg = chosen_lr / jnp.maximum(n_c, 1.0) - rejected_lr / jnp.maximum(n_r, 1.0)
        loss = (avg - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"loss_type {loss_type!r}; expected one of {DPO_LOSS_TYPES}")
    return loss, _reward_metrics(beta * chosen_lr, beta * rejected_lr, logps_c, logps_r)


def log1mexp(x: jax.Array) -> jax.Array:
    """``log(1 - exp(x))`` for x <= 0, accurate on both sides of ``-log 2``.

    Each branch is evaluated on inputs clamped to its own side, so the branch
    ``jnp.where`` discards produces no inf/NaN (whose gradient would still leak in).
    """
    lo = jnp.log1p(-jnp.exp(jnp.minimum(x, _LOG_HALF)))
    hi = jnp.log(-jnp.expm1(jnp.maximum(x, _LOG_HALF)))
    return jnp.where(x < _LOG_HALF, lo, hi)


def orpo_loss(
    avg_c: jax.Array, avg_r: jax.Array, nll: jax.Array, *, beta: float
) -> tuple[jax.Array, dict]:
    """ORPO loss per pair (Hong et al. 2024, TRL's ``odds_ratio_loss``).

    Args:
      avg_c, avg_r: [B] per-token average log-probabilities of the completions.
      nll: [] or [B]: the chosen sequences' NLL term (TRL: mean token cross-entropy over
        prompt and completion of the chosen sequences of the micro-batch).
      beta: λ, the weight of the odds-ratio term (TRL's ``beta``).

    Returns:
      ``(nll - β log σ(log_odds) [B], metrics)``; rewards are ``β * avg``.
    """
    log_odds = (avg_c - avg_r) - (log1mexp(avg_c) - log1mexp(avg_r))
    ratio = jax.nn.log_sigmoid(log_odds)
    loss = nll - beta * ratio
    metrics = _reward_metrics(beta * avg_c, beta * avg_r, avg_c, avg_r)
    metrics.update(
        nll_loss=jnp.broadcast_to(nll, avg_c.shape),
        log_odds_ratio=ratio,
        log_odds_chosen=log_odds,
    )
    return loss, metrics


def simpo_loss(
    avg_c: jax.Array,
    avg_r: jax.Array,
    *,
    beta: float,
    gamma: float,
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, dict]:
    """SimPO loss per pair (Meng et al. 2024; TRL's CPO ``simpo`` with ``cpo_alpha=0``).

    Args:
      avg_c, avg_r: [B] per-token average log-probabilities of the completions.
      beta: β, the reward scale.
      gamma: γ, the target reward margin (TRL's ``simpo_gamma``).
      label_smoothing: ε, as in conservative DPO.

    Returns:
      ``(-(1-ε) log σ(β(Δ - γ/β)) - ε log σ(-β(Δ - γ/β)) [B], metrics)``.
    """
    logits = (avg_c - avg_r) - gamma / beta
    loss = _smoothed_sigmoid(beta * logits, label_smoothing)
    return loss, _reward_metrics(beta * avg_c, beta * avg_r, avg_c, avg_r)
