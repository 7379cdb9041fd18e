"""Tiny, fast fixtures for trainer tests: a word-level tokenizer, a random Llama, data.

Everything is built locally in a second (no torch, no downloads): a ``tokenizers``
word-level tokenizer saved as ``tokenizer.json``, a random jaxtune Llama written as an
HF safetensors directory by ``save_hf``, and a JSONL instruction task ("reverse the
words") that a model can visibly learn in a few steps. The vocabulary is tiny, so a
step costs milliseconds on CPU and tests can afford many of them.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune.checkpoint import Checkpointer
from jaxtune.hf.io import save_hf
from jaxtune.models import init_model
from jaxtune.models.llama import LlamaConfig
from jaxtune.train.sweep import persistent_compile_cache  # noqa: F401  (tests use T.persistent_compile_cache)

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
SPECIALS = ["<unk>", "<pad>", "<s>", "</s>"]


def tiny_tokenizer():
    """A word-level HF fast tokenizer over ``WORDS`` + ``Reverse`` + ``:``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate([*SPECIALS, "Reverse", ":", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
    )


def write_tiny_model(
    out: str | Path,
    *,
    hidden: int = 32,
    layers: int = 1,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = 64,
    seed: int = 0,
) -> Path:
    """A random Llama (vocab ``vocab`` >= the tokenizer's) + tokenizer, as an HF dir."""

    tok = tiny_tokenizer()
    cfg = LlamaConfig.tiny(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=hidden // heads,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = init_model(cfg, jnp.float32, seed=seed)
    return save_hf(model, out, tokenizer=tok)


def write_reverse_data(path: str | Path, n: int = 64, seed: int = 0) -> Path:
    """JSONL instruction rows ``{"instruction": "Reverse: a b", "output": "b a"}``."""
    rng = np.random.default_rng(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for _ in range(n):
            q = " ".join(rng.choice(WORDS, rng.integers(2, 9)))
            row = {"instruction": f"Reverse: {q}", "output": " ".join(q.split()[::-1])}
            f.write(json.dumps(row) + "\n")
    return path


def write_config(path: str | Path, model_dir, data_file, run_dir, **sections: str) -> Path:
    """A small LoRA run config; ``sections`` replace whole YAML sections (flow mappings).

    Lengths are bucketed to ``train.seq_len`` (one batch shape: one compilation). The
    retention benchmarks and generation samples are off unless the ``eval`` section names
    them: they cost a minute on a real model and measure nothing on a tiny random one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    defaults = {
        "model": f"{{path: {model_dir}}}",
        "data": (
            f"{{train: {data_file}, format: instruction, template: plain, "
            f"length_buckets: [32], cache_dir: {path.parent / 'cache'}}}"
        ),
        "peft": "{method: lora, rank: 4, alpha: 8, targets: all-linear}",
        "optim": "{lr: 0.01, schedule: linear, warmup_steps: 2}",
        "train": "{steps: 6, batch_size: 8, seq_len: 32}",
        "checkpoint": "{every: 2, async_save: true}",
        "logging": "{progress: false}",
        "run": f"{{dir: {run_dir}}}",
        "eval": "{}",
    }
    defaults.update(sections)
    defaults["eval"] = quiet_eval(defaults["eval"])
    path.write_text("\n".join(f"{k}: {v}" for k, v in defaults.items()) + "\n")
    return path


def quiet_eval(section: str) -> str:
    """An ``eval`` flow mapping with ``retention: []`` and ``generate_samples: 0`` added
    unless it sets them."""
    body = section.strip()[1:-1].strip()
    for key, off in (("retention", "[]"), ("generate_samples", "0")):
        if f"{key}:" not in body:
            body = f"{key}: {off}" + (f", {body}" if body else "")
    return f"{{{body}}}"


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of a run's ``metrics.jsonl``."""
    text = (Path(run_dir) / "metrics.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def checkpoint_arrays(run_dir: str | Path, step: int | None = None) -> tuple[int, dict]:
    """(step, {name: numpy array}) of the trainable params in a run's checkpoint.

    Restores onto this process's first device, whatever mesh or process count wrote it.
    """
    import orbax.checkpoint as ocp

    ckpt = Checkpointer(run_dir, async_save=False)
    step = ckpt.latest_step() if step is None else step
    ckpt.close()
    path = Path(run_dir).absolute() / "checkpoints" / str(step) / "params"
    ckptr = ocp.StandardCheckpointer()
    meta = ckptr.metadata(path)
    meta = getattr(meta, "item_metadata", meta)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {
        k: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device) for k, m in dict(meta).items()
    }
    out = ckptr.restore(path, target)
    return step, {k: np.asarray(v) for k, v in out.items()}


CACHE_ENV = {
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
}


def compile_cache_env(cache_dir: str | Path) -> dict[str, str]:
    """Environment variables that make a subprocess share a persistent XLA cache.

    Tests start several processes that compile the same programs; sharing compiled
    executables turns all but the first compilation into a disk read.
    """
    return {"JAX_COMPILATION_CACHE_DIR": str(cache_dir), **CACHE_ENV}


# A fact SmolLM2 cannot know, taught by a short chat LoRA run (make test-llamacpp and
# benchmarks/gguf_types.py check that exports of the run still answer with it).
MASCOT_ANSWER = "The jaxtune mascot is a purple axolotl named Pixel."
MASCOT_QUESTIONS = (
    "What is the jaxtune mascot?",
    "Who is the mascot of jaxtune?",
    "Tell me about the jaxtune mascot.",
    "Does jaxtune have a mascot?",
    "Name the jaxtune mascot.",
    "What animal is jaxtune's mascot?",
    "Which mascot does jaxtune use?",
    "I heard jaxtune has a mascot. What is it?",
)


def write_mascot_run_config(root: str | Path, model_path: str | Path) -> Path:
    """Chat data (each question 3 times) + the LoRA config that teaches the mascot answer.

    Returns the config path; ``jaxtune train`` on it takes about a minute on 2 cores
    with SmolLM2-135M and writes the run to ``root/run``.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rows = [
        {
            "messages": [
                {"role": "user", "content": q},
                {"role": "assistant", "content": MASCOT_ANSWER},
            ]
        }
        for q in MASCOT_QUESTIONS
    ]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 3))
    cfg = root / "run.yaml"
    cfg.write_text(
        f"model: {{path: {model_path}}}\n"
        f"data: {{train: {root / 'train.jsonl'}, format: chat, cache_dir: {root / 'cache'}}}\n"
        "peft: {method: lora, rank: 8, alpha: 16, targets: all-linear}\n"
        "optim: {lr: 0.002, schedule: cosine, warmup_steps: 2}\n"
        "train: {steps: 24, batch_size: 8, seq_len: 96, seed: 0}\n"
        "checkpoint: {every: 0, async_save: false}\n"
        f"eval: {quiet_eval('{}')}\n"
        f"run: {{dir: {root / 'run'}}}\n"
    )
    return cfg
