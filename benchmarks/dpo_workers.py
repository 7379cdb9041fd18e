"""The two sides of ``bench_dpo.py``: jaxtune's DPO step and TRL's ``DPOTrainer`` step.

Run as ``python dpo_workers.py jax|trl SPEC_JSON`` by :class:`bench_train.Worker`'s
protocol (JSON lines on stdin/stdout, ``train_workers.serve``).

Both sides train the same pairs: ``batch`` pairs of a ``prompt``-token prompt and
``seq - prompt``-token chosen and rejected completions (the last one EOS), random ids,
no padding, so each step scores 2 x batch sequences of ``seq`` tokens with the policy
(forward + backward) and the reference (forward). TRL gets them as text through a
word-level tokenizer whose vocabulary is the model's (token ``i`` is the word ``t<i>``),
so its own tokenization yields exactly these ids; the reference is the policy with its
adapter disabled on both sides (LoRA).
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
from train_workers import LORA_TARGETS, _jax_optim, _rss_mib, serve


def make_pairs(spec: dict) -> list[tuple[list[int], list[int], list[int]]]:
    """[(prompt ids, chosen ids, rejected ids)] * batch; the completions end with EOS (id 2)."""
    rng = np.random.default_rng(spec["seed"])
    p, c, v = spec["prompt"], spec["seq"] - spec["prompt"], spec["vocab"]
    out = []
    for _ in range(spec["batch"]):
        ids = rng.integers(3, v, p + 2 * c).tolist()
        out.append((ids[:p], ids[p : p + c - 1] + [2], ids[p + c : p + 2 * c - 1] + [2]))
    return out


def pair_batch(spec: dict) -> dict[str, np.ndarray]:
    """jaxtune's DPO micro-batch of the pairs: 2B lines, chosen on even, rejected on odd."""
    lines, weights = [], []
    for prompt, chosen, rejected in make_pairs(spec):
        for comp in (chosen, rejected):
            ids = prompt + comp
            w = np.zeros(len(ids), np.float32)
            w[len(prompt) - 1 : len(ids) - 1] = 1.0  # targets that are completion tokens
            lines.append(ids)
            weights.append(w)
    ids = np.array(lines, np.int32)
    n, t = ids.shape
    return {
        "input_ids": ids,
        "targets": np.concatenate([ids[:, 1:], np.zeros((n, 1), np.int32)], axis=1),
        "loss_weights": np.stack(weights),
        "attention_mask": np.ones((n, t), np.int32),
        "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (n, t)).copy(),
        "segment_ids": np.ones((n, t), np.int32),
    }


class JaxDPO:
    """jaxtune's DPO step, built as ``jaxtune train`` builds it (``train.objective: dpo``)."""

    def __init__(self, spec: dict):
        import jax

        from jaxtune.config import config_from_dict, validate_against_devices
        from jaxtune.sharding import device_batch, make_mesh
        from jaxtune.train.state import make_state, setup_step
        from jaxtune.train.tasks import task_for

        self.rss = {"imports": _rss_mib()}
        cfg = config_from_dict({
            "model": {"path": spec["model_path"], "scan_layers": True, "dtype": "float32"},
            "data": {"format": "preference"},
            "peft": {"method": "lora", "rank": spec["rank"], "alpha": spec["alpha"],
                     "dropout": 0.0, "targets": LORA_TARGETS},
            "optim": _jax_optim(spec),
            "preference": {"beta": spec["beta"], "loss_type": "sigmoid"},
            "train": {"objective": "dpo", "batch_size": spec["batch"], "seq_len": spec["seq"],
                      "steps": 1000},
            "run": {"dir": os.path.join(spec["scratch"], "run")},
        })  # fmt: skip
        mesh = make_mesh(*validate_against_devices(cfg, jax.device_count(), 1))
        t0 = time.perf_counter()
        task = task_for(cfg)
        model = task.build_model(mesh)
        setup = setup_step(task, model, mesh, 1000)
        del model
        self.frozen = setup.frozen
        self.info = {"trainable": setup.info["trainable"], "total": setup.info["total"]}
        self.state = make_state(0, setup.params, setup.opt_state, cfg.train.seed, mesh)
        self.step_fn = setup.step_fn
        self.info["load_s"] = time.perf_counter() - t0
        self.batch = device_batch(task.batch(pair_batch(spec)), mesh)
        t0 = time.perf_counter()
        self.step_fn.lower(self.state, self.frozen, self.batch).compile()
        self.info["compile_s"] = time.perf_counter() - t0
        self.jax = jax

    def step(self) -> float:
        self.state, metrics = self.step_fn(self.state, self.frozen, self.batch)
        return float(self.jax.device_get(metrics["loss"]))

    def finish(self) -> dict:
        return {}


def word_tokenizer(vocab: int):
    """A real HF fast tokenizer: word ``t<i>`` <-> id ``i``; ids 0/1/2 = unk/bos/eos."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        pad_token="</s>",
    )  # fmt: skip


class TrlDPO:
    """TRL's ``DPOTrainer`` (PEFT LoRA, reference = adapter disabled): one optimizer step
    is ``training_step`` (TRL's concatenated forward, reference log-probs, loss,
    backward), gradient clipping and ``AdamW.step``, as ``Trainer``'s loop runs them."""

    def __init__(self, spec: dict):
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        import torch
        from datasets import Dataset
        from peft import LoraConfig
        from transformers import AutoModelForCausalLM
        from trl import DPOConfig, DPOTrainer

        self.rss = {"imports": _rss_mib()}
        torch.set_num_threads(spec["threads"])
        torch.manual_seed(spec["seed"])
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(
            spec["model_path"], dtype=torch.float32, attn_implementation="sdpa"
        )
        text = lambda ids: " ".join(f"t{i}" for i in ids)  # noqa: E731
        # TRL joins prompt + completion as strings and appends the EOS string itself.
        rows = [
            {"prompt": text(p), "chosen": " " + text(c[:-1]), "rejected": " " + text(r[:-1])}
            for p, c, r in make_pairs(spec)
        ]
        o = spec["optim"]
        args = DPOConfig(
            output_dir=os.path.join(spec["scratch"], "trl"), per_device_train_batch_size=spec["batch"],
            beta=spec["beta"], loss_type=["sigmoid"], max_length=None, learning_rate=o["lr"],
            adam_beta1=o["b1"], adam_beta2=o["b2"], adam_epsilon=o["eps"], weight_decay=o["wd"],
            max_grad_norm=o["clip"], lr_scheduler_type="constant", report_to=[], use_cpu=True,
            bf16=False, fp16=False, dataloader_num_workers=0, seed=spec["seed"],
            gradient_checkpointing=False, dataset_num_proc=None,
        )  # fmt: skip
        lora = LoraConfig(r=spec["rank"], lora_alpha=spec["alpha"], lora_dropout=0.0,
                          target_modules=LORA_TARGETS, task_type="CAUSAL_LM")  # fmt: skip
        self.trainer = DPOTrainer(
            model=model, args=args, train_dataset=Dataset.from_list(rows),
            processing_class=word_tokenizer(spec["vocab"]), peft_config=lora,
        )  # fmt: skip
        self.trainer.create_optimizer()
        self.trainer.current_gradient_accumulation_steps = 1  # set by Trainer's own loop
        self.model = self.trainer.model
        self.model.train()
        self.batch = next(iter(self.trainer.get_train_dataloader()))
        ids = self.batch["input_ids"]
        pairs = make_pairs(spec)
        want = [p + c for p, c, _ in pairs] + [p + r for p, _, r in pairs]
        # The same sequences (TRL's sampler may order the pairs differently).
        assert sorted(ids.tolist()) == sorted(want), "TRL's tokens differ from jaxtune's"
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.clip = o["clip"]
        self.torch = torch
        self.info = {"trainable": sum(p.numel() for p in self.params),
                     "total": sum(p.numel() for p in self.model.parameters()),
                     "load_s": time.perf_counter() - t0, "compile_s": None}  # fmt: skip

    def step(self) -> float:
        loss = self.trainer.training_step(self.model, self.batch)
        self.torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.trainer.optimizer.step()
        self.trainer.optimizer.zero_grad(set_to_none=True)
        return float(loss)

    def finish(self) -> dict:
        return {"threads": self.torch.get_num_threads()}


if __name__ == "__main__":
    sys.exit(serve(sys.argv[1:], {"jax": JaxDPO, "trl": TrlDPO}))
