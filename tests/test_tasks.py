"""The task interface: a third task registered in this one file trains through the one
loop (no task-specific branch), an unknown objective is refused before anything is
written, and ``plan`` compiles a classification task's own model (its head included)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxtune.config import load_config
from jaxtune.errors import ConfigError
from jaxtune.models.losses import token_loss_sums
from jaxtune.train.loop import train
from jaxtune.train.plan import plan
from jaxtune.train.task import TASKS, register
from jaxtune.train.tasks import task_for
from jaxtune.train.tasks.lm import CausalLM
from jaxtune.train.testing import read_metrics, write_config

SCALE = 3.0


@register
class WeightedLM(CausalLM):
    """Toy task: next-token loss with every trained token weighted ``SCALE``.

    The token-weighted mean loss (and so the gradient) equals plain SFT's, while the
    weight the step reports (``tokens``) is ``SCALE`` times larger: a run of it shows
    the loop used this task's loss and its sums-then-divide semantics.
    """

    name = "weighted_lm_test"

    def loss_sums(self, model, batch, rng):
        batch = {**batch, "loss_weights": batch["loss_weights"] * SCALE}
        return token_loss_sums(model, batch, rng, chunk=self.cfg.model.loss_chunk)


def _cfg(tiny_run, name: str, objective: str):
    path = write_config(
        tiny_run["root"] / f"{name}.yaml",
        tiny_run["model"],
        tiny_run["data"],
        tiny_run["root"] / name,
        train=f"{{steps: 3, batch_size: 8, seq_len: 32, objective: {objective}}}",
        checkpoint="{every: 0, async_save: false}",
    )
    return load_config(path)


def test_a_task_registered_in_one_file_trains_through_the_loop(tiny_run):
    assert isinstance(task_for(_cfg(tiny_run, "x", "weighted_lm_test")), WeightedLM)
    sft = train(_cfg(tiny_run, "sft", "sft"))
    weighted = train(_cfg(tiny_run, "weighted", "weighted_lm_test"))
    assert weighted["steps"] == sft["steps"] == 3
    rows_s, rows_w = read_metrics(sft["run_dir"]), read_metrics(weighted["run_dir"])
    assert [r["step"] for r in rows_w] == [1, 2, 3]
    for s, w in zip(rows_s, rows_w, strict=True):
        assert w["tokens"] == pytest.approx(SCALE * s["tokens"])
        assert w["loss"] == pytest.approx(s["loss"], rel=1e-5)  # a mean: weights cancel
    # The run records its objective; resuming it under another one is refused.
    with pytest.raises(ConfigError, match="objective"):
        train(_cfg(tiny_run, "weighted", "sft"))


def test_unknown_objective_is_refused_before_anything_is_written(tiny_run):
    cfg = _cfg(tiny_run, "nope", "no_such_task")
    with pytest.raises(ConfigError, match="no_such_task.*registered: .*sft"):
        train(cfg)
    assert not (tiny_run["root"] / "nope").exists()
    assert "sft" in TASKS and "classification" in TASKS


def test_plan_compiles_the_classification_task_with_its_head(tiny_run):
    base = [
        f"model.path={tiny_run['model']}",
        "peft.method=lora",
        "peft.rank=4",
        "peft.alpha=8",
        "train.steps=2",
        "train.batch_size=2",
        "train.seq_len=16",
    ]
    lm = plan(load_config(None, base), jax.devices()[:1], target="cpu")
    cls = plan(
        load_config(
            None,
            [*base, "data.format=classification", "peft.head=classification", "peft.num_labels=3"],
        ),
        jax.devices()[:1],
        target="cpu",
    )
    hidden = 32  # write_tiny_model's default
    # LoRA factors alike; the classifier adds its head (a decoder's score: no bias).
    assert cls.params["trainable"] - lm.params["trainable"] == hidden * 3
    assert np.isfinite(cls.argument_bytes) and cls.argument_bytes > 0
