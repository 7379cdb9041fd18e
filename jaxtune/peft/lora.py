"""LoRA and DoRA on any ``Linear`` of a model, chosen by name pattern.

Design:

* LoRA lives *inside* :class:`jaxtune.models.layers.Linear`: the factors fill its
  ``lora_a`` [*lead, in, R] / ``lora_b`` [*lead, R, out] slots (and ``dora_m``
  [*lead, out] for DoRA) as ``nnx.LoRAParam``. Base parameter paths (``.../kernel``)
  never change, so a base checkpoint loads into an adapted model as-is, and
  ``nnx.LoRAParam`` is the type filter that selects exactly the adapter weights.
* Stacked (scanned) layers get stacked factors: the leading ``layers`` axis of the
  kernel is kept, so the scan body sees one layer's factors like any other parameter.
* Logical axes come from the base kernel: A keeps the kernel's input axis, B its
  output axis, the rank axis is ``lora_rank`` (sharding rules decide its placement).
* Initialisation follows PEFT: A kaiming-uniform (bound 1/sqrt(in)) or normal(1/R),
  B zeros, DoRA magnitude = column norms of W. Hence adapted == base at init.
* :func:`merge` is pure: it returns a copy with the factors folded into the kernels and
  the input untouched. There is no in-place merged state, so "unmerge" is simply
  keeping the original model.

Shapes: R rank; kernels are [*lead, in, out] (``lead`` = () or (L,)).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtune.errors import ConfigError
from jaxtune.models.layers import Linear

ALL_LINEAR = "all-linear"
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class LoraSpec:
    """Hyper-parameters of the LoRA on a model (kept on the model for exports).

    ``targets`` are the leaf names of the adapted modules (e.g. ``("q_proj", "v_proj")``).
    """

    rank: int
    alpha: float
    rslora: bool = False
    dora: bool = False
    dropout: float = 0.0
    targets: tuple[str, ...] = ()

    @property
    def scale(self) -> float:
        # rsLoRA (Kalajdzievski 2023) keeps the update's scale stable as rank grows.
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


def path_str(path: Sequence) -> str:
    return "/".join(str(p) for p in path)


def linears(model: nnx.Module) -> list[tuple[tuple, Linear]]:
    """Every ``Linear`` of the model as (module path, module), in a stable order."""
    return [(tuple(p), m) for p, m in nnx.iter_modules(model) if isinstance(m, Linear)]


def lora_linears(model: nnx.Module) -> list[tuple[tuple, Linear]]:
    """The ``Linear`` modules that carry LoRA factors."""
    return [(p, m) for p, m in linears(model) if m.lora_a is not None]


def normalize_targets(targets: str | Iterable[str] | None) -> tuple[str, ...]:
    """``"q_proj, v_proj"`` or ``["q_proj", "v_proj"]`` -> ``("q_proj", "v_proj")``."""
    if targets is None:
        return ()
    if isinstance(targets, str):
        targets = targets.split(",")
    out = []
    for t in targets:
        out.extend(s.strip() for s in str(t).split(",") if s.strip())
    return tuple(out)


def _matches(pattern: str, path: tuple) -> bool:
    if pattern == ALL_LINEAR:
        # Every linear layer inside the decoder stack; lm_head / classifier heads excluded
        # (PEFT's all-linear also leaves the output layer alone).
        return "layers" in path
    if _IDENT.match(pattern):
        return str(path[-1]) == pattern
    return re.search(pattern, path_str(path)) is not None


def select_targets(model: nnx.Module, targets: str | Iterable[str]) -> list[tuple[tuple, Linear]]:
    """The linear layers matched by ``targets``.

    A pattern is ``all-linear``; a plain module name (``q_proj``) matching the last path
    component; or a regex searched in the ``/``-joined module path
    (``layers/attn/(q|v)_proj``; unscanned models have the layer index in the path:
    ``layers/3/mlp/down_proj``). Every pattern must match at least one layer.

    Raises:
      ConfigError: an empty target list, a bad regex, or a pattern matching nothing.
    """
    pats = normalize_targets(targets)
    if not pats:
        raise ConfigError("peft.targets: empty; name the linear layers to adapt (or all-linear)")
    candidates = linears(model)
    chosen: dict[tuple, Linear] = {}
    for pat in pats:
        if pat != ALL_LINEAR and not _IDENT.match(pat):
            try:
                re.compile(pat)
            except re.error as e:
                raise ConfigError(f"peft.targets: invalid regex {pat!r} ({e})") from None
        hits = [(p, m) for p, m in candidates if _matches(pat, p)]
        if not hits:
            names = sorted({str(p[-1]) for p, _ in candidates})
            hint = (
                " (scanned layers have no layer index in their path; use scan_layers=False)"
                if re.search(r"\d", pat) and getattr(model.config, "scan_layers", False)
                else ""
            )
            raise ConfigError(
                f"peft.targets: {pat!r} matches no linear layer of this model{hint}; "
                f"linear layers are {names} (or use all-linear)"
            )
        chosen.update(hits)
    return [(p, chosen[p]) for p, _ in candidates if p in chosen]


def check_hparams(rank, alpha, dropout: float = 0.0) -> None:
    """One-line :class:`ConfigError` for an unusable rank / alpha / dropout."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise ConfigError(f"peft.rank: must be a positive integer, got {rank!r}")
    if alpha is None:
        raise ConfigError("peft.alpha: required for lora/dora (LoRA scale = alpha / rank)")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
        raise ConfigError(f"peft.alpha: must be a positive number, got {alpha!r}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ConfigError(f"peft.dropout: must be in [0, 1), got {dropout!r}")


def column_norm(w: jax.Array) -> jax.Array:
    """L2 norm over the input axis: w [*lead, in, out] -> float32 [*lead, out].

    The same expression as the DoRA forward pass in ``Linear._dora`` so that the
    magnitude initialised from it makes ``m / ||W||`` exactly 1 at init.
    """
    return jnp.sqrt(jnp.sum(jnp.square(w.astype(jnp.float32)), axis=-2))


def _axes(var: nnx.Variable) -> tuple:
    axes = var.get_metadata().get("axes")
    return tuple(axes) if axes is not None else (None,) * var.ndim


def add_lora(
    model: nnx.Module,
    targets: str | Iterable[str],
    *,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    rslora: bool = False,
    dora: bool = False,
    rngs: nnx.Rngs,
    init: str = "kaiming",
    dtype=jnp.float32,
    modules: Sequence[tuple] | None = None,
) -> list[str]:
    """Adds LoRA (or DoRA) factors to the matched linear layers, in place.

    Args:
      model: a concrete model (or one being traced under ``nnx.eval_shape``).
      targets: patterns, see :func:`select_targets`.
      rank: R > 0.
      alpha: scale numerator: scale = alpha / R (rsLoRA: alpha / sqrt(R)).
      dropout: dropout on the LoRA branch input (needs an ``rng`` in the forward).
      rslora: rank-stabilised scaling.
      dora: also add the DoRA magnitude ``dora_m`` [*lead, out] = ||W|| per column.
      rngs: source of A's random init (``rngs.params()``).
      init: ``kaiming`` (PEFT default: uniform, bound 1/sqrt(in)) or ``gaussian``
        (normal, std 1/R).
      dtype: factor dtype; float32 by default like PEFT (adapters stay fp32 when the
        base is bf16, small enough to afford and numerically safer).
      modules: exact module paths to adapt instead of ``targets`` (PEFT import).

    Returns:
      The ``/``-joined paths of the adapted modules.

    Raises:
      ConfigError: bad rank / alpha / dropout / init, a pattern matching nothing, or a
        model that already has LoRA.
    """
    check_hparams(rank, alpha, dropout)
    if init not in ("kaiming", "gaussian"):
        raise ConfigError(f"lora init: {init!r} is not one of ['gaussian', 'kaiming']")
    if lora_linears(model):
        raise ConfigError("peft: the model already has LoRA factors; merge or start from the base")
    if modules is not None:
        by_path = dict(linears(model))
        chosen = [(tuple(p), by_path[tuple(p)]) for p in modules]
    else:
        chosen = select_targets(model, targets)
    spec = LoraSpec(
        rank=rank,
        alpha=float(alpha),
        rslora=bool(rslora),
        dora=bool(dora),
        dropout=float(dropout),
        targets=tuple(sorted({str(p[-1]) for p, _ in chosen})),
    )
    for _, lin in chosen:
        kernel = lin.kernel
        *lead, d_in, d_out = kernel.shape
        *lead_ax, in_ax, out_ax = _axes(kernel)
        key = rngs.params()
        if init == "kaiming":
            # kaiming_uniform(a=sqrt(5)) on torch's [R, in] lora_A: bound = 1/sqrt(in).
            bound = 1.0 / math.sqrt(d_in)
            a = jax.random.uniform(key, (*lead, d_in, rank), dtype, -bound, bound)
        else:
            a = jax.random.normal(key, (*lead, d_in, rank), dtype) / rank
        lin.lora_a = nnx.data(nnx.LoRAParam(a, axes=(*lead_ax, in_ax, "lora_rank")))
        lin.lora_b = nnx.data(
            nnx.LoRAParam(
                jnp.zeros((*lead, rank, d_out), dtype), axes=(*lead_ax, "lora_rank", out_ax)
            )
        )
        if dora:
            m = column_norm(kernel[...]).astype(dtype)
            lin.dora_m = nnx.data(nnx.LoRAParam(m, axes=(*lead_ax, out_ax)))
        lin.lora_scale = spec.scale
        lin.lora_dropout = spec.dropout
    model.lora_spec = spec
    return [path_str(p) for p, _ in chosen]


def merged_kernel(lin: Linear) -> jax.Array:
    """Kernel [*lead, in, out] with the LoRA / DoRA update folded in (kernel's dtype).

    LoRA: W + s * A @ B. DoRA (as PEFT merges it): (m / ||W + s*A@B||) * (W + s*A@B),
    the norm per output column. Computed in float32.
    """
    w = lin.kernel[...]
    a = lin.lora_a[...].astype(jnp.float32)
    b = lin.lora_b[...].astype(jnp.float32)
    new = w.astype(jnp.float32) + lin.lora_scale * jnp.einsum("...ir,...ro->...io", a, b)
    if lin.dora_m is not None:
        mag = lin.dora_m[...].astype(jnp.float32) / column_norm(new)  # [*lead, out]
        new = new * mag[..., None, :]
    return new.astype(w.dtype)


def strip_lora(lin: Linear) -> None:
    """Removes the factors from one layer (after folding them into its kernel)."""
    lin.lora_a = None
    lin.lora_b = None
    lin.dora_m = None
    lin.lora_scale = 0.0
    lin.lora_dropout = 0.0


def merge(model: nnx.Module) -> nnx.Module:
    """A copy of ``model`` with every LoRA/DoRA update folded into its kernels.

    Pure: ``model`` is untouched (``nnx.clone`` gives new Variables; arrays are only
    replaced on the copy). The result has no ``nnx.LoRAParam``, so it saves as plain HF
    weights. To "unmerge", keep using the original model.
    """
    new = nnx.clone(model)
    for _, lin in lora_linears(new):
        lin.kernel.set_value(merged_kernel(lin))
        strip_lora(lin)
    if getattr(new, "lora_spec", None) is not None:
        new.lora_spec = None
    return new


def lora_spec(model: nnx.Module) -> LoraSpec | None:
    """The :class:`LoraSpec` recorded by :func:`add_lora` (None without LoRA)."""
    return getattr(model, "lora_spec", None) if lora_linears(model) else None
