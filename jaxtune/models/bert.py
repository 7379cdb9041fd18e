"""BERT-family encoders: BERT, DistilBERT, MiniLM (e.g. all-MiniLM-L6-v2), ...

A post-norm Transformer encoder with bidirectional attention::

    x = LN(word[ids] + position[pos] (+ token_type[tt]))
    per layer:  x = LN_1(x + o(attn(x)))            (attention adapter before the add)
                x = LN_2(x + down(act(up(x))))      (MLP adapter before the add)
    pooler (optional): tanh(dense(x[:, 0]))          (BertModel's ``pooler_output``)

DistilBERT is the same network without token-type embeddings and pooler; the two differ
only in HF tensor names (``jaxtune.hf.bert``). Module names follow the decoders
(``q_proj``, ``o_proj``, ``up_proj``, ``down_proj``) so ``peft.targets`` such as
``q_proj,v_proj`` mean the same thing on every family.

Layers are stacked and scanned by default like ``llama.py``; ``hidden_states(...,
all_layers=True)`` returns every layer's output from the same scan (feature extraction
from a chosen layer or an average of layers costs one forward).

Shapes: B batch, T tokens, D hidden, N heads, H head dim, F MLP width, L layers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtune.models.attention import dot_product_attention
from jaxtune.models.layers import (
    Embed,
    LayerNorm,
    Linear,
    attention_mask,
    token_blocked,
)
from jaxtune.models.llama import REMAT_POLICIES, named_layer_input

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # HF "gelu" is the exact erf form
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


@dataclass(frozen=True)
class BertConfig:
    """Architecture of a BERT-family encoder (hashable: static under jit).

    ``type_vocab_size = 0`` means no token-type embeddings (DistilBERT); ``pooler`` adds
    BERT's ``tanh(dense(h[:, 0]))`` pooler. ``family`` is ``bert`` or ``distilbert`` and
    picks the HF tensor names.
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pooler: bool = True
    pad_token_id: int | None = 0
    # Execution options (not architecture): safe to change after loading.
    scan_layers: bool = True
    remat: str = "none"
    attention_impl: str = "auto"
    mlp_chunks: int = 1
    family: str = "bert"

    # Encoders attend both ways; pooling code uses this to pick CLS vs last-token.
    causal: ClassVar[bool] = False
    tie_word_embeddings: ClassVar[bool] = False

    def replace(self, **kw) -> BertConfig:
        return dataclasses.replace(self, **kw)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def tiny(cls, **kw) -> BertConfig:
        base = dict(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            num_layers=2,
            num_heads=4,
            max_position_embeddings=64,
        )
        return cls(**{**base, **kw})

    @classmethod
    def bert_base(cls, **kw) -> BertConfig:
        return cls(**kw)

    @classmethod
    def minilm_l6(cls, **kw) -> BertConfig:
        """all-MiniLM-L6-v2 / MiniLM-L6-H384."""
        base = dict(hidden_size=384, intermediate_size=1536, num_layers=6, num_heads=12)
        return cls(**{**base, **kw})

    @classmethod
    def distilbert_base(cls, **kw) -> BertConfig:
        base = dict(num_layers=6, type_vocab_size=0, pooler=False, family="distilbert")
        return cls(**{**base, **kw})


class Attention(nnx.Module):
    def __init__(self, cfg: BertConfig, lead, dtype, rngs):
        d = cfg.hidden_size
        lin = dict(use_bias=True, lead=lead, dtype=dtype, rngs=rngs)
        self.q_proj = Linear(d, d, ("embed", "heads"), **lin)
        self.k_proj = Linear(d, d, ("embed", "heads"), **lin)
        self.v_proj = Linear(d, d, ("embed", "heads"), **lin)
        self.o_proj = Linear(d, d, ("heads", "embed"), **lin)
        self.cfg = cfg

    def __call__(self, x, mask, rngs=None):
        """x: [B, T, D], mask: bool [B, 1, T, T] -> [B, T, D] (before the residual add)."""
        cfg = self.cfg
        b, t, _ = x.shape
        r = rngs if rngs is not None else (None,) * 4
        shape = (b, t, cfg.num_heads, cfg.head_dim)
        q = self.q_proj(x, r[0]).reshape(shape)
        k = self.k_proj(x, r[1]).reshape(shape)
        v = self.v_proj(x, r[2]).reshape(shape)
        out = dot_product_attention(
            q, k, v, mask, scale=cfg.head_dim**-0.5, implementation=cfg.attention_impl
        )
        return self.o_proj(out.reshape(b, t, -1), r[3])


class MLP(nnx.Module):
    def __init__(self, cfg: BertConfig, lead, dtype, rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        lin = dict(use_bias=True, lead=lead, dtype=dtype, rngs=rngs)
        self.up_proj = Linear(d, f, ("embed", "mlp"), **lin)
        self.down_proj = Linear(f, d, ("mlp", "embed"), **lin)
        self.act = cfg.hidden_act
        self.blocks = cfg.mlp_chunks

    def __call__(self, x, rngs=None):
        """x: [B, T, D] -> [B, T, D]."""
        return token_blocked(self._mlp, x, self.blocks, rngs)

    def _mlp(self, x, rngs):
        r = rngs if rngs is not None else (None, None)
        return self.down_proj(ACTIVATIONS[self.act](self.up_proj(x, r[0])), r[1])


class Block(nnx.Module):
    """Post-norm encoder layer; optional bottleneck adapters before each residual add
    (Houlsby's placement for BERT)."""

    def __init__(self, cfg: BertConfig, lead=(), dtype=jnp.float32, rngs=None):
        norm = dict(eps=cfg.layer_norm_eps, lead=lead, dtype=dtype, rngs=rngs)
        self.attn = Attention(cfg, lead, dtype, rngs)
        self.attn_norm = LayerNorm(cfg.hidden_size, **norm)
        self.mlp = MLP(cfg, lead, dtype, rngs)
        self.mlp_norm = LayerNorm(cfg.hidden_size, **norm)
        # Filled by jaxtune.peft.adapters; data (not static) so modules can be assigned.
        self.attn_adapter = nnx.data(None)
        self.mlp_adapter = nnx.data(None)

    def __call__(self, x, mask, rng=None):
        """x: [B, T, D] -> [B, T, D]."""
        # 4 attention + 2 MLP projections + 2 adapters, each with its own dropout key.
        rngs = tuple(jax.random.split(rng, 8)) if rng is not None else None
        h = self.attn(x, mask, rngs and rngs[:4])
        if self.attn_adapter is not None:
            h = self.attn_adapter(h, rngs and rngs[6])
        x = self.attn_norm(x + h)
        h = self.mlp(x, rngs and rngs[4:6])
        if self.mlp_adapter is not None:
            h = self.mlp_adapter(h, rngs and rngs[7])
        return self.mlp_norm(x + h)


class BertModel(nnx.Module):
    """Encoder. ``model(input_ids, attention_mask=None) -> last hidden states [B, T, D]``."""

    config_class = BertConfig

    def __init__(self, cfg: BertConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        self.config = cfg
        d = cfg.hidden_size
        self.embed_tokens = Embed(cfg.vocab_size, d, dtype=dtype, rngs=rngs)
        self.position_embed = Embed(cfg.max_position_embeddings, d, dtype=dtype, rngs=rngs)
        self.token_type_embed = (
            Embed(cfg.type_vocab_size, d, dtype=dtype, rngs=rngs) if cfg.type_vocab_size else None
        )
        self.embed_norm = LayerNorm(d, eps=cfg.layer_norm_eps, dtype=dtype, rngs=rngs)
        if cfg.scan_layers:
            self.layers = Block(cfg, lead=(cfg.num_layers,), dtype=dtype, rngs=rngs)
        else:
            self.layers = nnx.List(
                [Block(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_layers)]
            )
        self.pooler = (
            Linear(d, d, ("embed", None), use_bias=True, dtype=dtype, rngs=rngs)
            if cfg.pooler
            else None
        )
        self.compute_dtype = None

    def hidden_states(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        rng: jax.Array | None = None,
        all_layers: bool = False,
    ) -> jax.Array:
        """Encoder outputs.

        Args:
          input_ids: int [B, T].
          attention_mask: int [B, T], 1 = token, 0 = padding (None = all tokens).
          token_type_ids: int [B, T] segment A/B ids (None = zeros, as in HF).
          positions: int [B, T] position ids (default ``arange(T)``).
          segment_ids: int [B, T] packed-example ids; attention stays inside one.
          rng: dropout key (LoRA / adapter dropout); None = deterministic.
          all_layers: also return every layer's output.

        Returns:
          The last layer's output [B, T, D]; with ``all_layers`` the stack [L + 1, B, T, D]
          of the embedding output and every layer's output (HF ``hidden_states``).
        """
        b, t = input_ids.shape
        dtype = self.compute_dtype or self.embed_tokens.embedding.dtype
        index = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        positions = index if positions is None else positions
        x = self.embed_tokens(input_ids, jnp.float32) + self.position_embed(positions, jnp.float32)
        if self.token_type_embed is not None:
            tt = jnp.zeros_like(input_ids) if token_type_ids is None else token_type_ids
            x = x + self.token_type_embed(tt, jnp.float32)
        x = self.embed_norm(x).astype(dtype)
        mask = attention_mask_bidirectional(index, attention_mask, segment_ids)
        x, stack = self._run_layers(x, mask, rng, all_layers)
        return stack if all_layers else x

    def _run_layers(self, x, mask, rng, collect: bool):
        """Applies every layer (scanned if stacked); optionally stacks the outputs."""
        cfg = self.config
        keys = jax.random.split(rng, cfg.num_layers) if rng is not None else None

        def one_layer(block, h, key):
            return block(named_layer_input(h), mask, key)

        if cfg.remat != "none":
            one_layer = nnx.remat(one_layer, policy=REMAT_POLICIES[cfg.remat])
        if not cfg.scan_layers:
            outs = [x]
            for i, block in enumerate(self.layers):
                x = one_layer(block, x, None if keys is None else keys[i])
                outs.append(x)
            return x, (jnp.stack(outs) if collect else None)
        graphdef, state = nnx.split(self.layers)

        def body(h, xs):
            layer_state, key = xs
            h = one_layer(nnx.merge(graphdef, layer_state), h, key)
            # Emitting h as the scan output is free when not collected (None).
            return h, (h if collect else None)

        out, ys = jax.lax.scan(body, x, (state, keys))
        return out, (jnp.concatenate([x[None], ys]) if collect else None)

    def pooled_output(self, h: jax.Array) -> jax.Array:
        """BERT's pooler: ``tanh(dense(h[:, 0]))``. h: [B, T, D] -> [B, D]."""
        if self.pooler is None:
            raise ValueError(f"{self.config.family} model has no pooler (pooling: cls or mean)")
        return jnp.tanh(self.pooler(h[:, 0]))

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, **kw):
        """int [B, T] -> last hidden states [B, T, D] (``hidden_states``)."""
        return self.hidden_states(input_ids, attention_mask, token_type_ids, **kw)


def attention_mask_bidirectional(index, valid, segment_ids) -> jax.Array:
    """Bool mask [B, 1, T, T]: every token sees every non-padding token (of its segment)."""
    return attention_mask(index, index, valid, segment_ids, segment_ids, causal=False)
