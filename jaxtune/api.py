"""Public Python API: ``from_pretrained``, ``save_pretrained``, ``load_tokenizer``, ``convert``.

``from_pretrained`` accepts an HF directory (safetensors), a ``.gguf`` file, a jaxtune
checkpoint written by ``jaxtune convert`` (``jaxtune.json`` + Orbax params), or a run
directory (latest checkpoint, with adapters).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtune.errors import ModelLoadError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
MARKER = "jaxtune.json"


def resolve_dtype(dtype) -> jnp.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ModelLoadError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    return dtype


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
    from jaxtune.hf import io as hf_io
    from jaxtune.models.quantized import check_format
    from jaxtune.quant import quantize_model
    from jaxtune.resources import resolve_path

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
        from jaxtune.classify import is_classifier_dir, load_classifier

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
        from jaxtune.hf import gguf

        fam_cfg = gguf.read_gguf_config(path)
        from jaxtune.models import family_for_model_type

        fam = family_for_model_type(fam_cfg.get("model_type"))
        cfg = fam.hf_module().config_from_hf(fam_cfg, str(path)).replace(**opts)
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
        from jaxtune.checkpoint import load_run_model

        # The run's adapters stay unmerged on top of the base, quantized as in training
        # unless ``quantize`` asks for a format.
        if quantize is not None:
            opts["quantize"] = quantize
        return load_run_model(path, dtype=dtype, **opts)
    model.source = str(path)
    return model


def load_tokenizer(path: str | os.PathLike):
    """The HF tokenizer for a model path (HF dir, .gguf, jaxtune checkpoint or run dir)."""
    from jaxtune.resources import resolve_path

    path = resolve_path(path)
    kind = model_kind(path)
    if kind == "gguf":
        from jaxtune.hf.gguf import load_gguf_tokenizer

        return load_gguf_tokenizer(path)
    if kind == "run":
        from jaxtune.checkpoint import run_model_source

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


def save_pretrained(
    model: nnx.Module,
    out_dir: str | os.PathLike,
    *,
    tokenizer=None,
    dtype=None,
    overwrite: bool = False,
) -> Path:
    """Writes an HF directory (adapters merged) that transformers loads.

    ``out_dir`` is written atomically. An existing non-empty ``out_dir`` is refused
    (``OutputError``) unless ``overwrite``, which replaces an earlier jaxtune export
    only, never a directory holding anything else. The tokenizer is copied from
    ``model.source`` when not given. A
    ``SequenceClassifier`` becomes a verified ``*ForSequenceClassification`` dir
    (``jaxtune.classify.export_classifier``; weights keep their dtype). Quantized
    kernels are dequantized first, then LoRA is merged into them (as PEFT merges into
    bitsandbytes models): the files hold dense weights.
    """
    from jaxtune.atomic import check_out_dir, overwriting
    from jaxtune.hf.io import save_hf
    from jaxtune.models.heads import SequenceClassifier
    from jaxtune.peft import merged_copy
    from jaxtune.quant import dequantize_model

    check_out_dir(out_dir, overwrite)  # before any work
    model = dequantize_model(model)

    if isinstance(model, SequenceClassifier):
        from jaxtune.classify import export_classifier

        with overwriting(overwrite):
            export_classifier(model, out_dir, tokenizer=tokenizer)
        return Path(out_dir)
    if tokenizer is None and getattr(model, "source", None):
        try:
            tokenizer = load_tokenizer(model.source)
        except ModelLoadError:
            tokenizer = None
    return save_hf(
        merged_copy(model), out_dir, tokenizer=tokenizer, dtype=dtype, overwrite=overwrite
    )


# ------------------------------------------------------------- jaxtune checkpoints


def flat_params(model: nnx.Module, variable_type=nnx.Param) -> dict[str, jax.Array]:
    """``{"layers.attn.q_proj.kernel": array}`` of one variable type."""
    flat = nnx.to_flat_state(nnx.state(model, variable_type))
    return {".".join(str(p) for p in path): var[...] for path, var in flat}


def save_checkpoint(
    model: nnx.Module, out_dir: str | os.PathLike, *, tokenizer=None, overwrite: bool = False
) -> Path:
    """Writes ``jaxtune.json`` + Orbax params (+ tokenizer files), atomically.

    An existing non-empty ``out_dir`` is refused unless ``overwrite`` (which replaces an
    earlier jaxtune output only; see :func:`save_pretrained`). Quantized kernels are saved dequantized (the values the model computes with);
    ``from_pretrained(..., quantize=...)`` quantizes them again.
    """
    import orbax.checkpoint as ocp

    from jaxtune.atomic import atomic_dir
    from jaxtune.models import config_to_dict
    from jaxtune.quant import dequantize_model

    model = dequantize_model(model)

    out_dir = Path(out_dir).absolute()
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        params = flat_params(model)
        dtype = str(next(iter(params.values())).dtype)
        _param_checkpointer().save(tmp / "params", args=ocp.args.PyTreeSave(params))
        meta = {
            "format": "jaxtune",
            "version": 1,
            "dtype": dtype,
            "model_config": config_to_dict(model.config),
        }
        (tmp / MARKER).write_text(json.dumps(meta, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return out_dir


def _param_checkpointer():
    """Orbax checkpointer for model weights: uncompressed (weights barely compress, and
    compression buffers cost ~0.5x the model in host memory) with bounded bytes in flight,
    so converting streams instead of doubling peak memory."""
    import orbax.checkpoint as ocp

    handler = ocp.PyTreeCheckpointHandler(
        save_concurrent_gb=1, save_device_host_concurrent_gb=1, use_compression=False
    )
    return ocp.Checkpointer(handler)


def load_checkpoint(path: Path, dtype=None, sharding=None, **opts) -> nnx.Module:
    """Loads a checkpoint written by :func:`save_checkpoint` straight into its shards."""
    import orbax.checkpoint as ocp

    from jaxtune.hf.io import default_sharding
    from jaxtune.models import abstract_model, config_from_dict, fill_model

    try:
        meta = json.loads((path / MARKER).read_text())
        cfg = config_from_dict(meta["model_config"]).replace(**opts)
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ModelLoadError(
            f"{path / MARKER}: invalid jaxtune checkpoint metadata ({e})"
        ) from None
    dtype = dtype or resolve_dtype(meta.get("dtype", "float32"))
    abstract = abstract_model(cfg, dtype)
    flat = nnx.to_flat_state(nnx.state(abstract, nnx.Param))
    sharding = sharding or default_sharding
    target = {
        ".".join(str(p) for p in path_): jax.ShapeDtypeStruct(
            var.shape, var.dtype, sharding=sharding(path_, var)
        )
        for path_, var in flat
    }
    try:
        restore_args = ocp.checkpoint_utils.construct_restore_args(target)
        restored = _param_checkpointer().restore(
            path / "params", args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args)
        )
    except Exception as e:  # orbax raises many types for truncated / mismatched data
        raise ModelLoadError(
            f"{path}: cannot restore params ({type(e).__name__}: {str(e)[:300]})"
        ) from None
    values = {path_: restored[".".join(str(p) for p in path_)] for path_, _ in flat}
    model = fill_model(abstract, values)
    return model


def convert(
    src: str | os.PathLike, out: str | os.PathLike, dtype="float32", *, overwrite: bool = False
) -> Path:
    """HF dir / .gguf -> jaxtune checkpoint (params + resolved config + tokenizer).

    ``overwrite``: replace an earlier jaxtune output at ``out`` (else it is refused).
    """
    from jaxtune.atomic import check_out_dir

    check_out_dir(out, overwrite)  # before loading anything
    # Tokenizer first: its build peak then never stacks on top of the loaded weights.
    tokenizer = load_tokenizer(src)
    model = from_pretrained(src, dtype=dtype)
    return save_checkpoint(model, out, tokenizer=tokenizer, overwrite=overwrite)


def numpy_logits(model, input_ids, attention_mask=None) -> np.ndarray:
    """Convenience for tests/scripts: jit-compiled forward, numpy float32 logits."""
    ids = jnp.asarray(input_ids, jnp.int32)
    mask = None if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    return np.asarray(_forward(model, ids, mask))


@nnx.jit
def _forward(model, ids, mask):
    return model(ids, mask)
