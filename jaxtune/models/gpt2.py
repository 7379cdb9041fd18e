"""GPT-2 and GPT-Neo decoders (learned positions, LayerNorm, GELU MLP), as config flags.

* GPT-2: one fused ``c_attn`` projection [D, 3D] (split into q, k, v after the matmul)
  and ``c_proj``, both with bias; scores scaled by 1/sqrt(head_dim). Keeping ``c_attn``
  fused keeps our module names equal to HF's, so LoRA targets (``c_attn``) and PEFT
  exports line up with what PEFT does on GPT-2.
* GPT-Neo (``fused_qkv=False``, ``scale_attn=False``): separate q/k/v without bias,
  ``out_proj`` with bias, *no* 1/sqrt(d) score scaling, and alternating global / local
  layers (``layer_windows``, window 256) passed per layer through the layer scan.

Both: pre-LayerNorm blocks, learned absolute position embeddings (``positions`` index
them, so left-padded generation keeps each prompt's positions), tied output embeddings.
Same interface as :mod:`jaxtune.models.llama` (``hidden_states``,
``logits_from_hidden``, ``__call__``, ``init_cache``; KV cache [L, B, S, N, H]).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtune.models.attention import dot_product_attention
from jaxtune.models.layers import (
    Embed,
    LayerNorm,
    Linear,
    param,
    token_blocked,
)
from jaxtune.models.llama import DecoderLM, causal_layout, run_layers

# HF ``activation_function`` names. gelu_new / gelu_fast / gelu_pytorch_tanh are the
# same tanh approximation of GELU; "gelu" is the exact (erf) one.
ACTIVATIONS = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


@dataclass(frozen=True)
class GPT2Config:
    """Architecture of a GPT-2 / GPT-Neo decoder (hashable: it is static under jit).

    ``layer_windows`` gives a per-layer sliding window (0 = global); None = all global.
    """

    vocab_size: int = 50257
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    max_position_embeddings: int = 1024
    layer_norm_eps: float = 1e-5
    activation: str = "gelu_new"
    fused_qkv: bool = True
    scale_attn: bool = True
    layer_windows: tuple[int, ...] | None = None
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 50256
    eos_token_id: int | tuple[int, ...] | None = 50256
    pad_token_id: int | None = None
    # Execution options (not architecture): safe to change after loading.
    scan_layers: bool = True
    remat: str = "none"
    attention_impl: str = "auto"
    mlp_chunks: int = 1
    family: str = "gpt2"

    def replace(self, **kw) -> GPT2Config:
        return dataclasses.replace(self, **kw)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_kv_heads(self) -> int:
        return self.num_heads

    @property
    def windows(self) -> tuple[int, ...]:
        """Per-layer sliding window sizes (0 = global attention)."""
        if self.layer_windows is not None:
            return tuple(self.layer_windows)
        return (0,) * self.num_layers

    # ---- presets (published architectures; weights come from HF files) ----
    @classmethod
    def tiny(cls, **kw) -> GPT2Config:
        base = dict(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=256,
            num_layers=2,
            num_heads=4,
            max_position_embeddings=128,
        )
        return cls(**{**base, **kw})

    @classmethod
    def gpt2(cls, **kw) -> GPT2Config:
        return cls(**kw)

    @classmethod
    def gpt2_medium(cls, **kw) -> GPT2Config:
        base = dict(hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16)
        return cls(**{**base, **kw})

    @classmethod
    def gpt_neo_125m(cls, **kw) -> GPT2Config:
        base = dict(
            max_position_embeddings=2048,
            fused_qkv=False,
            scale_attn=False,
            # attention_types [[["global", "local"], 6]]: even layers global.
            layer_windows=tuple(0 if i % 2 == 0 else 256 for i in range(12)),
            family="gpt_neo",
        )
        return cls(**{**base, **kw})


class PositionEmbed(nnx.Module):
    """Learned absolute position table [P, D] (P = max positions)."""

    def __init__(self, num: int, dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs | None):
        self.embedding = param(
            rngs, nnx.initializers.normal(0.01), (num, dim), dtype, (None, "embed")
        )

    def __call__(self, positions: jax.Array, dtype) -> jax.Array:
        """positions: int [B, T] -> [B, T, D]."""
        return jnp.take(self.embedding[...], positions, axis=0).astype(dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: GPT2Config, lead, dtype, rngs):
        d = cfg.hidden_size
        lin = dict(lead=lead, dtype=dtype, rngs=rngs)
        if cfg.fused_qkv:
            self.c_attn = Linear(d, 3 * d, ("embed", "heads"), use_bias=True, **lin)
            self.c_proj = Linear(d, d, ("heads", "embed"), use_bias=True, **lin)
        else:
            self.q_proj = Linear(d, d, ("embed", "heads"), **lin)
            self.k_proj = Linear(d, d, ("embed", "heads"), **lin)
            self.v_proj = Linear(d, d, ("embed", "heads"), **lin)
            self.out_proj = Linear(d, d, ("heads", "embed"), use_bias=True, **lin)
        self.cfg = cfg

    def __call__(self, x, mask, kv=None, cache_index=None, rngs=None):
        """x: [B, T, D] -> ([B, T, D], (k, v) cache [B, S, N, H] each, or None)."""
        cfg = self.cfg
        b, t, d = x.shape
        r = rngs if rngs is not None else (None,) * 4
        if cfg.fused_qkv:
            q, k, v = jnp.split(self.c_attn(x, r[0]), 3, axis=-1)  # HF order: q, k, v
            out_proj = self.c_proj
        else:
            q, k, v = self.q_proj(x, r[0]), self.k_proj(x, r[1]), self.v_proj(x, r[2])
            out_proj = self.out_proj
        shape = (b, t, cfg.num_heads, cfg.head_dim)
        q, k, v = q.reshape(shape), k.reshape(shape), v.reshape(shape)
        if kv is not None:
            k_cache, v_cache = kv
            k = jax.lax.dynamic_update_slice(
                k_cache, k.astype(k_cache.dtype), (0, cache_index, 0, 0)
            )
            v = jax.lax.dynamic_update_slice(
                v_cache, v.astype(v_cache.dtype), (0, cache_index, 0, 0)
            )
            kv = (k, v)
            k, v = k.astype(q.dtype), v.astype(q.dtype)
        if cfg.scale_attn:
            scale = cfg.head_dim**-0.5
        else:
            # GPT-Neo was trained without the 1/sqrt(d) factor, so its scores are large;
            # HF computes them in float32 whatever the model dtype, and so do we.
            scale = 1.0
            q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
        out = dot_product_attention(
            q, k, v, mask, scale=scale, implementation=cfg.attention_impl, causal=kv is None
        )
        return out_proj(out.astype(x.dtype).reshape(b, t, d), r[3]), kv


class MLP(nnx.Module):
    def __init__(self, cfg: GPT2Config, lead, dtype, rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        lin = dict(use_bias=True, lead=lead, dtype=dtype, rngs=rngs)
        self.c_fc = Linear(d, f, ("embed", "mlp"), **lin)
        self.c_proj = Linear(f, d, ("mlp", "embed"), **lin)
        self.act = cfg.activation
        self.blocks = cfg.mlp_chunks

    def __call__(self, x, rngs=None):
        """x: [B, T, D] -> [B, T, D]."""
        return token_blocked(self._mlp, x, self.blocks, rngs)

    def _mlp(self, x, rngs):
        r = rngs if rngs is not None else (None,) * 2
        return self.c_proj(ACTIVATIONS[self.act](self.c_fc(x, r[0])), r[1])


class Block(nnx.Module):
    """Pre-LayerNorm decoder layer; optional bottleneck adapters after attention / MLP."""

    def __init__(self, cfg: GPT2Config, lead=(), dtype=jnp.float32, rngs=None):
        norm = dict(eps=cfg.layer_norm_eps, lead=lead, dtype=dtype, rngs=rngs)
        self.input_norm = LayerNorm(cfg.hidden_size, **norm)
        self.attn = Attention(cfg, lead, dtype, rngs)
        self.post_attn_norm = LayerNorm(cfg.hidden_size, **norm)
        self.mlp = MLP(cfg, lead, dtype, rngs)
        # Set by jaxtune.peft.adapters (identity at init). Declared as data, not static,
        # so adapter modules can be assigned into the slots later.
        self.attn_adapter = nnx.data(None)
        self.mlp_adapter = nnx.data(None)

    def __call__(self, x, cos, sin, mask, kv=None, cache_index=None, rng=None):
        """x: [B, T, D] -> ([B, T, D], updated kv or None). cos/sin: unused (no RoPE)."""
        # 4 attention + 2 MLP projections + 2 adapters, each with its own dropout key.
        rngs = tuple(jax.random.split(rng, 8)) if rng is not None else None
        h, kv = self.attn(self.input_norm(x), mask, kv, cache_index, rngs and rngs[:4])
        if self.attn_adapter is not None:
            h = self.attn_adapter(h, rngs and rngs[6])
        x = x + h
        h = self.mlp(self.post_attn_norm(x), rngs and rngs[4:6])
        if self.mlp_adapter is not None:
            h = self.mlp_adapter(h, rngs and rngs[7])
        return x + h, kv


class GPT2LMHeadModel(DecoderLM, nnx.Module):
    """Decoder-only LM. ``model(input_ids, attention_mask=None) -> logits [B, T, V]``."""

    config_class = GPT2Config
    cache_heads_attr = "num_heads"  # no grouped-query attention: the cache holds N heads

    def __init__(self, cfg: GPT2Config, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        self.config = cfg
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs)
        self.embed_positions = PositionEmbed(
            cfg.max_position_embeddings, cfg.hidden_size, dtype=dtype, rngs=rngs
        )
        if cfg.scan_layers:
            self.layers = Block(cfg, lead=(cfg.num_layers,), dtype=dtype, rngs=rngs)
        else:
            self.layers = nnx.List(
                [Block(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_layers)]
            )
        self.norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype, rngs=rngs)
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else Linear(cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), dtype=dtype, rngs=rngs)
        )
        self.compute_dtype = None

    def hidden_states(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        cache: dict | None = None,
        cache_index: jax.Array | int | None = None,
        rng: jax.Array | None = None,
    ):
        """Final-norm hidden states.

        Args:
          input_ids: int [B, T].
          attention_mask: int [B, T] (1 = token, 0 = padding), or with a cache [B, S]
            covering every cache slot.
          positions: int [B, T] indices into the position table; default
            ``cache_index + arange(T)``.
          segment_ids: int [B, T] packed-example ids (attention stays inside one).
          cache: ``{"k", "v"}`` each [L, B, S, N, H] (see ``init_cache``).
          cache_index: slot where these T tokens are written in the cache.
          rng: dropout key (LoRA dropout); None = deterministic.

        Returns:
          [B, T, D], or ([B, T, D], new cache) when a cache is given.
        """
        cfg = self.config
        dtype = self.compute_dtype or self.embed_tokens.embedding.dtype
        q_index, mask_fn = causal_layout(input_ids, attention_mask, segment_ids, cache, cache_index)
        if positions is None:
            positions = q_index
        x = self.embed_tokens(input_ids, dtype) + self.embed_positions(positions, dtype)
        x, cache = run_layers(self.layers, cfg, x, None, None, mask_fn, cache, cache_index, rng)
        x = self.norm(x)
        return x if cache is None else (x, cache)
