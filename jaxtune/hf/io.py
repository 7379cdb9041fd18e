"""Weights in from HF safetensors directories / GGUF files, out as HF directories.

Import streams tensors one at a time through the family key table into (sharded)
device arrays: a parameter becomes a device array as soon as all its layers are read,
and host buffers are freed, so peak host memory stays near one copy of the model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtune import quant
from jaxtune.atomic import atomic_dir
from jaxtune.errors import ConfigError, ModelLoadError
from jaxtune.hf import safetensors_io as st
from jaxtune.hf.families import hf_module, keymap_for
from jaxtune.hf.keymap import path_str
from jaxtune.models import (
    FAMILIES,
    abstract_model,
    family_for_model_type,
    family_of_config,
    fill_model,
    quantized,
)

PICKLE_NAMES = (
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "model.pt",
    "consolidated.00.pth",
)
ShardingFn = Callable[[tuple, nnx.Variable], jax.sharding.Sharding]


# ------------------------------------------------------------------------- reading


def read_hf_config(model_dir: Path):
    """(family, model config) from ``model_dir/config.json``."""
    path = model_dir / "config.json"
    if not path.is_file():
        raise ModelLoadError(
            f"{model_dir}: no config.json (expected a Hugging Face model directory)"
        )
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path}: invalid JSON ({e})") from None
    fam = family_for_model_type(d.get("model_type"))
    if fam is None:
        archs = d.get("architectures") or [d.get("model_type")]
        raise ConfigError(
            f"{path}: unsupported architecture {archs[0]!r} (model_type {d.get('model_type')!r}); "
            f"jaxtune supports model types {supported_model_types()}"
        )
    return fam, hf_module(fam).config_from_hf(d, str(path))


def supported_model_types() -> list[str]:
    """HF ``model_type`` values of every registered family (for error messages)."""

    return sorted(t for fam in FAMILIES.values() for t in fam.model_types)


def safetensors_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model dir (sharded via the index, or single)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ModelLoadError(f"{index}: invalid index ({e})") from None
        files = sorted({model_dir / f for f in weight_map.values()})
        for f in files:
            if not f.is_file():
                raise ModelLoadError(f"{index}: lists {f.name}, which does not exist")
        return files
    single = sorted(model_dir.glob("*.safetensors"))
    if single:
        return single
    pickled = [n for n in PICKLE_NAMES if (model_dir / n).exists()]
    if pickled:
        raise ModelLoadError(
            f"{model_dir}: only a pickled PyTorch checkpoint ({pickled[0]}) is here. jaxtune "
            "never unpickles weights (it can execute code). Convert it once, in an environment "
            'you trust, with: python -c "from transformers import AutoModelForCausalLM as M; '
            f"M.from_pretrained('{model_dir}').save_pretrained('OUT', safe_serialization=True)\""
        )
    raise ModelLoadError(f"{model_dir}: no *.safetensors weights found")


def iter_safetensors(files: list[Path]) -> Iterator[tuple[str, np.ndarray, str]]:
    for f in files:
        for name, arr in st.iter_tensors(f):
            yield name, arr, str(f)


def default_sharding(path, var) -> jax.sharding.Sharding:
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def load_params(
    cfg,
    tensors: Iterator[tuple[str, np.ndarray, str]],
    *,
    dtype=jnp.float32,
    sharding: ShardingFn | None = None,
    source: str = "",
    quantize: str | None = None,
) -> nnx.Module:
    """Streams HF-named tensors into a model of architecture ``cfg``.

    Args:
      cfg: model config (decides family, shapes, scanned or not).
      tensors: (hf_name, array in HF layout, file name) items, consumed once.
      dtype: parameter dtype.
      sharding: ``(path, abstract variable) -> Sharding``; default: first device.
      source: for error messages.
      quantize: ``int8`` / ``nf4``: the kernels of the linear layers inside ``layers``
        are quantized on the host as each tensor (one layer slice) arrives, so only
        the quantized codes and scales are ever stacked or sent to the device
        (``jaxtune.quant``).

    Returns:
      The model with every parameter loaded. Missing, unexpected or mis-shaped tensors
      raise :class:`ModelLoadError` naming the tensor (and both shapes).
    """
    fam = family_of_config(cfg)
    hf = hf_module(fam)
    keymap = keymap_for(cfg)
    # A family may rename tensors first (strip ``bert.``-style task prefixes) and drop
    # task-head tensors (None) that are not part of the base model.
    canonical = getattr(hf, "canonical_name", None)
    sharding = sharding or default_sharding
    abstract = (
        abstract_model(cfg, dtype)
        if quantize is None
        else quant.abstract_quantized_model(cfg, dtype, quantize)
    )
    _, state = nnx.split(abstract)
    expected = dict(nnx.to_flat_state(state))
    scanned = cfg.scan_layers
    n_layers = cfg.num_layers
    buffers: dict[tuple, np.ndarray] = {}
    filled: dict[tuple, set] = {}
    done: dict[tuple, jax.Array] = {}

    def finish(path):
        var = expected[path]
        buf = buffers.pop(path)
        done[path] = jax.make_array_from_callback(
            buf.shape, sharding(path, var), lambda idx: buf[idx]
        )

    def put(path, idx, value):
        """Stores one tensor (or one layer slice ``idx`` of a stacked one)."""
        var = expected[path]
        np_dtype = np.dtype(jnp.dtype(var.dtype))
        if idx is None:
            buffers[path] = value.astype(np_dtype)
            finish(path)
            return
        if path not in buffers:
            buffers[path] = np.empty(var.shape, np_dtype)
            filled[path] = set()
        buffers[path][idx] = value
        filled[path].add(idx)
        if len(filled[path]) == n_layers:
            finish(path)

    for name, arr, fname in tensors:
        if canonical is not None and (name := canonical(name)) is None:
            continue
        hit = keymap.match(name)
        if hit is None:
            if any(name.endswith(s) for s in hf.IGNORED):
                continue
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue  # some exports keep a copy of the tied embedding
            raise ModelLoadError(
                f"{fname}: unexpected tensor {name!r} (not a weight of this {cfg.family} model)"
            )
        rule, layer = hit
        if layer is not None and layer >= n_layers:
            raise ModelLoadError(
                f"{fname}: tensor {name!r} is for layer {layer}, but config has {n_layers} layers"
            )
        path, idx = rule.ours_path(layer, scanned)
        qpaths = ((*path, "codes"), (*path, "scales"))
        if path not in expected and qpaths[0] in expected:
            codes = expected[qpaths[0]]
            want = quantized.logical_shape(
                codes.shape[1:] if idx is not None else codes.shape, quantize
            )
            value = rule.to_ours(np.asarray(arr))
            _check_shape(fname, name, arr, value, want, rule)
            for qpath, q in zip(qpaths, quantized.quantize(value, quantize), strict=True):
                put(qpath, idx, q)
            continue
        if path not in expected:
            raise ModelLoadError(
                f"{fname}: tensor {name!r} is not used by this config ({path_str(path)})"
            )
        var = expected[path]
        want = tuple(var.shape[1:] if idx is not None else var.shape)
        value = rule.to_ours(np.asarray(arr))
        _check_shape(fname, name, arr, value, want, rule)
        put(path, idx, value)

    missing = [p for p in expected if p not in done]
    if missing:
        names = []
        for key in missing[:3]:
            # A quantized kernel's codes/scales: name the HF weight they come from.
            is_quantized = key[-1] in ("codes", "scales") and key[:-1] not in expected
            p = key[:-1] if is_quantized else key
            for rule in keymap.rules:
                if any(
                    rule.ours_path(i, scanned)[0] == p
                    for i in ([0] if scanned else range(n_layers))
                ):
                    got = filled.get(key, set())
                    layer = min(set(range(n_layers)) - got) if rule.layered else None
                    names.append(rule.hf.format(i=layer) if rule.layered else rule.hf)
                    break
            else:
                names.append(path_str(p))
        raise ModelLoadError(
            f"{source}: missing tensor(s) {names} (and {max(0, len(missing) - 3)} more)"
        )
    return fill_model(abstract, done)


def _check_shape(fname, name, arr, value, want, rule) -> None:
    if tuple(value.shape) != tuple(want):
        hf_want = tuple(rule.to_hf(np.empty(want, np.int8)).shape)
        raise ModelLoadError(
            f"{fname}: tensor {name!r} has shape {tuple(arr.shape)}, expected {hf_want} for this config"
        )


# ------------------------------------------------------------------------- writing


def iter_hf_tensors(model: nnx.Module, dtype=None) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (HF name, numpy array in HF layout) for every base parameter."""
    cfg = model.config
    keymap = keymap_for(cfg)
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for rule in keymap.rules:
        for hf_name, layer in keymap.hf_names(rule, cfg.num_layers):
            path, idx = rule.ours_path(layer, cfg.scan_layers)
            if path not in flat:
                continue
            arr = flat[path][...]
            if idx is not None:
                arr = arr[idx]
            arr = np.asarray(jax.device_get(arr))
            if dtype is not None:
                arr = arr.astype(np.dtype(jnp.dtype(dtype)))
            yield hf_name, rule.to_hf(arr)


def write_hf_weights(
    tensors: Iterator[tuple[str, np.ndarray]], out: Path, max_shard_bytes: int = 2 << 30
):
    """Writes ``model.safetensors`` or shards + ``model.safetensors.index.json``."""
    shards: list[dict[str, np.ndarray]] = [{}]
    sizes = [0]
    # Shards are flushed as they fill so only one shard is held in host memory.
    written: list[tuple[str, list[str]]] = []
    total = 0

    def flush(final=False):
        idx = len(written) + 1
        name = f"model-{idx:05d}.safetensors.tmp"
        st.write_file(out / name, shards[0])
        written.append((name, list(shards[0])))
        shards[0] = {}
        sizes[0] = 0

    for name, arr in tensors:
        if sizes[0] and sizes[0] + arr.nbytes > max_shard_bytes:
            flush()
        shards[0][name] = arr
        sizes[0] += arr.nbytes
        total += arr.nbytes
    if shards[0] or not written:
        flush()
    if len(written) == 1:
        os.replace(out / written[0][0], out / "model.safetensors")
        return
    n = len(written)
    weight_map = {}
    for i, (tmp, names) in enumerate(written, 1):
        final = f"model-{i:05d}-of-{n:05d}.safetensors"
        os.replace(out / tmp, out / final)
        weight_map.update({k: final for k in names})
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )


def save_hf(
    model: nnx.Module,
    out_dir: str | os.PathLike,
    *,
    tokenizer=None,
    dtype=None,
    max_shard_bytes=2 << 30,
    overwrite: bool | None = None,
):
    """Writes an HF model directory that ``transformers`` loads.

    Args:
      model: a jaxtune model without unmerged adapters (merge them first).
      out_dir: target directory, written atomically (never left half-written).
      tokenizer: optional HF tokenizer saved beside the weights.
      dtype: weight dtype in the files (default: the parameters' dtype).
      overwrite: replace an earlier jaxtune export at ``out_dir`` (see
        :func:`atomic_dir`); else an existing non-empty ``out_dir`` is refused.
    """
    out_dir = Path(out_dir)
    cfg = model.config
    hf = hf_module(family_of_config(cfg))
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        config = hf.config_to_hf(cfg)
        first = nnx.to_flat_state(nnx.state(model, nnx.Param))[0][1]
        config["dtype"] = str(jnp.dtype(dtype or first.dtype))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        write_hf_weights(iter_hf_tensors(model, dtype), tmp, max_shard_bytes)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return out_dir
