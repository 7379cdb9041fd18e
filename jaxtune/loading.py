"""Loading models and tokenizers: one dispatch over what a model path can be.

``from_pretrained`` accepts an HF directory (safetensors; a ``*ForSequenceClassification``
directory becomes a :class:`~jaxtune.models.heads.SequenceClassifier`), a ``.gguf``
file, a jaxtune checkpoint written by ``jaxtune convert`` (``jaxtune.json`` + Orbax
params), or a run directory (latest checkpoint, with adapters). :func:`build_model` is
the model a run config describes (base + PEFT, or a classifier over it), the one
function the trainer, ``plan``-free loading of runs and ``jaxtune export`` share.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jax.numpy as jnp
from flax import nnx

from jaxtune.checkpoint import MARKER, Checkpointer, load_checkpoint
from jaxtune.config import Config, load_config
from jaxtune.errors import ConfigError, ModelLoadError
from jaxtune.gguf import load as gguf
from jaxtune.gguf.load import load_gguf_tokenizer
from jaxtune.hf import io as hf_io
from jaxtune.hf.classifier import is_classifier_dir, load_classifier
from jaxtune.hf.families import hf_module
from jaxtune.models import family_for_model_type, resolve_dtype
from jaxtune.models.heads import SequenceClassifier
from jaxtune.models.quantized import check_format
from jaxtune.peft.trainable import apply_peft, classifier_filter, trainable_filter
from jaxtune.quant import quantize_model
from jaxtune.resources import resolve_path
from jaxtune.sharding import shard_model, variable_sharding


def model_kind(path: Path) -> str:
    """One of ``gguf``, ``jaxtune``, ``run``, ``hf``; errors for anything else."""
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file or directory")
    if path.is_file():
        if path.suffix == ".gguf":
            return "gguf"
        if path.suffix in (".bin", ".pt", ".pth", ".pkl"):
            raise ModelLoadError(
                f"{path}: pickled checkpoints are refused (unpickling can run code); convert to "
                "safetensors with transformers' save_pretrained(..., safe_serialization=True)"
            )
        raise ModelLoadError(f"{path}: expected a .gguf file or a model directory")
    if (path / MARKER).is_file():
        return "jaxtune"
    if (path / "checkpoints").is_dir() and (path / "config.yaml").is_file():
        return "run"
    return "hf"


def run_has_checkpoint(path: Path) -> bool:
    """Does a run directory hold a complete checkpoint (a ``checkpoints/<step>`` dir)?"""
    ckpts = Path(path) / "checkpoints"
    return ckpts.is_dir() and any(p.is_dir() and p.name.isdigit() for p in ckpts.iterdir())


def _check_run_loadable(path: Path, kind: str) -> None:
    """A run directory that has not saved a checkpoint yet says so (before a base model
    is loaded for nothing), instead of looking like a model dir without config.json."""
    looks_like_run = (path / "config.yaml").is_file() and not (path / "config.json").exists()
    if (kind == "run" or (kind == "hf" and looks_like_run)) and not run_has_checkpoint(path):
        raise ModelLoadError(
            f"{path}: the run has no checkpoint yet (training has not saved one); run "
            f"jaxtune train first, or load its base model (model.path in {path / 'config.yaml'})"
        )


def from_pretrained(
    path: str | os.PathLike,
    dtype="float32",
    *,
    scan_layers: bool | None = None,
    sharding=None,
    quantize: str | None = None,
    **config_overrides,
) -> nnx.Module:
    """Loads a model.

    Args:
      path: HF directory (safetensors), ``.gguf`` file, jaxtune checkpoint or run dir.
      dtype: parameter dtype (``"float32"``, ``"bfloat16"``...).
      scan_layers: stack layers and scan over them (default True).
      sharding: optional ``(path, abstract variable) -> Sharding`` for sharded loading.
      quantize: ``"int8"`` / ``"nf4"`` stores the linear layers' kernels inside the
        layer stack quantized and frozen (QLoRA; ``jaxtune.quant``), quantized tensor
        by tensor while loading HF / GGUF weights; None keeps them dense (a run dir:
        quantized as the run trained, ``model.quantize`` of its config).
      **config_overrides: execution options of the model config (``remat=...``).

    Returns:
      The model; ``model(input_ids [B, T], attention_mask=None) -> logits [B, T, V]``
      (encoders: last hidden states [B, T, D]; an HF ``*ForSequenceClassification``
      dir: a ``SequenceClassifier`` giving class logits [B, K]).
      ``model.source`` remembers where it came from (tokenizer lookup).
    """

    path = resolve_path(path)
    kind = model_kind(path)
    _check_run_loadable(path, kind)
    dtype = resolve_dtype(dtype)
    if quantize is not None:
        check_format(quantize)
    opts = dict(config_overrides)
    if scan_layers is not None:
        opts["scan_layers"] = scan_layers
    if kind == "hf":
        if is_classifier_dir(path):  # *ForSequenceClassification: backbone + head
            model = quantize_model(load_classifier(path, dtype, scan_layers=scan_layers), quantize)
            model.source = str(path)
            return model
        _, cfg = hf_io.read_hf_config(path)
        cfg = cfg.replace(**opts)
        files = hf_io.safetensors_files(path)
        model = hf_io.load_params(
            cfg,
            hf_io.iter_safetensors(files),
            dtype=dtype,
            sharding=sharding,
            source=str(path),
            quantize=quantize,
        )
    elif kind == "gguf":
        fam_cfg = gguf.read_gguf_config(path)

        fam = family_for_model_type(fam_cfg.get("model_type"))
        cfg = hf_module(fam).config_from_hf(fam_cfg, str(path)).replace(**opts)
        tensors = ((n, a, str(path)) for n, a in gguf.iter_gguf_tensors(path))
        model = hf_io.load_params(
            cfg, tensors, dtype=dtype, sharding=sharding, source=str(path), quantize=quantize
        )
        gguf.release_readers()
    elif kind == "jaxtune":
        # Orbax restores whole arrays: quantize after loading (one kernel at a time).
        model = quantize_model(
            load_checkpoint(path, dtype=dtype, sharding=sharding, **opts), quantize
        )
    else:
        # The run's adapters stay unmerged on top of the base, quantized as in training
        # unless ``quantize`` asks for a format.
        if quantize is not None:
            opts["quantize"] = quantize
        return load_run_model(path, dtype=dtype, **opts)
    model.source = str(path)
    return model


def load_tokenizer(path: str | os.PathLike):
    """The HF tokenizer for a model path (HF dir, .gguf, jaxtune checkpoint or run dir)."""

    path = resolve_path(path)
    kind = model_kind(path)
    if kind == "gguf":
        return load_gguf_tokenizer(path)
    if kind == "run":
        return load_tokenizer(run_model_source(path))
    try:
        if (path / "tokenizer.json").is_file():
            # The fast-tokenizer class directly: AutoTokenizer imports torch when present.
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast.from_pretrained(str(path))
        if not any(
            (path / n).is_file() for n in ("tokenizer_config.json", "tokenizer.model", "vocab.json")
        ):
            raise ModelLoadError(
                f"{path}: no tokenizer files (tokenizer.json, tokenizer_config.json, ...)"
            )
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: cannot load a tokenizer ({e})") from None


def build_classifier(cfg, num_labels: int, label_names=None, layer=None) -> SequenceClassifier:
    """Backbone from ``cfg.model`` + head from ``cfg.peft``, with the method's PEFT applied.

    Layers are unscanned when ``peft.unfreeze_top_layers`` is set (a stacked parameter
    cannot be partly trainable).
    """

    backbone = from_pretrained(
        cfg.model.path,
        dtype=cfg.model.dtype,
        scan_layers=cfg.model.scan_layers and not cfg.peft.unfreeze_top_layers,
        remat=cfg.model.remat,
        attention_impl=cfg.model.attention,
        mlp_chunks=cfg.model.mlp_chunks,
        quantize=cfg.model.quantize,
    )
    if cfg.model.compute_dtype:
        backbone.compute_dtype = jnp.dtype(cfg.model.compute_dtype)
    apply_peft(backbone, cfg.peft, rngs=nnx.Rngs(cfg.train.seed))
    p = cfg.peft
    # A head fitted on cached features (``peft.method: feature``, nothing unfrozen) has
    # train_head's structure: biases (the features are centred) and relu.
    fitted = p.method == "feature" and not p.unfreeze and not p.unfreeze_top_layers
    head_kw = dict(head_bias=True, head_activation="relu") if fitted else {}
    return SequenceClassifier(
        backbone,
        num_labels,
        pooling=p.pooling,
        feature_layer=p.feature_layer if layer is None else layer,
        head_hidden=p.head_hidden,
        label_names=label_names,
        add_eos=cfg.data.add_eos,
        rngs=nnx.Rngs(cfg.train.seed + 1),
        **head_kw,
    )


def run_model_source(run_dir: Path) -> str:
    """The base model path recorded in a run's resolved config."""

    return load_config(Path(run_dir) / "config.yaml").model.path


def load_run_model(run_dir: Path, dtype=None, step: int | None = None, **opts):
    """Base model + PEFT modules + the trainable weights of a run's latest checkpoint.

    Returns the model with adapters unmerged (``save_pretrained`` merges them).
    """

    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    if cfg.peft.head == "classification":  # a SequenceClassifier: backbone + head
        labels = saved_labels(run_dir)
        names = labels["label_names"]
        model_cfg = dataclasses.replace(cfg.model, dtype=dtype or cfg.model.dtype)
        model = build_classifier(
            dataclasses.replace(cfg, model=model_cfg),
            labels["num_labels"],
            tuple(names) if names else None,
        )
        filt = classifier_filter(model, cfg.peft)
    else:
        # The base as the run trained on it: a QLoRA run's adapters belong on the
        # quantized kernels (exports dequantize them, so merged weights hold exactly
        # what the trained model computed).
        opts.setdefault("quantize", cfg.model.quantize)
        model = from_pretrained(
            cfg.model.path, dtype=dtype or cfg.model.dtype, scan_layers=scan_layers_for(cfg), **opts
        )
        apply_peft(model, cfg.peft, rngs=nnx.Rngs(cfg.train.seed))
        filt = trainable_filter(model, cfg.peft)
    ckpt = Checkpointer(run_dir, async_save=False)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise ModelLoadError(f"{run_dir}: the run has no checkpoint yet")
        _, params, _ = nnx.split(model, filt, ...)
        params, _, _, _ = ckpt.restore(step, params)
    finally:
        ckpt.close(quiet=True)
    nnx.update(model, params)
    model.source = str(cfg.model.path)
    return model


def scan_layers_for(cfg) -> bool:
    """Top-N-layer unfreezing needs one array per layer, so it disables scanning."""
    return bool(cfg.model.scan_layers and not cfg.peft.unfreeze_top_layers)


LABELS_FILE = "labels.json"


def check_labels(run_dir: Path, info: dict) -> None:
    """ConfigError if the run dir holds a labels file with another label set."""
    path = Path(run_dir) / LABELS_FILE
    if path.exists():
        saved = json.loads(path.read_text())
        if saved != info:
            raise ConfigError(
                f"{path}: the run was started with labels {saved}, the data now gives {info}; "
                "use a new run.dir"
            )


def saved_labels(run_dir: Path) -> dict:
    """The label set a classification run was trained with (for loading it back)."""
    path = Path(run_dir) / LABELS_FILE
    if not path.exists():
        raise ConfigError(f"{path}: missing; is {run_dir} a classification run?")
    return json.loads(path.read_text())


def build_model(cfg: Config, mesh, labels: dict | None = None):
    """Base model loaded into its shards, plus PEFT modules, placed on the mesh.

    With ``peft.head: classification`` the model is a
    :class:`~jaxtune.models.heads.SequenceClassifier` over the backbone; ``labels`` is
    then ``{"num_labels": K, "label_names": [...]}``.
    """

    if not cfg.model.path:
        raise ConfigError(
            "model.path is required (an HF dir, a .gguf file or a jaxtune checkpoint)"
        )
    if cfg.peft.head == "classification":
        names = labels.get("label_names")
        clf = build_classifier(cfg, labels["num_labels"], tuple(names) if names else None)
        return shard_model(clf, mesh)
    model = from_pretrained(
        cfg.model.path,
        dtype=cfg.model.dtype,
        scan_layers=scan_layers_for(cfg),
        remat=cfg.model.remat,
        attention_impl=cfg.model.attention,
        mlp_chunks=cfg.model.mlp_chunks,
        sharding=variable_sharding(mesh),
        quantize=cfg.model.quantize,
    )
    if cfg.model.compute_dtype:
        model.compute_dtype = jnp.dtype(cfg.model.compute_dtype)
    apply_peft(model, cfg.peft, rngs=nnx.Rngs(cfg.train.seed))
    return shard_model(model, mesh)
