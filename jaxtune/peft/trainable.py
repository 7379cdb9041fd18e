"""The one definition of "trainable", built from ``PeftConfig``.

:func:`trainable_filter` returns an NNX filter; the trainer uses it three ways:
``nnx.split(model, filt, ...)`` gives the partition that is differentiated, the
optimizer is initialised on that partition only (frozen leaves have no optimizer state
and get no update), and checkpoints of PEFT runs save that partition.

What each ``peft.method`` trains:

=========  ==============================================================
full       every parameter (``nnx.Param`` and subclasses)
lora/dora  ``nnx.LoRAParam`` (factors, DoRA magnitudes)
adapter    :class:`~jaxtune.peft.adapters.AdapterParam`
feature    the classification head only: parameters under a module named
           ``head``, ``classifier`` or ``score`` (``lm_head`` is not a head
           here; the head module is built by the classification model)
=========  ==============================================================

Quantized base kernels (``jaxtune.models.quantized.QuantWeight``) are not ``nnx.Param`` and are
never trainable; ``full`` on a quantized model is a ConfigError.

plus ``peft.unfreeze`` (named groups ``norms``, ``biases``, ``lm_head`` (the embedding
when tied), ``embeddings``, or regexes searched in the ``/``-joined parameter path) and
``peft.unfreeze_top_layers`` N (needs unscanned layers: a stacked parameter cannot be
half trainable).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtune.errors import ConfigError
from jaxtune.models import family_of_config
from jaxtune.peft.adapters import AdapterParam, add_adapters
from jaxtune.peft.lora import add_lora, check_hparams, normalize_targets, path_str
from jaxtune.quant import quant_format, quantize_model, quantized_stats

METHODS = ("full", "lora", "dora", "adapter", "feature")
HEAD_NAMES = {"head", "classifier", "score"}
_NORM_MODULE = re.compile(r"(norm|^ln|_ln)", re.IGNORECASE)

Filter = Callable[[tuple, nnx.Variable], bool]


def _is_norm(path: tuple) -> bool:
    # Parameters of a normalisation module: ``.../input_norm/scale``, ``norm/scale``.
    return len(path) >= 2 and bool(_NORM_MODULE.search(str(path[-2])))


def _group(name: str, tied: bool) -> Filter | None:
    """Filter of a named unfreeze group (None if ``name`` is not a group name)."""
    groups: dict[str, Filter] = {
        "norms": lambda p, v: _is_norm(p),
        "biases": lambda p, v: str(p[-1]) == "bias",
        "embeddings": lambda p, v: str(p[-1]) == "embedding",
        # A tied LM head *is* the embedding matrix.
        "lm_head": (lambda p, v: str(p[-1]) == "embedding")
        if tied
        else (lambda p, v: str(p[0]) == "lm_head"),
    }
    return groups.get(name)


def _is_base(v) -> bool:
    return isinstance(v, nnx.Param) and not isinstance(v, (nnx.LoRAParam, AdapterParam))


def _method_filter(method: str) -> Filter:
    if method == "full":
        return lambda p, v: isinstance(v, nnx.Param)
    if method in ("lora", "dora"):
        return lambda p, v: isinstance(v, nnx.LoRAParam)
    if method == "adapter":
        return lambda p, v: isinstance(v, AdapterParam)
    if method == "feature":
        return lambda p, v: isinstance(v, nnx.Param) and any(str(x) in HEAD_NAMES for x in p)
    raise ConfigError(f"peft.method: {method!r} is not one of {list(METHODS)}")


class TrainableFilter:
    """A named NNX filter ``(path, variable) -> bool`` (readable in logs and errors)."""

    def __init__(self, parts: list[tuple[str, Filter]]):
        self.parts = parts

    def __call__(self, path, variable) -> bool:
        return isinstance(variable, nnx.Param) and any(f(path, variable) for _, f in self.parts)

    def __repr__(self) -> str:
        return f"TrainableFilter({' | '.join(name for name, _ in self.parts)})"


def trainable_filter(model: nnx.Module, peft_cfg) -> TrainableFilter:
    """The filter selecting the trainable parameters for ``peft_cfg``.

    Args:
      model: the model *after* :func:`apply_peft` (and after any head is attached).
      peft_cfg: a ``jaxtune.config.PeftConfig``.

    Returns:
      A filter usable as ``nnx.split(model, filt, ...)`` / ``nnx.state(model, filt)``.

    Raises:
      ConfigError: unknown method; an unfreeze entry matching nothing; top layers on a
        scanned model; or nothing trainable at all.
    """
    method = peft_cfg.method
    if method == "full" and quant_format(model) is not None:
        raise ConfigError(
            f"peft.method full: the base weights are quantized ({quant_format(model)}) and "
            "frozen; use lora, dora, adapter or feature (or model.quantize=null)"
        )
    parts: list[tuple[str, Filter]] = [(method, _method_filter(method))]
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    base = [(tuple(p), v) for p, v in flat if _is_base(v)]
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    for entry in normalize_targets(peft_cfg.unfreeze):
        f = _group(entry, tied)
        if f is None:
            try:
                rx = re.compile(entry)
            except re.error as e:
                raise ConfigError(f"peft.unfreeze: invalid regex {entry!r} ({e})") from None
            f = lambda p, v, rx=rx: rx.search(path_str(p)) is not None  # noqa: E731
        if not any(f(p, v) for p, v in base):
            raise ConfigError(
                f"peft.unfreeze: {entry!r} matches no parameter of this model (groups: "
                "norms, biases, lm_head, embeddings; or a regex over paths like "
                f"{path_str(base[0][0]) if base else 'layers/attn/q_proj/kernel'!r})"
            )
        parts.append((f"unfreeze:{entry}", f))
    top = int(peft_cfg.unfreeze_top_layers or 0)
    if top < 0:
        raise ConfigError(f"peft.unfreeze_top_layers: must be >= 0, got {top}")
    if top:
        cfg = model.config
        if getattr(cfg, "scan_layers", False):
            raise ConfigError(
                "peft.unfreeze_top_layers: needs unscanned layers (build the model with "
                "scan_layers=False); a stacked parameter cannot be partly trainable"
            )
        n = cfg.num_layers
        if top > n:
            raise ConfigError(f"peft.unfreeze_top_layers: {top} > the model's {n} layers")
        first = n - top
        parts.append(
            (
                f"top_layers:{top}",
                lambda p, v: (
                    len(p) > 1 and p[0] == "layers" and isinstance(p[1], int) and p[1] >= first
                ),
            )
        )
    filt = TrainableFilter(parts)
    if not any(filt(p, v) for p, v in flat):
        hint = {
            "lora": "call apply_peft first",
            "dora": "call apply_peft first",
            "adapter": "call apply_peft first",
            "feature": "the model has no head/classifier module",
        }.get(method, "")
        raise ConfigError(f"peft.method {method}: nothing to train ({hint})")
    return filt


def apply_peft(model: nnx.Module, peft_cfg, rngs: nnx.Rngs | None = None) -> nnx.Module:
    """Adds the config's LoRA / DoRA / adapters to ``model`` (in place) and returns it.

    ``full`` and ``feature`` add nothing (a feature head is built with the task model).
    Validates again what the config section checks, with one-line ConfigErrors: rank
    <= 0, missing alpha, a target pattern that matches nothing, bad adapter options.
    """
    method = peft_cfg.method
    if method not in METHODS:
        raise ConfigError(f"peft.method: {method!r} is not one of {list(METHODS)}")
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    dtype = jnp.dtype(getattr(peft_cfg, "dtype", None) or "float32")
    if method in ("lora", "dora"):
        check_hparams(peft_cfg.rank, peft_cfg.alpha, peft_cfg.dropout)
        add_lora(
            model,
            peft_cfg.targets,
            rank=peft_cfg.rank,
            alpha=peft_cfg.alpha,
            dropout=peft_cfg.dropout,
            rslora=peft_cfg.rslora,
            dora=method == "dora",
            rngs=rngs,
            dtype=dtype,
        )
    elif method == "adapter":
        add_adapters(
            model,
            placement=peft_cfg.adapter_placement,
            size=peft_cfg.adapter_size,
            reduction=peft_cfg.adapter_reduction,
            activation=peft_cfg.adapter_activation,
            dropout=peft_cfg.dropout,
            rngs=rngs,
            dtype=dtype,
        )
    return model


def abstract_peft_model(cfg, peft_cfg, dtype=jnp.float32, quantize=None) -> nnx.Module:
    """Model + PEFT variables with ``ShapeDtypeStruct`` leaves (no memory): a restore target.

    ``quantize`` (``int8`` / ``nf4``) gives the quantized base kernels' shapes and dtypes.
    """
    cls = family_of_config(cfg).model_class()

    def build():
        model = quantize_model(cls(cfg, dtype=dtype, rngs=nnx.Rngs(0)), quantize)
        return apply_peft(model, peft_cfg, nnx.Rngs(1))

    return nnx.eval_shape(build)


def _nbytes(x) -> int:
    return int(x.size) * jnp.dtype(x.dtype).itemsize


def summary(model: nnx.Module, filt) -> dict:
    """Trainable vs total parameter counts.

    Returns:
      ``{"trainable", "total", "percent", "trainable_bytes", "by_type", "text"}``;
      ``by_type`` counts trainable parameters per Variable type, ``text`` is one line
      for the console. ``total`` counts a quantized kernel as its [in, out] weights.
    """
    total = jax.tree.leaves(nnx.state(model, nnx.Param))
    flat = nnx.to_flat_state(nnx.state(model, filt))
    by_type: dict[str, int] = {}
    for _, v in flat:
        by_type[type(v).__name__] = by_type.get(type(v).__name__, 0) + int(v.size)
    n_train = sum(by_type.values())
    n_total = int(sum(x.size for x in total)) + quantized_stats(model)["params"]
    pct = 100.0 * n_train / max(n_total, 1)
    return {
        "trainable": n_train,
        "total": n_total,
        "percent": pct,
        "trainable_bytes": sum(_nbytes(v) for _, v in flat),
        "by_type": by_type,
        "text": f"trainable params: {n_train:,} / {n_total:,} ({pct:.4f}%)",
    }


def classifier_filter(clf, peft_cfg):
    """The trainable filter of a classifier: its head, plus the backbone's method filter.

    The new head is trained by every method. ``feature`` trains only the head, plus
    ``peft.unfreeze`` / ``peft.unfreeze_top_layers`` (top-N-layer fine-tuning); other
    methods add :func:`jaxtune.peft.trainable_filter` of the backbone (call
    ``apply_peft(clf.backbone, ...)`` first). An unused LM head never trains.
    """
    parts = [("head", lambda p, v: p[0] == "head")]
    if peft_cfg.method != "feature" or peft_cfg.unfreeze or peft_cfg.unfreeze_top_layers:
        inner = trainable_filter(clf.backbone, peft_cfg)
        parts.append(
            (
                f"backbone:{inner!r}",
                lambda p, v: (
                    len(p) > 1 and p[0] == "backbone" and p[1] != "lm_head" and inner(p[1:], v)
                ),
            )
        )
    return TrainableFilter(parts)
