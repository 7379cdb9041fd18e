"""Causal-LM fine-tuning (``train.objective: sft``): next-token cross-entropy on the
tokens the data format trains (completions, responses, or every token of text)."""

from __future__ import annotations

from flax import nnx

from jaxtune.eval.perplexity import evaluate_loss
from jaxtune.models.losses import token_loss_sums
from jaxtune.train.task import Task, register

LM_BATCH = ("input_ids", "targets", "loss_weights", "attention_mask", "positions", "segment_ids")


@register
class CausalLM(Task):
    """Token-weighted next-token loss; the validation metric is the held-out loss."""

    name = "sft"
    batch_ndims = {k: 2 for k in LM_BATCH}

    def loss_sums(self, model, batch, rng):
        return token_loss_sums(model, batch, rng, chunk=self.cfg.model.loss_chunk)

    def evaluate(self, model: nnx.Module, dataset, mesh) -> dict:
        t = self.cfg.train
        m = evaluate_loss(
            model,
            dataset,
            batch_size=t.batch_size,
            mesh=mesh,
            max_batches=t.max_eval_batches or None,
            loss_chunk=self.cfg.model.loss_chunk,
        )
        return {
            "eval/loss": m["loss"],
            "eval/perplexity": m["perplexity"],
            "eval/tokens": float(m["tokens"]),
        }
