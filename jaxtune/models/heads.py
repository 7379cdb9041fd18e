"""Pooling, classification heads, and a sequence classifier over any backbone.

A backbone is any jaxtune model with ``hidden_states(input_ids, attention_mask, ...)
-> [B, T, D]``: encoders (``BertModel``: the last layer) and decoders (the final-norm
states). :class:`SequenceClassifier` holds the backbone and a ``head`` (linear or MLP)
on pooled features. Parameter paths are ``backbone/...`` and ``head/...``; the backbone
keeps its own paths below ``backbone``, so PEFT applied to ``clf.backbone`` and the
family key tables work unchanged.

Pooling (``[B, T, D] -> [B, D]``): ``cls`` (first token), ``mean`` (over non-padding
tokens, sentence-transformers style), ``last`` (last non-padding token, what HF's
``*ForSequenceClassification`` decoders read), ``pooler`` (BERT's pretrained
``tanh(dense(h[:, 0]))``, what ``BertForSequenceClassification`` reads).

Layers: ``feature_layer = -1`` reads the backbone's final states; ``k >= 0`` reads HF's
``hidden_states[k]`` (0 = embeddings, L = last layer, before a decoder's final norm);
``"mean"`` averages layers 1..L.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtune.errors import ConfigError
from jaxtune.models.layers import Linear

POOLINGS = ("cls", "mean", "last", "pooler")
HEAD_ACTIVATIONS = {
    "tanh": jnp.tanh,
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # HF "gelu" is the erf form
}


def is_encoder(cfg) -> bool:
    return not getattr(cfg, "causal", True)


def default_pooling(cfg) -> str:
    """``pooler`` for BERT with a pooler, ``cls`` for other encoders, ``last`` for decoders."""
    if is_encoder(cfg):
        return "pooler" if getattr(cfg, "pooler", False) else "cls"
    return "last"


def pool(h: jax.Array, attention_mask: jax.Array | None, kind: str) -> jax.Array:
    """Pools token states into one vector per row.

    Args:
      h: [B, T, D] hidden states.
      attention_mask: int [B, T], 1 = token, 0 = padding (None = all tokens).
      kind: ``cls``, ``mean`` or ``last`` (``pooler`` needs the backbone:
        :meth:`SequenceClassifier.features`).

    Returns:
      [B, D] in float32. Empty rows give zeros (mean) or the first token (last).
    """
    h = h.astype(jnp.float32)
    b, t, _ = h.shape
    mask = jnp.ones((b, t), jnp.int32) if attention_mask is None else attention_mask
    if kind == "cls":
        return h[:, 0]
    if kind == "mean":
        w = (mask > 0).astype(jnp.float32)[..., None]
        return jnp.sum(h * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1e-9)
    if kind == "last":
        # The rightmost real token, whatever the padding side (HF's decoder heads do the
        # same with pad ids: argmax of index * non_pad).
        idx = jnp.argmax(jnp.arange(t)[None, :] * (mask > 0), axis=-1)
        return jnp.take_along_axis(h, idx[:, None, None], axis=1)[:, 0]
    raise ConfigError(f"pooling {kind!r} is not one of {list(POOLINGS)}")


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Row-wise L2 normalisation (sentence-transformers' ``Normalize``): [N, D] -> [N, D]."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def layer_states(backbone, input_ids, attention_mask=None) -> jax.Array:
    """Every layer's output [L + 1, B, T, D] (HF ``hidden_states``: embeddings first).

    Encoders return them from one scan (``all_layers=True``). Other backbones are run
    with unstacked layers wrapped in a recorder, so any family whose model loops over
    ``self.layers`` works without changes to its code (not with ``remat``: the recorder
    must see the layer outputs in the caller's trace).
    """
    if "all_layers" in inspect.signature(backbone.hidden_states).parameters:
        return backbone.hidden_states(input_ids, attention_mask, all_layers=True)
    view = _unstacked_view(backbone)
    sink: list = []
    view.layers = nnx.List([_Recorder(b, sink) for b in view.layers])
    view.hidden_states(input_ids, attention_mask)
    first = sink[0][1]
    return jnp.stack([first] + [out for out, _ in sink])


class _Recorder(nnx.Module):
    """Calls a layer and records ``(its output, its input)`` in a Python list (trace-time)."""

    def __init__(self, inner, sink: list):
        self.inner = inner
        self._sink = nnx.static(sink)

    def __call__(self, x, *args, **kw):
        out = self.inner(x, *args, **kw)
        h = out[0] if isinstance(out, tuple) else out
        self._sink.append((h, x))
        return out


def _unstacked_view(backbone):
    """A copy of ``backbone`` (sharing arrays) whose layers are an ``nnx.List``."""
    graphdef, state = nnx.split(backbone)
    view = nnx.merge(graphdef, state)
    cfg = view.config
    if getattr(cfg, "scan_layers", False):
        lgraph, lstate = nnx.split(view.layers)
        blocks = [
            nnx.merge(lgraph, jax.tree.map(lambda a, i=i: a[i], lstate))
            for i in range(cfg.num_layers)
        ]
        view.layers = nnx.List(blocks)
        view.config = cfg.replace(scan_layers=False)
    return view


def backbone_states(backbone, input_ids, attention_mask=None, layer=-1, rng=None) -> jax.Array:
    """[B, T, D] states the head reads: final (-1), HF layer ``k``, or ``"mean"`` of 1..L."""
    if layer == -1:
        return backbone.hidden_states(input_ids, attention_mask, rng=rng)
    stack = layer_states(backbone, input_ids, attention_mask)
    if layer == "mean":
        return jnp.mean(stack[1:].astype(jnp.float32), axis=0)
    if not isinstance(layer, int) or not 0 <= layer < stack.shape[0]:
        raise ConfigError(
            f"feature_layer {layer!r}: expected -1, 'mean' or 0..{stack.shape[0] - 1}"
        )
    return stack[layer]


class ClassificationHead(nnx.Module):
    """Pooled features -> class logits: ``out(x)`` or ``out(act(dense(x)))``.

    ``dense`` [D, hidden] and ``out`` [hidden or D, K] are plain ``Linear`` layers (so
    they export like any other weight). Logical axes: ``embed`` in, ``classes`` out.
    """

    def __init__(
        self,
        in_features: int,
        num_labels: int,
        *,
        hidden: int = 0,
        activation: str = "tanh",
        use_bias: bool = True,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if num_labels < 2:
            raise ConfigError(f"num_labels: need at least 2 classes, got {num_labels}")
        if activation not in HEAD_ACTIVATIONS:
            raise ConfigError(
                f"head activation {activation!r} is not one of {sorted(HEAD_ACTIVATIONS)}"
            )
        lin = dict(use_bias=use_bias, dtype=dtype, rngs=rngs)
        self.dense = Linear(in_features, hidden, ("embed", "mlp"), **lin) if hidden else None
        self.out = Linear(hidden or in_features, num_labels, ("embed", "classes"), **lin)
        self.activation = activation
        self.num_labels = num_labels
        self.hidden = hidden

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, D] -> float32 logits [B, K]."""
        x = x.astype(self.out.kernel.dtype)
        if self.dense is not None:
            x = HEAD_ACTIVATIONS[self.activation](self.dense(x))
        return self.out(x).astype(jnp.float32)


class SequenceClassifier(nnx.Module):
    """Backbone + pooling + head. ``clf(input_ids, attention_mask) -> logits [B, K]``.

    Args:
      backbone: a jaxtune model (encoder or decoder), possibly with LoRA / adapters.
      num_labels: K.
      pooling: see module docstring; default :func:`default_pooling`.
      feature_layer: -1, an HF hidden-state index, or ``"mean"``.
      head_hidden: 0 = linear head, else the MLP width.
      head_activation: MLP nonlinearity (``tanh``, ``relu``, ``gelu``).
      head_bias: default True for encoders, False for decoders (HF's ``score``).
      label_names: class names in id order (kept for exports).
      add_eos: the data convention it is trained / evaluated with: each text ends with the
        tokenizer's EOS (``data.add_eos``; with ``last`` pooling that EOS is pooled).
        Exports write it into the exported tokenizer.
      rngs: head initialisation.
    """

    def __init__(
        self,
        backbone: nnx.Module,
        num_labels: int,
        *,
        pooling: str | None = None,
        feature_layer: int | str = -1,
        head_hidden: int = 0,
        head_activation: str = "tanh",
        head_bias: bool | None = None,
        label_names: tuple[str, ...] | None = None,
        add_eos: bool = True,
        rngs: nnx.Rngs | None = None,
    ):
        cfg = backbone.config
        pooling = pooling or default_pooling(cfg)
        if pooling not in POOLINGS:
            raise ConfigError(f"peft.pooling: {pooling!r} is not one of {list(POOLINGS)}")
        if pooling == "pooler" and getattr(backbone, "pooler", None) is None:
            raise ConfigError(
                f"peft.pooling: pooler needs a backbone with a pretrained pooler "
                f"({type(backbone).__name__} has none; use cls, mean or last)"
            )
        if label_names is not None and len(label_names) != num_labels:
            raise ConfigError(f"{len(label_names)} label names for {num_labels} classes")
        self.backbone = backbone
        dtype = nnx.to_flat_state(nnx.state(backbone, nnx.Param))[0][1].dtype
        self.head = ClassificationHead(
            cfg.hidden_size,
            num_labels,
            hidden=head_hidden,
            activation=head_activation,
            use_bias=is_encoder(cfg) if head_bias is None else head_bias,
            dtype=dtype,
            rngs=rngs if rngs is not None else nnx.Rngs(0),
        )
        self.pooling = pooling
        self.feature_layer = feature_layer
        self.label_names = tuple(label_names) if label_names is not None else None
        self.add_eos = bool(add_eos)

    @property
    def config(self):
        """The backbone's config (PEFT helpers read ``hidden_size``, ``scan_layers``...)."""
        return self.backbone.config

    @property
    def num_labels(self) -> int:
        return self.head.num_labels

    def features(self, input_ids, attention_mask=None, *, rng=None) -> jax.Array:
        """Pooled features float32 [B, D] (what the head reads)."""
        h = backbone_states(self.backbone, input_ids, attention_mask, self.feature_layer, rng)
        if self.pooling == "pooler":
            return self.backbone.pooled_output(h).astype(jnp.float32)
        return pool(h, attention_mask, self.pooling)

    def __call__(self, input_ids, attention_mask=None, *, rng=None, **_) -> jax.Array:
        """int [B, T] (+ mask [B, T]) -> float32 logits [B, K]."""
        return self.head(self.features(input_ids, attention_mask, rng=rng))
