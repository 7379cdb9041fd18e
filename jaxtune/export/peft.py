"""Exports of PEFT models, each verified against the in-memory model.

* :func:`export_merged`: HF directory with LoRA/DoRA folded in (``save_pretrained``).
* :func:`save_peft_adapter` / :func:`export_adapter`: a PEFT LoRA adapter directory
  (``adapter_config.json`` + ``adapter_model.safetensors``) that
  ``peft.PeftModel.from_pretrained(base, dir)`` loads.
* :func:`load_peft_adapter`: the reverse, a PEFT LoRA adapter onto a jaxtune model
  (to continue training one, or to verify an export).

HF module names come from the family key table (``KEYMAP``): the rule mapping
``layers/attn/q_proj/kernel`` to ``model.layers.{i}.self_attn.q_proj.weight`` also
names the PEFT tensors ``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight``.
PEFT stores torch layouts: lora_A [R, in], lora_B [out, R], lora_magnitude_vector [out],
for ``nn.Linear`` (key rule transform ``T``) and GPT-2's ``Conv1D`` (transform ``id``:
its weight is [in, out]; PEFT marks those adapters ``fan_in_fan_out``) alike.

Quantized base weights (``jaxtune.quant``): the merged export dequantizes the kernels,
then folds LoRA into them (what PEFT does for bitsandbytes models), so the files hold
dense weights in the model's dtype; the adapter export is verified against the base
quantized the same way.

Verification reloads what was written (merged: ``jaxtune.from_pretrained``; adapter:
base + :func:`load_peft_adapter`) and compares logits on a fixed probe batch while the
files are still in the temporary directory: a mismatch raises and nothing is left at
``out``. An existing non-empty ``out`` is refused unless ``overwrite=True``, which
replaces an earlier jaxtune export (never a directory holding anything else); see
:func:`jaxtune.atomic.atomic_dir`.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtune.atomic import atomic_dir
from jaxtune.errors import ConfigError, ModelLoadError
from jaxtune.export.hf import save_pretrained
from jaxtune.gguf.reader import GGUFFile
from jaxtune.hf import safetensors_io as st
from jaxtune.hf.families import keymap_for
from jaxtune.loading import from_pretrained
from jaxtune.peft.adapters import has_adapters
from jaxtune.peft.lora import add_lora, linears, lora_linears, lora_spec, path_str
from jaxtune.quant import quant_format
from jaxtune.resources import resolve_path
from jaxtune.verify import check_logits, param_dtype, probe_ids

PREFIX = "base_model.model."
SUFFIXES = {
    ".lora_A.weight": "lora_a",
    ".lora_B.weight": "lora_b",
    ".lora_magnitude_vector": "dora_m",
    ".lora_magnitude_vector.weight": "dora_m",  # older PEFT naming
}
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _no_bottleneck(model, what: str) -> None:
    if has_adapters(model):
        raise ConfigError(
            f"{what}: bottleneck adapters have no PEFT/Hugging Face format; save the jaxtune "
            "checkpoint instead (jaxtune.checkpoint.save_checkpoint / the run's checkpoints)"
        )


def is_linear_rule(rule) -> bool:
    """Does a key rule map a torch linear weight (nn.Linear ``T`` or Conv1D ``id``)?"""
    return rule.hf.endswith(".weight") and rule.ours.endswith("/kernel")


def hf_linear_rule(model: nnx.Module, path: tuple):
    """(key rule, [(layer index or None, HF module name)]) of our linear at ``path``.

    A stacked linear gives one name per layer. Raises ConfigError if the family key
    table has no linear-weight rule for ``path/kernel``.
    """
    cfg = model.config
    keymap = keymap_for(cfg)
    scanned = cfg.scan_layers
    kernel = (*path, "kernel")
    for rule in keymap.rules:
        if not is_linear_rule(rule):
            continue
        if rule.layered and scanned and rule.ours_path(0, True)[0] == kernel:
            names = [(i, rule.hf.format(i=i)[: -len(".weight")]) for i in range(cfg.num_layers)]
            return rule, names
        if rule.layered and not scanned and len(path) > 1 and isinstance(path[1], int):
            if rule.ours_path(path[1], False)[0] == kernel:
                return rule, [(None, rule.hf.format(i=path[1])[: -len(".weight")])]
        if not rule.layered and rule.ours_path(None, scanned)[0] == kernel:
            return rule, [(None, rule.hf[: -len(".weight")])]
    raise ConfigError(f"peft export: no Hugging Face name for {path_str(kernel)!r}")


def hf_module_names(model: nnx.Module, path: tuple) -> list[tuple[int | None, str]]:
    """HF module names of our linear at ``path``: [(layer index or None, name)]."""
    return hf_linear_rule(model, path)[1]


def adapter_tensors(model: nnx.Module) -> tuple[dict[str, np.ndarray], list[str]]:
    """({PEFT tensor name: array in torch layout}, full HF names of adapted modules)."""
    tensors: dict[str, np.ndarray] = {}
    modules: list[str] = []
    for path, lin in lora_linears(model):
        a = np.asarray(lin.lora_a[...])  # [*lead, in, R]
        b = np.asarray(lin.lora_b[...])  # [*lead, R, out]
        m = None if lin.dora_m is None else np.asarray(lin.dora_m[...])  # [*lead, out]
        for idx, name in hf_module_names(model, path):
            sl = (lambda x: x) if idx is None else (lambda x, i=idx: x[i])
            tensors[f"{PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(sl(a).T)
            tensors[f"{PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(sl(b).T)
            if m is not None:
                tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = np.ascontiguousarray(sl(m))
            modules.append(name)
    return tensors, modules


def _target_modules(model, modules: list[str]) -> list[str] | str:
    # PEFT matches a list by module-name suffix. If every layer has the same adapted
    # leaves the leaf names are exact; otherwise an anchored regex of full names is.
    leaves = sorted({m.rsplit(".", 1)[-1] for m in modules})
    every = set()
    for path, _ in linears(model):
        if str(path[-1]) in leaves:
            with contextlib.suppress(ConfigError):
                every.update(n for _, n in hf_module_names(model, path))
    if every == set(modules):
        return leaves
    return "^(" + "|".join(m.replace(".", r"\.") for m in sorted(modules)) + ")$"


_HUB_URL = re.compile(r"^https?://(?:www\.)?huggingface\.co/([\w.-]+/[\w.-]+?)/?$")


def base_model_reference(base) -> str | None:
    """What an adapter's ``base_model_name_or_path`` should say for the base ``base``.

    peft / transformers open that value with ``from_pretrained``: a ``pkg:`` path means
    nothing to them, so it is resolved to the absolute local path. A GGUF base names its
    Hugging Face repository when the file's metadata records it
    (``general.source.huggingface.repository`` or a huggingface.co
    ``general.source.url`` / ``repo_url``); otherwise the absolute path of the file
    (load it with ``from_pretrained(dir, gguf_file=name)``). A value that is not a local
    path (a hub name) is kept as given.
    """
    if base is None:
        return None

    path = resolve_path(base)
    if not path.exists():
        return str(base)
    path = path.absolute()
    if path.is_file() and path.suffix == ".gguf":
        try:
            meta = GGUFFile(path)
            repo = meta.get("general.source.huggingface.repository")
            urls = [meta.get(f"general.source.{k}") for k in ("url", "repo_url")]
        except (OSError, ValueError):
            return str(path)
        if isinstance(repo, str) and repo.count("/") == 1:
            return repo
        for url in urls:
            m = _HUB_URL.match(url) if isinstance(url, str) else None
            if m:
                return m.group(1)
    return str(path)


def _write_adapter(model: nnx.Module, out: Path, base_model_name_or_path) -> None:
    spec = lora_spec(model)
    if spec is None:
        raise ConfigError("peft export: the model has no LoRA/DoRA factors to export")
    tensors, modules = adapter_tensors(model)
    # Conv1D targets (GPT-2) are fan_in_fan_out in PEFT; say so, or PEFT warns.
    fan_in_fan_out = any(
        hf_linear_rule(model, p)[0].transform == "id" for p, _ in lora_linears(model)
    )
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_reference(base_model_name_or_path),
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": _target_modules(model, modules),
        "use_rslora": spec.rslora,
        "use_dora": spec.dora,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    st.write_file(out / ADAPTER_WEIGHTS, tensors)


def save_peft_adapter(
    model: nnx.Module, out_dir, base_model_name_or_path=None, *, overwrite: bool = False
) -> Path:
    """Writes a PEFT LoRA adapter dir (atomically; no verification, see export_adapter).

    ``base_model_name_or_path`` is recorded as :func:`base_model_reference` gives it.
    ``overwrite`` replaces an earlier jaxtune export at ``out_dir`` (else refused).

    Raises:
      ConfigError: the model has bottleneck adapters (no PEFT format) or no LoRA.
    """
    _no_bottleneck(model, "peft adapter export")
    out = Path(out_dir)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        _write_adapter(model, tmp, base_model_name_or_path)
    return out


def load_peft_adapter(model: nnx.Module, adapter_dir) -> nnx.Module:
    """Adds the LoRA/DoRA of a PEFT adapter dir to ``model`` (in place) and returns it.

    On a scanned model, layers the adapter does not cover get B = 0 (and DoRA
    magnitude = ||W||), i.e. they stay unchanged.

    Raises:
      ConfigError / ModelLoadError: unsupported adapter options, unknown tensors, shapes.
    """
    adir = Path(adapter_dir)
    cfg_path = adir / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise ModelLoadError(f"{adir}: no {ADAPTER_CONFIG} (expected a PEFT adapter directory)")
    try:
        acfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{cfg_path}: invalid JSON ({e})") from None
    if acfg.get("peft_type") != "LORA":
        raise ConfigError(
            f"{cfg_path}: peft_type {acfg.get('peft_type')!r}; only LORA is supported"
        )
    # fan_in_fan_out is not checked: PEFT itself sets it from the target's type (True
    # for Conv1D, False for nn.Linear) and the stored factor layouts are the same.
    for key, ok in (("bias", "none"), ("lora_bias", False)):
        if acfg.get(key, ok) != ok:
            raise ConfigError(
                f"{cfg_path}: {key} = {acfg[key]!r} is not supported (expected {ok!r})"
            )
    for key in ("rank_pattern", "alpha_pattern", "modules_to_save"):
        if acfg.get(key):
            raise ConfigError(f"{cfg_path}: {key} is not supported by jaxtune's PEFT import")
    weights = adir / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise ModelLoadError(f"{adir}: no {ADAPTER_WEIGHTS}")
    cfg = model.config
    keymap = keymap_for(cfg)
    found: dict[tuple, dict[str, list]] = {}
    for key, arr in st.iter_tensors(weights):
        suffix = next((s for s in SUFFIXES if key.endswith(s)), None)
        if not key.startswith(PREFIX) or suffix is None:
            raise ModelLoadError(
                f"{weights}: unsupported tensor {key!r} (LoRA on linear layers only)"
            )
        module = key[len(PREFIX) : -len(suffix)]
        hit = keymap.match(module + ".weight")
        if hit is None or not is_linear_rule(hit[0]):
            raise ModelLoadError(f"{weights}: {key!r} adapts {module!r}, not a linear layer here")
        kpath, idx = hit[0].ours_path(hit[1], cfg.scan_layers)
        found.setdefault(kpath[:-1], {}).setdefault(SUFFIXES[suffix], []).append((idx, arr, key))
    try:
        add_lora(
            model,
            None,
            rank=acfg.get("r"),
            alpha=acfg.get("lora_alpha"),
            dropout=float(acfg.get("lora_dropout") or 0.0),
            rslora=bool(acfg.get("use_rslora", False)),
            dora=bool(acfg.get("use_dora", False)),
            rngs=nnx.Rngs(0),
            modules=sorted(found, key=path_str),
        )
    except ConfigError as e:  # name the file, not the config section
        raise ConfigError(f"{cfg_path}: {e}") from None
    by_path = dict(linears(model))
    for mpath, slots in found.items():
        lin = by_path[mpath]
        for slot, items in slots.items():
            var = getattr(lin, slot)
            if var is None:
                raise ModelLoadError(f"{weights}: {items[0][2]!r} needs use_dora: true")
            value = np.array(var[...])
            for idx, arr, key in items:
                # torch [R, in] / [out, R] -> ours [in, R] / [R, out]; magnitude as is.
                got = np.asarray(arr) if slot == "dora_m" else np.asarray(arr).T
                want = value.shape if idx is None else value.shape[1:]
                if got.shape != want:
                    raise ModelLoadError(
                        f"{weights}: {key!r} has shape {arr.shape}, expected {want[::-1]}"
                    )
                if idx is None:
                    value[...] = got
                else:
                    value[idx] = got
            var.set_value(jnp.asarray(value, var.dtype))
    return model


# ---------------------------------------------------------------- verified exports


def _compare(model, reloaded, tol, what: str, hint: str = "") -> float:
    ids = probe_ids(model.config.vocab_size)
    return check_logits(model, reloaded, [((ids, None), (ids, None))], tol, what, hint)


def export_merged(
    model: nnx.Module, out, tokenizer=None, *, dtype=None, tol=None, overwrite: bool = False
) -> float:
    """Writes the merged HF dir at ``out`` and verifies it; returns the max logit diff.

    Args:
      model: jaxtune model, with or without LoRA/DoRA (bottleneck adapters: ConfigError);
        quantized kernels are dequantized before the merge.
      out: target directory (written atomically; removed again if verification fails).
      tokenizer: saved beside the weights (default: from ``model.source``).
      dtype: file dtype (default: the parameters' dtype).
      tol: (atol, rtol) override of :func:`default_tolerance`.
      overwrite: replace an earlier jaxtune export at ``out`` (only that: a directory
        holding anything else is refused); False refuses any existing non-empty ``out``.
    """
    _no_bottleneck(model, "merged export")
    out = Path(out)
    dtype = dtype or param_dtype(model)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_pretrained(model, tmp, tokenizer=tokenizer, dtype=dtype)
        reloaded = from_pretrained(tmp, dtype=dtype, scan_layers=model.config.scan_layers)
        return _compare(model, reloaded, tol, "merged export")


def export_adapter(
    model: nnx.Module, out, base_path, *, tol=None, overwrite: bool = False
) -> float:
    """Writes a PEFT adapter dir at ``out`` and verifies it; returns the max logit diff.

    Verification loads ``base_path`` with jaxtune, imports the written adapter and
    compares logits with ``model``. Unfrozen base parameters (``peft.unfreeze``) are
    not part of a LoRA adapter, so such a model fails here: export it merged instead.
    ``base_model_name_or_path`` in the adapter config is :func:`base_model_reference`
    of ``base_path``; ``overwrite`` as in :func:`export_merged`.
    """
    _no_bottleneck(model, "peft adapter export")
    out = Path(out)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        _write_adapter(model, tmp, base_path)
        base = from_pretrained(
            base_path,
            dtype=param_dtype(model),
            scan_layers=model.config.scan_layers,
            quantize=quant_format(model),
        )
        load_peft_adapter(base, tmp)
        hint = " (were base parameters trained via peft.unfreeze? export --merged then)"
        return _compare(model, base, tol, "adapter export", hint)
