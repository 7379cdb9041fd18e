"""Preference tuning (``train.objective`` ``dpo``, ``orpo``, ``simpo``) on pairs of
``data.format: preference``.

A micro-batch holds B pairs as 2B lines (pair ``k``: chosen on line ``2k``, rejected on
``2k + 1``, :mod:`jaxtune.data.preference`), so one forward pass scores both sides and a
pair never straddles two devices. Per line the loss reads the summed log-probability of
the completion tokens and their count (:func:`jaxtune.models.losses.row_nll_sums`); the
pair losses and TRL-named metrics are :mod:`jaxtune.models.pair_losses`.

``loss_sums`` returns the loss summed over pairs with weight = number of pairs (padding
pairs weigh 0), plus the metrics as sums, so gradient accumulation and multi-batch
evaluation divide once by the pair count: one big batch. The exception is ORPO's NLL
term, which TRL defines as the token mean over one micro-batch's chosen sequences;
accumulation then averages those means over micro-batches, as TRL's does.

DPO needs the reference model: the policy with adapters off, plus a frozen copy of the
trainable base weights (all of them for ``peft.method: full``), see
:mod:`jaxtune.peft.reference`; or, with ``preference.precompute_ref``, its log-probabilities
computed once before training and read from the batch (``ref_logps``,
:mod:`jaxtune.train.reference_logps`). ORPO and SimPO need none.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtune.data import BatchIterator
from jaxtune.errors import ConfigError
from jaxtune.models.losses import row_nll_sums
from jaxtune.models.pair_losses import dpo_loss, orpo_loss, simpo_loss
from jaxtune.peft.reference import attach_reference, reference_model
from jaxtune.sharding import device_batch
from jaxtune.train.reference_logps import reference_logps
from jaxtune.train.task import Task, register
from jaxtune.train.tasks.lm import LM_BATCH

# preference.beta when the config leaves it null: TRL's DPOConfig and ORPOConfig (0.1);
# for SimPO the SimPO paper's setting (TRL's CPOConfig default 0.1 is CPO's, not SimPO's).
DEFAULT_BETA = {"dpo": 0.1, "orpo": 0.1, "simpo": 2.0}


def pair_beta(cfg) -> float:
    """``preference.beta``, or the objective's default when it is null."""
    beta = cfg.preference.beta
    return float(DEFAULT_BETA[cfg.train.objective] if beta is None else beta)


def _sides(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[2B] lines -> ([B] chosen, [B] rejected); a reshape keeps each device's rows local."""
    x = x.reshape(-1, 2)
    return x[:, 0], x[:, 1]


@partial(jax.jit, static_argnames=("graphdef", "task"))
def _eval_sums(graphdef, state, batch, task):
    return task.loss_sums(nnx.merge(graphdef, state), batch, None)


class PreferenceTask(Task):
    """Shared by the preference objectives: pair batches, sums, validation metrics."""

    batch_ndims = {k: 2 for k in LM_BATCH}

    def prepare(self, datasets, previous_run):
        for split, ds in datasets.items():
            if not getattr(ds, "paired", False):
                raise ConfigError(
                    f"train.objective={self.name} trains on preference pairs, but data.{split} "
                    "is not paired; set data.format=preference"
                )

    def abstract_batch(self, batch_size: int, seq_len: int, grad_accum: int = 1) -> dict:
        # Two lines (chosen, rejected) per pair.
        return super().abstract_batch(2 * batch_size, seq_len, grad_accum)

    def completion_logps(self, model, batch, rng, extra=()) -> jax.Array:
        """float32 [1 + len(extra), 2B]: ``-sum NLL`` per line over the completion, then
        over each of the ``extra`` [2B, T] weightings (one forward pass)."""
        w = jnp.stack([batch["loss_weights"], *extra]).astype(jnp.float32)
        return -row_nll_sums(model, batch, rng, w, chunk=self.cfg.model.loss_chunk)

    def pair_losses(self, model, batch, rng) -> tuple[jax.Array, dict]:
        """``(loss [B], metrics {TRL name: [B]})`` of a micro-batch's pairs."""
        raise NotImplementedError

    def loss_sums(self, model, batch, rng):
        """(sum of pair losses, pair count, {metric: sum over pairs}) of a micro-batch."""
        loss, metrics = self.pair_losses(model, batch, rng)
        n_c, n_r = _sides(batch["loss_weights"].sum(-1))
        valid = ((n_c > 0) & (n_r > 0)).astype(jnp.float32)  # padding pairs have no tokens
        # where, not a product: a padding pair's NaN (0/0 averages) must not leak in.
        sums = {k: jnp.sum(jnp.where(valid > 0, m, 0.0)) for k, m in metrics.items()}
        return jnp.sum(jnp.where(valid > 0, loss, 0.0)), jnp.sum(valid), sums

    def evaluate(self, model, dataset, mesh) -> dict:
        """``eval/loss`` (the objective's loss) and ``eval/<TRL metric>`` per pair, over
        ``dataset`` (in order; ``train.max_eval_batches`` caps it); ``eval/pairs``."""
        t = self.cfg.train
        it = BatchIterator.one_pass(dataset, t.batch_size, jax.process_index(), jax.process_count())
        graphdef, state = nnx.split(model)
        total, pairs, sums = 0.0, 0.0, {}
        for n, rows in enumerate(it):
            if t.max_eval_batches and n >= t.max_eval_batches:
                break
            s, w, m = _eval_sums(graphdef, state, device_batch(self.batch(rows), mesh), self)
            # Host float64 sums: exact accumulation over many batches.
            total, pairs = total + float(s), pairs + float(w)
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        denom = max(pairs, 1.0)
        out = {"eval/loss": total / denom if pairs else float("nan"), "eval/pairs": pairs}
        out.update({f"eval/{k}": v / denom for k, v in sums.items()})
        return out


@register
class DPO(PreferenceTask):
    """Direct preference optimisation against the reference model (sigmoid, IPO, hinge)."""

    name = "dpo"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.precompute = bool(cfg.preference.precompute_ref)
        self.datasets: dict = {}
        if self.precompute:  # the reference log-probability of each line comes with it
            self.batch_ndims = {**self.batch_ndims, "ref_logps": 1}

    def prepare(self, datasets, previous_run):
        super().prepare(datasets, previous_run)
        self.datasets = datasets  # build_model scores them with the reference (precompute)

    def build_model(self, mesh):
        model = super().build_model(mesh)
        if not self.precompute:
            attach_reference(model, self.trainable(model))
        for ds in self.datasets.values() if self.precompute else ():
            # Before any update the model is the reference (adapters are switched off).
            ds.ref_logps = reference_logps(self, model, ds, mesh)
        return model

    def abstract_model(self, model_cfg):
        model = super().abstract_model(model_cfg)
        if not self.precompute:
            attach_reference(model, self.trainable(model))
        return model

    def abstract_batch(self, batch_size: int, seq_len: int, grad_accum: int = 1) -> dict:
        out = super().abstract_batch(batch_size, seq_len, grad_accum)
        if "ref_logps" in out:
            out["ref_logps"] = jax.ShapeDtypeStruct(out["ref_logps"].shape, jnp.float32)
        return out

    def pair_losses(self, model, batch, rng):
        logps = self.completion_logps(model, batch, rng)[0]
        if "ref_logps" in batch:
            ref = batch["ref_logps"].astype(jnp.float32)
        else:
            # The reference sees no dropout and passes no gradient (its trainable-looking
            # weights are frozen copies; stop_gradient makes that explicit for XLA too).
            ref = self.completion_logps(reference_model(model), batch, None)[0]
            ref = jax.lax.stop_gradient(ref)
        n_c, n_r = _sides(batch["loss_weights"].sum(-1).astype(jnp.float32))
        p = self.cfg.preference
        return dpo_loss(
            *_sides(logps),
            *_sides(ref),
            n_c,
            n_r,
            beta=pair_beta(self.cfg),
            loss_type=p.loss_type,
            label_smoothing=p.label_smoothing,
        )


def _average_logps(task, model, batch, rng, extra=()):
    """(per-token average completion log-prob [2B], the extra sums [K, 2B])."""
    out = task.completion_logps(model, batch, rng, extra)
    n = jnp.maximum(batch["loss_weights"].sum(-1).astype(jnp.float32), 1.0)
    return out[0] / n, out[1:]


@register
class ORPO(PreferenceTask):
    """Odds-ratio preference optimisation: chosen NLL + λ odds-ratio term, no reference."""

    name = "orpo"

    def pair_losses(self, model, batch, rng):
        # TRL's NLL term covers the chosen sequence's prompt and completion: every
        # target that is a real token (the next line position is attended).
        every = jnp.pad(batch["attention_mask"][:, 1:], ((0, 0), (0, 1)))
        avg, (all_logps,) = _average_logps(self, model, batch, rng, (every,))
        nll_c, _ = _sides(-all_logps)
        tokens_c, _ = _sides(every.sum(-1).astype(jnp.float32))
        nll = jnp.sum(nll_c) / jnp.maximum(jnp.sum(tokens_c), 1.0)
        return orpo_loss(*_sides(avg), nll, beta=pair_beta(self.cfg))


@register
class SimPO(PreferenceTask):
    """Simple preference optimisation: length-normalised margin loss, no reference."""

    name = "simpo"

    def pair_losses(self, model, batch, rng):
        avg, _ = _average_logps(self, model, batch, rng)
        p = self.cfg.preference
        return simpo_loss(
            *_sides(avg),
            beta=pair_beta(self.cfg),
            gamma=p.simpo_gamma,
            label_smoothing=p.label_smoothing,
        )
