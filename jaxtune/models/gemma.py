"""Gemma decoders: Gemma 1, Gemma 2 and Gemma 3 (text), as config flags.

What differs from Llama, and the flag that turns it on:

* all: GeGLU MLP (``hidden_act``: gelu with the tanh approximation), ``(1 + w)``
  RMSNorm, embeddings scaled by sqrt(D) in the compute dtype (HF rounds the factor
  to that dtype too), tied output embeddings, head_dim independent of D / N.
* Gemma 2 and 3 (``sandwich_norms``): norms both before and after attention and MLP.
* Gemma 2 (``attn_logit_softcapping``, ``final_logit_softcapping``): tanh capping of the
  attention scores and of the output logits; ``query_pre_attn_scalar`` sets the score
  scale (``1/sqrt(query_pre_attn_scalar)`` instead of ``1/sqrt(head_dim)``).
* Gemma 2 and 3 (``layer_windows``): per-layer sliding windows (local/global layers).
* Gemma 3 (``qk_norm``, ``rope_local_theta``): RMSNorm on q and k per head; sliding
  layers use their own RoPE base. Both per-layer differences are arrays passed through
  the layer scan (windows, rope table ids), so the stack still compiles once.

Layers are stacked and scanned by default, exactly like :mod:`jaxtune.models.llama`,
and the model has the same interface (``hidden_states``, ``logits_from_hidden``,
``__call__``, ``init_cache``), so training, generation and PEFT need nothing
family-specific.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtune.models.attention import dot_product_attention
from jaxtune.models.layers import (
    Embed,
    Linear,
    RMSNorm,
    apply_rope,
    rope_cos_sin,
    rope_inv_freq,
    token_blocked,
)
from jaxtune.models.llama import DecoderLM, causal_layout, run_layers

ACTIVATIONS = {
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


@dataclass(frozen=True)
class GemmaConfig:
    """Architecture of a Gemma 1/2/3 decoder (hashable: it is static under jit).

    ``rope_scaling`` (hashable pairs, as in :class:`LlamaConfig`) applies to global
    layers. ``rope_local_theta`` (Gemma 3) is the RoPE base of layers with a sliding
    window; None = every layer uses ``rope_theta``. ``layer_windows`` gives a per-layer
    window (0 = global); when None every layer uses ``sliding_window`` (None = global).
    """

    vocab_size: int = 256000
    hidden_size: int = 2048
    intermediate_size: int = 16384
    num_layers: int = 18
    num_heads: int = 8
    num_kv_heads: int = 1
    head_dim: int = 256
    hidden_act: str = "gelu_tanh"
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, object], ...] | None = None
    rope_local_theta: float | None = None
    rms_norm_eps: float = 1e-6
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    sandwich_norms: bool = False
    qk_norm: bool = False
    attention_bias: bool = False
    sliding_window: int | None = None
    layer_windows: tuple[int, ...] | None = None
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 8192
    bos_token_id: int | None = 2
    eos_token_id: int | tuple[int, ...] | None = 1
    pad_token_id: int | None = 0
    # Execution options (not architecture): safe to change after loading.
    scan_layers: bool = True
    remat: str = "none"
    attention_impl: str = "auto"
    mlp_chunks: int = 1
    family: str = "gemma"

    def replace(self, **kw) -> GemmaConfig:
        return dataclasses.replace(self, **kw)

    @property
    def windows(self) -> tuple[int, ...]:
        """Per-layer sliding window sizes (0 = global attention)."""
        if self.layer_windows is not None:
            return tuple(self.layer_windows)
        return (self.sliding_window or 0,) * self.num_layers

    @property
    def rope_ids(self) -> tuple[int, ...] | None:
        """Per-layer RoPE table (0 = global base, 1 = local base), None if all global."""
        if self.rope_local_theta is None:
            return None
        return tuple(1 if w > 0 else 0 for w in self.windows)

    @property
    def rope_scaling_dict(self) -> dict | None:
        return dict(self.rope_scaling) if self.rope_scaling else None

    @property
    def attn_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    # ---- presets (published architectures; weights come from HF/GGUF files) ----
    @classmethod
    def tiny(cls, **kw) -> GemmaConfig:
        base = dict(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_layers=2,
            num_heads=4,
            num_kv_heads=1,
            head_dim=16,
            max_position_embeddings=256,
        )
        return cls(**{**base, **kw})

    @classmethod
    def gemma_2b(cls, **kw) -> GemmaConfig:
        return cls(**kw)

    @classmethod
    def gemma2_2b(cls, **kw) -> GemmaConfig:
        base = dict(
            hidden_size=2304,
            intermediate_size=9216,
            num_layers=26,
            num_heads=8,
            num_kv_heads=4,
            query_pre_attn_scalar=256,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
            sandwich_norms=True,
            layer_windows=alternating(26, 4096, every=2),
            sliding_window=4096,
            family="gemma2",
        )
        return cls(**{**base, **kw})

    @classmethod
    def gemma2_9b(cls, **kw) -> GemmaConfig:
        base = dict(
            hidden_size=3584,
            intermediate_size=14336,
            num_layers=42,
            num_heads=16,
            num_kv_heads=8,
            layer_windows=alternating(42, 4096, every=2),
        )
        return cls.gemma2_2b(**{**base, **kw})

    @classmethod
    def gemma3_270m(cls, **kw) -> GemmaConfig:
        base = dict(
            vocab_size=262144,
            hidden_size=640,
            intermediate_size=2048,
            num_layers=18,
            num_heads=4,
            num_kv_heads=1,
            rope_theta=1000000.0,
            rope_local_theta=10000.0,
            query_pre_attn_scalar=256,
            sandwich_norms=True,
            qk_norm=True,
            sliding_window=512,
            layer_windows=alternating(18, 512, every=6),
            max_position_embeddings=32768,
            family="gemma3_text",
        )
        return cls(**{**base, **kw})


def alternating(num_layers: int, window: int, every: int) -> tuple[int, ...]:
    """Windows where every ``every``-th layer (1-based) is global, the rest local.

    Gemma 2: ``every=2`` (local, global, ...); Gemma 3: ``every=6`` (5 local : 1 global).
    """
    return tuple(0 if (i + 1) % every == 0 else window for i in range(num_layers))


class Attention(nnx.Module):
    def __init__(self, cfg: GemmaConfig, lead, dtype, rngs):
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        lin = dict(use_bias=cfg.attention_bias, lead=lead, dtype=dtype, rngs=rngs)
        self.q_proj = Linear(d, n * h, ("embed", "heads"), **lin)
        self.k_proj = Linear(d, k * h, ("embed", "kv_heads"), **lin)
        self.v_proj = Linear(d, k * h, ("embed", "kv_heads"), **lin)
        self.o_proj = Linear(n * h, d, ("heads", "embed"), **lin)
        if cfg.qk_norm:
            norm = dict(eps=cfg.rms_norm_eps, unit_offset=True, lead=lead, dtype=dtype, rngs=rngs)
            self.q_norm = RMSNorm(h, **norm)
            self.k_norm = RMSNorm(h, **norm)
        self.cfg = cfg

    def __call__(self, x, cos, sin, mask, kv=None, cache_index=None, rngs=None):
        """x: [B, T, D] -> ([B, T, D], (k, v) cache [B, S, K, H] each, or None)."""
        cfg = self.cfg
        b, t, _ = x.shape
        r = rngs if rngs is not None else (None,) * 4
        q = self.q_proj(x, r[0]).reshape(b, t, cfg.num_heads, cfg.head_dim)
        k = self.k_proj(x, r[1]).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        v = self.v_proj(x, r[2]).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:  # per head, before RoPE (as HF Gemma 3)
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
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
        out = dot_product_attention(
            q,
            k,
            v,
            mask,
            scale=cfg.attn_scale,
            softcap=cfg.attn_logit_softcapping,
            implementation=cfg.attention_impl,
            causal=kv is None,
        )
        return self.o_proj(out.reshape(b, t, -1), r[3]), kv


class MLP(nnx.Module):
    def __init__(self, cfg: GemmaConfig, lead, dtype, rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        lin = dict(lead=lead, dtype=dtype, rngs=rngs)
        self.gate_proj = Linear(d, f, ("embed", "mlp"), **lin)
        self.up_proj = Linear(d, f, ("embed", "mlp"), **lin)
        self.down_proj = Linear(f, d, ("mlp", "embed"), **lin)
        self.act = cfg.hidden_act
        self.blocks = cfg.mlp_chunks

    def __call__(self, x, rngs=None):
        """GeGLU. x: [B, T, D] -> [B, T, D]."""
        return token_blocked(self._geglu, x, self.blocks, rngs)

    def _geglu(self, x, rngs):
        r = rngs if rngs is not None else (None,) * 3
        gate = ACTIVATIONS[self.act](self.gate_proj(x, r[0]))
        return self.down_proj(gate * self.up_proj(x, r[1]), r[2])


class Block(nnx.Module):
    """Gemma decoder layer; optional bottleneck adapters after attention / MLP.

    Module names follow HF so one key table serves all three versions: in Gemma 1
    ``post_attn_norm`` is the pre-MLP norm (HF's ``post_attention_layernorm``); with
    ``sandwich_norms`` it normalises the attention output and ``pre_mlp_norm`` /
    ``post_mlp_norm`` wrap the MLP.
    """

    def __init__(self, cfg: GemmaConfig, lead=(), dtype=jnp.float32, rngs=None):
        norm = dict(eps=cfg.rms_norm_eps, unit_offset=True, lead=lead, dtype=dtype, rngs=rngs)
        self.input_norm = RMSNorm(cfg.hidden_size, **norm)
        self.attn = Attention(cfg, lead, dtype, rngs)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, **norm)
        if cfg.sandwich_norms:
            self.pre_mlp_norm = RMSNorm(cfg.hidden_size, **norm)
            self.post_mlp_norm = RMSNorm(cfg.hidden_size, **norm)
        self.mlp = MLP(cfg, lead, dtype, rngs)
        self.sandwich = cfg.sandwich_norms
        # Set by jaxtune.peft.adapters (identity at init). Declared as data, not static,
        # so adapter modules can be assigned into the slots later.
        self.attn_adapter = nnx.data(None)
        self.mlp_adapter = nnx.data(None)

    def __call__(self, x, cos, sin, mask, kv=None, cache_index=None, rng=None):
        """x: [B, T, D] -> ([B, T, D], updated kv or None)."""
        # 4 attention + 3 MLP projections + 2 adapters, each with its own dropout key.
        rngs = tuple(jax.random.split(rng, 9)) if rng is not None else None
        h, kv = self.attn(self.input_norm(x), cos, sin, mask, kv, cache_index, rngs and rngs[:4])
        if self.sandwich:
            h = self.post_attn_norm(h)
        # Adapters see the sublayer's final output, just before the residual add.
        if self.attn_adapter is not None:
            h = self.attn_adapter(h, rngs and rngs[7])
        x = x + h
        if self.sandwich:
            h = self.post_mlp_norm(self.mlp(self.pre_mlp_norm(x), rngs and rngs[4:7]))
        else:
            h = self.mlp(self.post_attn_norm(x), rngs and rngs[4:7])
        if self.mlp_adapter is not None:
            h = self.mlp_adapter(h, rngs and rngs[8])
        return x + h, kv


class GemmaForCausalLM(DecoderLM, nnx.Module):
    """Decoder-only LM. ``model(input_ids, attention_mask=None) -> logits [B, T, V]``."""

    config_class = GemmaConfig

    def __init__(self, cfg: GemmaConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        self.config = cfg
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs)
        if cfg.scan_layers:
            self.layers = Block(cfg, lead=(cfg.num_layers,), dtype=dtype, rngs=rngs)
        else:
            self.layers = nnx.List(
                [Block(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_layers)]
            )
        self.norm = RMSNorm(
            cfg.hidden_size, eps=cfg.rms_norm_eps, unit_offset=True, dtype=dtype, rngs=rngs
        )
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else Linear(cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), dtype=dtype, rngs=rngs)
        )
        self.compute_dtype = None

    def _rope(self, positions):
        """(cos, sin) [B, T, H], or stacks [2, B, T, H] (global, local) for Gemma 3."""
        cfg = self.config
        cos, sin = rope_cos_sin(
            positions, rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_dict)
        )
        if cfg.rope_ids is None:
            return cos, sin
        cos_l, sin_l = rope_cos_sin(positions, rope_inv_freq(cfg.head_dim, cfg.rope_local_theta))
        return jnp.stack([cos, cos_l]), jnp.stack([sin, sin_l])

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
          positions: int [B, T] RoPE positions; default ``cache_index + arange(T)``.
          segment_ids: int [B, T] packed-example ids (attention stays inside one).
          cache: ``{"k", "v"}`` each [L, B, S, K, H] (see ``init_cache``).
          cache_index: slot where these T tokens are written in the cache.
          rng: dropout key (LoRA dropout); None = deterministic.

        Returns:
          [B, T, D], or ([B, T, D], new cache) when a cache is given.
        """
        cfg = self.config
        dtype = self.compute_dtype or self.embed_tokens.embedding.dtype
        # HF multiplies by sqrt(D) already rounded to the compute dtype (bf16: 48.0 for
        # D=2304 but 55.5 for D=3072); doing the same keeps low-precision parity.
        x = self.embed_tokens(input_ids, dtype) * jnp.asarray(math.sqrt(cfg.hidden_size), dtype)
        q_index, mask_fn = causal_layout(input_ids, attention_mask, segment_ids, cache, cache_index)
        if positions is None:
            positions = q_index
        cos, sin = self._rope(positions)
        rope_ids = None if cfg.rope_ids is None else jnp.asarray(cfg.rope_ids, jnp.int32)
        x, cache = run_layers(
            self.layers, cfg, x, cos, sin, mask_fn, cache, cache_index, rng, rope_ids=rope_ids
        )
        x = self.norm(x)
        return x if cache is None else (x, cache)

    def cap_logits(self, logits: jax.Array) -> jax.Array:
        """Gemma 2's final soft-capping of the logits (identity when not configured)."""
        cap = self.config.final_logit_softcapping
        return jnp.tanh(logits / cap) * cap if cap else logits
