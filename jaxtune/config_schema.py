"""Run-config schema: the frozen dataclasses of every section, allowed values, ranges.

Loading, overrides and validation live in :mod:`jaxtune.config` (which re-exports all of
this); the Markdown reference is rendered from these docstrings by
:mod:`jaxtune.config_reference`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from jaxtune.data.config import BALANCE, FORMATS, DataConfig

# --------------------------------------------------------------------------- schema


@dataclass(frozen=True)
class ModelConfig:
    """The pretrained model and how its weights are stored and computed.

    Attributes:
      path: Hugging Face model directory (safetensors), ``.gguf`` file, or jaxtune
        checkpoint / run directory.
      dtype: storage dtype of the parameters.
      compute_dtype: dtype of activations and matmuls; null = same as ``dtype``.
      scan_layers: run the decoder layers with ``nnx.scan`` (one compiled layer; faster
        compiles, stacked parameters).
      remat: activation rematerialisation per layer: ``none``, ``dots`` (save matmul
        outputs only), ``full`` (recompute everything in the backward pass: only each
        layer's input is kept) or ``offload`` (as ``full``, with those inputs kept in
        host memory, copied back layer by layer in the backward pass: Llama 3.1 8B at
        2 x 2048 moves 1 GiB off the accelerator; the same as ``full`` on a CPU).
      attention: attention kernel: ``flash`` (jaxtune's memory-efficient attention in
        plain JAX: only the output and log-sum-exp are kept for the backward pass, keys
        in blocks of 512, queries in blocks of 1024), ``blocked`` (exact attention by
        blocks of 64 queries, causal models skipping the keys after each block, the
        probabilities kept for the backward pass: the fastest on CPU), ``xla`` /
        ``cudnn`` (``jax.nn.dot_product_attention``), or ``auto``: cuDNN (or XLA) on
        GPU; on CPU ``blocked`` while one layer's [batch, heads, seq, seq] float32
        scores fit 64 MiB, else ``flash``; ``flash`` on TPU.
      quantize: store the frozen kernels of the linear layers in the layer stack
        quantized (QLoRA-style; embeddings, norms and LM head stay in ``dtype``):
        ``nf4`` (4-bit NormalFloat, bf16 absmax per block of 64) or ``int8``; null = no
        quantization. Needs a PEFT method other than ``full``.
      max_seq_len: longest sequence the model is used with (RoPE tables, KV cache); null =
        the model's own limit.
      mlp_chunks: run each layer's MLP over this many blocks of tokens, one after the
        other, each recomputed in the backward pass: its [tokens, ffn] activations
        exist for one block at a time (Llama 3.1 8B QLoRA at 2 x 2048: 0.55 GiB less
        at 4 blocks, no more at 16) for one more MLP forward (and dequantization) per
        step (on a CPU without remat it can be faster: smaller blocks stay in cache);
        LoRA dropout masks then differ from the unblocked ones. 1 = off.
      loss_chunk: sequence positions per chunk of the LM cross-entropy: the [B, chunk,
        vocab] logits are computed, reduced and recomputed in the backward pass one chunk
        at a time, so a micro-batch's full [B, T, vocab] logits never exist (large
        vocabularies: Llama 3 128k, Qwen2 152k). null = auto (chunk when those float32
        logits would exceed 1 GiB); 0 = never chunk.
      preset: architecture preset (e.g. ``llama31_8b``) that ``jaxtune plan`` compiles for
        when ``path`` does not exist yet; training always reads the architecture from
        ``path``.
    """

    path: str | None = None
    dtype: str = "float32"
    compute_dtype: str | None = None
    scan_layers: bool = True
    remat: str = "none"
    attention: str = "auto"
    quantize: str | None = None
    max_seq_len: int | None = None
    mlp_chunks: int = 1
    loss_chunk: int | None = None
    preset: str | None = None


@dataclass(frozen=True)
class PeftConfig:
    """What is trained: the whole model, LoRA/DoRA factors, bottleneck adapters or a head.

    Attributes:
      method: ``full`` fine-tuning, ``lora``, ``dora``, bottleneck ``adapter``, or ``feature``
        (train only a head on the frozen backbone's features).
      rank: LoRA/DoRA rank.
      alpha: LoRA/DoRA scale numerator (scale = alpha / rank); required for lora and dora.
      dropout: dropout on the LoRA input (and inside adapters).
      targets: module names to adapt, e.g. ``[q_proj, v_proj]`` (a comma-separated string
        works too); ``all-linear`` = every linear layer except the LM head.
      rslora: rank-stabilised scale alpha / sqrt(rank) instead of alpha / rank.
      adapter_size: bottleneck width of adapters; null = hidden size / ``adapter_reduction``.
      adapter_reduction: hidden size / bottleneck width when ``adapter_size`` is null.
      adapter_placement: ``houlsby`` (after attention and MLP) or ``pfeiffer`` (after MLP).
      adapter_activation: nonlinearity inside the adapter bottleneck.
      unfreeze: extra parameters to train besides the method's own: named groups
        (``norms``, ``biases``, ``lm_head``, ``embeddings``) or regexes over parameter paths.
      unfreeze_top_layers: also train every parameter of the top N decoder layers.
      head: ``lm`` (next-token prediction) or ``classification`` (a new head on pooled
        features).
      num_labels: classes of the classification head; null = from ``data.labels`` or data.
      pooling: how a sequence becomes one feature vector: ``cls`` (first token), ``mean``
        (over non-padding tokens), ``last`` (last non-padding token) or ``pooler`` (BERT's
        pretrained ``tanh(dense(CLS))``, as ``BertForSequenceClassification`` reads it).
      feature_layer: hidden-state layer the head reads (-1 = final, after the last norm).
      head_hidden: 0 = a linear head, else the hidden size of a two-layer MLP head.
      dtype: dtype of the LoRA / DoRA factors and adapter weights, and so of their
        gradients and optimizer state: ``float32`` (PEFT's default; safe with any
        learning rate) or ``bfloat16`` (torchtune's; half the memory: 0.23 -> 0.12 GiB
        of LoRA weights + AdamW state for Llama 3.1 8B at r=8 on every linear layer).
    """

    method: str = "lora"
    rank: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    rslora: bool = False
    adapter_size: int | None = None
    adapter_reduction: int = 16
    adapter_placement: str = "houlsby"
    adapter_activation: str = "gelu"
    unfreeze: tuple[str, ...] = ()
    unfreeze_top_layers: int = 0
    head: str = "lm"
    num_labels: int | None = None
    pooling: str = "last"
    feature_layer: int = -1
    head_hidden: int = 0
    dtype: str = "float32"


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer and learning-rate schedule (an optax chain; frozen leaves are masked out).

    Attributes:
      name: ``adamw``, ``adafactor``, ``sgd`` (with momentum) or ``lion``.
      lr: peak learning rate.
      schedule: decay after warmup: ``constant``, ``linear`` or ``cosine``.
      warmup_steps: linear warmup from 0 to ``lr`` over this many optimizer steps.
      warmup_ratio: warmup as a fraction of the total steps (instead of ``warmup_steps``).
      min_lr_ratio: the schedule decays to ``lr * min_lr_ratio``.
      weight_decay: decoupled weight decay (not applied to biases, norms and embeddings).
      b1: first-moment decay (adamw, lion).
      b2: second-moment decay (adamw, lion).
      eps: adamw epsilon.
      momentum: sgd momentum.
      grad_clip: clip gradients to this global norm; null = no clipping.
    """

    name: str = "adamw"
    lr: float = 1e-4
    schedule: str = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    momentum: float = 0.9
    grad_clip: float | None = 1.0


@dataclass(frozen=True)
class TrainConfig:
    """Length of the run, batch shape, and the host loop's cadences.

    Attributes:
      steps: number of optimizer steps (set exactly one of ``steps`` and ``epochs``).
      epochs: passes over the training split, may be fractional.
      batch_size: global examples per forward/backward pass, summed over all devices; one
        optimizer step sees ``batch_size * grad_accum`` examples (preference pairs for
        the preference objectives: two sequences each).
      seq_len: tokens per row (longer examples are truncated, shorter ones padded/packed).
      seed: the run seed; every random stream (init, dropout, data order) derives from it.
      grad_accum: micro-batches accumulated per optimizer step.
      eval_every: compute the validation loss every N steps (0 = never during training).
      log_every: log metrics every N steps.
      early_stopping_patience: stop after N evaluations without improvement (0 = off).
      early_stopping_metric: metric watched by early stopping (lower is better for losses).
      resume: continue from the latest checkpoint in ``run.dir`` if there is one.
      overwrite: start over: delete the run's own files in ``run.dir`` first (only in a
        jaxtune run directory; files jaxtune did not write are refused, never deleted).
      max_eval_batches: cap on validation batches per evaluation; null = the whole split.
      objective: the training task: ``sft`` (next-token loss on the trained tokens of
        the data format), or preference tuning on ``data.format: preference`` pairs:
        ``dpo`` (against the reference model: the policy with adapters off, or a frozen
        copy of the weights for ``peft.method: full``), ``orpo`` or ``simpo`` (no
        reference); see the ``preference`` section. ``peft.head: classification``
        selects ``classification``.
    """

    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 8
    seq_len: int = 512
    seed: int = 0
    grad_accum: int = 1
    eval_every: int = 0
    log_every: int = 1
    early_stopping_patience: int = 0
    early_stopping_metric: str = "eval/loss"
    resume: bool = True
    overwrite: bool = False
    max_eval_batches: int | None = None
    objective: str = "sft"


@dataclass(frozen=True)
class PreferenceConfig:
    """Preference tuning (``train.objective`` ``dpo``, ``orpo`` or ``simpo``); TRL's names.

    Attributes:
      beta: β: DPO's deviation from the reference (IPO's τ), ORPO's λ (TRL's ``beta``),
        SimPO's reward scale; null = the objective's default: 0.1 for dpo and orpo
        (TRL's DPOConfig / ORPOConfig), 2.0 for simpo (the SimPO paper's; TRL's
        CPOConfig default of 0.1 is CPO's).
      loss_type: DPO's loss: ``sigmoid`` (DPO), ``ipo`` (IPO, log-ratios averaged per
        completion token as TRL does) or ``hinge`` (SLiC).
      label_smoothing: ε, the probability that a pair's label is flipped: conservative
        DPO (``-(1-ε) log σ(βδ) - ε log σ(-βδ)``, TRL's sigmoid loss before 1.0) with
        ``loss_type: sigmoid``, and the same smoothing of SimPO's loss (TRL's CPO).
      simpo_gamma: SimPO's target reward margin γ.
      precompute_ref: compute DPO's reference log-probabilities once before training (one
        pass per split, cached under ``data.cache_dir`` keyed by the data and the
        model's files): steps then skip the reference forward pass, and full
        fine-tuning keeps no frozen copy of the weights.
    """

    beta: float | None = None
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    precompute_ref: bool = False


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh ``(data, fsdp, tensor)``; the product must equal the device count.

    Attributes:
      data: data-parallel replicas (-1 = all devices not used by the other axes).
      fsdp: parameter/optimizer-state sharding degree; the batch is also split over it.
      tensor: tensor-parallel degree (shards heads and MLP width).
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1


@dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints in ``run.dir``.

    Attributes:
      every: save every N optimizer steps (0 = only at the end).
      keep: number of most recent checkpoints kept.
      keep_best: also keep the checkpoint with the best ``best_metric``.
      best_metric: metric that ranks checkpoints for ``keep_best``.
      best_mode: ``min`` or ``max``: whether lower or higher ``best_metric`` is better.
      async_save: write checkpoints in the background while training continues.
      save_full: save the whole state; null = adapters + optimizer only for PEFT runs, the
        full state for full fine-tuning.
    """

    every: int = 0
    keep: int = 3
    keep_best: bool = False
    best_metric: str = "eval/loss"
    best_mode: str = "min"
    async_save: bool = True
    save_full: bool | None = None


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation tasks run during and after training (and by ``jaxtune eval``).

    Attributes:
      tasks: evaluation task names (e.g. ``[perplexity, hellaswag]``).
      every: run the tasks every N steps (0 = not during training).
      max_items: cap on items per task; null = all.
      at_end: run the tasks after the last step.
      at_start: also run them before the first step, for a before/after table
        (``eval/eval_report.md`` in the run directory).
      num_fewshot: solved examples before each multiple-choice question.
      batch_size: scored (item, choice) rows per forward pass.
      generate_samples: validation prompts the model answers (greedy) before and after
        training, shown side by side in ``report.md`` with each answer's error category
        (empty, repetitive, cut off, exact match, other); 0 = none.
      max_new_tokens: generation length for samples and generative tasks.
      decontaminate: also score each multiple-choice task on its clean items, those that
        share no word 13-gram with the training split (lm-evaluation-harness's
        convention), reported beside the full score as ``{task}/clean`` (with
        ``removed``, the items left out); ``eval/contamination.json`` lists them.
      retention: general multiple-choice benchmarks scored zero-shot on the base model
        and on the fine-tuned one, to measure forgetting: the change is reported in
        ``report.md``, ``summary.json`` and sweep tables (``retention/change``). ``[]``
        turns it off. Language-model runs only (not classifier heads).
      retention_items: the first N items of each retention task (200 items: about +-3.5
        points of standard error on accuracy).
      bias_probe: the counterfactual bias probe in a classifier run's final report
        (``classification_report.{md,json}``): flip rate and score gap per attribute on
        texts that differ only in a pronoun, a name or an age. ``builtin`` (the
        project's 400 templated sentences), ``none``, or a JSONL file of
        ``{"attribute": str, "variants": {value: text}}`` groups. Classifier heads only.
    """

    tasks: tuple[str, ...] = ()
    every: int = 0
    max_items: int | None = None
    at_end: bool = True
    at_start: bool = True
    num_fewshot: int = 0
    batch_size: int = 32
    generate_samples: int = 3
    max_new_tokens: int = 64
    decontaminate: bool = False
    retention: tuple[str, ...] = ("arc_easy", "hellaswag")
    retention_items: int = 200
    bias_probe: str = "builtin"


@dataclass(frozen=True)
class LoggingConfig:
    """Where metrics go besides ``metrics.jsonl`` in the run directory.

    Attributes:
      progress: show a progress bar with loss, lr and tokens/s.
      tensorboard: write TensorBoard event files to ``run.dir``.
      wandb: log to Weights & Biases (needs the ``wandb`` package).
      wandb_project: W&B project name; null = W&B's default.
    """

    progress: bool = True
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str | None = None


@dataclass(frozen=True)
class RunConfig:
    """The run directory (resolved config, metrics, checkpoints, reports).

    Attributes:
      dir: run directory.
      name: display name (logs, W&B); null = the last part of ``dir``.
    """

    dir: str = "runs/default"
    name: str | None = None


@dataclass(frozen=True)
class Config:
    """A complete, validated run configuration.

    Attributes:
      model: the pretrained model.
      data: datasets and tokenization.
      peft: what is trained.
      optim: optimizer and schedule.
      train: run length, batch shape, cadences.
      preference: preference-tuning objectives (dpo, orpo, simpo).
      mesh: device mesh.
      checkpoint: checkpointing.
      eval: evaluation tasks.
      logging: metric sinks.
      run: the run directory.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run: RunConfig = field(default_factory=RunConfig)


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Config)}

PREFERENCE_OBJECTIVES = ("dpo", "orpo", "simpo")
DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")

DTYPES = ("float32", "bfloat16", "float16")
PEFT_METHODS = ("full", "lora", "dora", "adapter", "feature")
UNFREEZE_GROUPS = ("norms", "biases", "lm_head", "embeddings")

# Allowed values per dotted key (null is always allowed where the type is optional).
CHOICES: dict[str, tuple[str, ...]] = {
    "model.dtype": DTYPES,
    "model.compute_dtype": DTYPES,
    "model.remat": ("none", "dots", "full", "offload"),
    "model.attention": ("auto", "flash", "blocked", "xla", "cudnn"),
    "model.quantize": ("int8", "nf4"),
    "data.format": FORMATS,
    "data.truncation_side": ("right", "left"),
    "data.balance": BALANCE,
    "peft.method": PEFT_METHODS,
    "peft.dtype": DTYPES,
    "peft.adapter_placement": ("houlsby", "pfeiffer"),
    "peft.adapter_activation": ("gelu", "relu", "silu", "tanh"),
    "peft.head": ("lm", "classification"),
    "peft.pooling": ("cls", "mean", "last", "pooler"),
    "optim.name": ("adamw", "adafactor", "sgd", "lion"),
    "optim.schedule": ("constant", "linear", "cosine"),
    "checkpoint.best_mode": ("min", "max"),
    "preference.loss_type": DPO_LOSS_TYPES,
}

# Keys that only do something for some values of another key: (that key, its values).
# Setting one of them to a non-default value otherwise is a ConfigError, like an unknown
# key (``peft.rank=16`` with ``peft.method=full`` would be silently ignored).
_LORA, _PEFT = ("lora", "dora"), ("lora", "dora", "adapter")
APPLIES_TO: dict[str, tuple[str, tuple[str, ...]]] = {
    "peft.rank": ("peft.method", _LORA),
    "peft.alpha": ("peft.method", _LORA),
    "peft.targets": ("peft.method", _LORA),
    "peft.rslora": ("peft.method", _LORA),
    "peft.dropout": ("peft.method", _PEFT),
    "peft.dtype": ("peft.method", _PEFT),
    **{
        f"peft.adapter_{k}": ("peft.method", ("adapter",))
        for k in ("size", "reduction", "placement", "activation")
    },
    # ``full`` trains every parameter already.
    "peft.unfreeze": ("peft.method", ("lora", "dora", "adapter", "feature")),
    "peft.unfreeze_top_layers": ("peft.method", ("lora", "dora", "adapter", "feature")),
    **{
        f"peft.{k}": ("peft.head", ("classification",))
        for k in ("num_labels", "pooling", "feature_layer", "head_hidden")
    },
    "eval.bias_probe": ("peft.head", ("classification",)),
    "optim.b1": ("optim.name", ("adamw", "lion")),
    "optim.b2": ("optim.name", ("adamw", "lion")),
    "optim.eps": ("optim.name", ("adamw",)),
    "optim.momentum": ("optim.name", ("sgd",)),
    "preference.beta": ("train.objective", PREFERENCE_OBJECTIVES),
    "preference.loss_type": ("train.objective", ("dpo",)),
    "preference.label_smoothing": ("train.objective", ("dpo", "simpo")),
    "preference.simpo_gamma": ("train.objective", ("simpo",)),
    "preference.precompute_ref": ("train.objective", ("dpo",)),
    # Class balance needs class labels.
    "data.balance": ("data.format", ("classification",)),
}

# Numeric ranges per dotted key: "> x", ">= x", or an interval "[a, b)" / "[a, b]".
_RANGE_GROUPS = {
    "> 0": """model.max_seq_len data.max_examples peft.rank peft.alpha peft.adapter_size
        peft.adapter_reduction optim.lr optim.eps optim.grad_clip train.steps train.epochs
        train.batch_size train.seq_len train.max_eval_batches eval.max_items
        eval.max_new_tokens eval.batch_size eval.retention_items preference.beta""",
    ">= 0": """preference.simpo_gamma model.loss_chunk data.split_seed peft.unfreeze_top_layers peft.head_hidden optim.warmup_steps
        optim.weight_decay train.seed train.eval_every train.early_stopping_patience
        checkpoint.every eval.every eval.generate_samples eval.num_fewshot""",
    ">= 1": """model.mlp_chunks data.pad_to_multiple_of train.grad_accum train.log_every
        checkpoint.keep""",
    ">= 2": "peft.num_labels",
    "[0, 0.5)": "preference.label_smoothing",
    "[0, 1)": """data.validation_fraction data.test_fraction peft.dropout optim.warmup_ratio
        optim.b1 optim.b2 optim.momentum""",
    "[0, 1]": "optim.min_lr_ratio",
    "(0, 1]": "data.train_fraction",
}
RANGES: dict[str, str] = {k: spec for spec, ks in _RANGE_GROUPS.items() for k in ks.split()}


def _plain(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def config_to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """The config as plain nested dicts and lists (YAML/JSON-ready), every key present."""
    return {
        name: {f.name: _plain(getattr(section, f.name)) for f in dataclasses.fields(section)}
        for name, section in ((n, getattr(cfg, n)) for n in SECTIONS)
    }
