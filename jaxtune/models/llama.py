"""Llama-family decoder: Llama 2/3/3.1, Mistral, Qwen2, TinyLlama, SmolLM2.

The variants differ only by config flags: GQA/MQA/MHA via ``num_kv_heads``; llama3 /
linear RoPE scaling; Mistral / Qwen2 sliding windows (per layer, so a scanned stack
can mix local and global layers); Qwen2's q/k/v bias; tied embeddings (SmolLM2).

Layers are stacked and scanned by default (``scan_layers``): one compiled body,
compile time flat in depth. The forward pass is a pure function of parameters and
inputs; the KV cache is passed in and returned, never stored in the module.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxtune.models.attention import dot_product_attention
from jaxtune.models.layers import (
    Embed,
    Linear,
    RMSNorm,
    apply_rope,
    attention_mask,
    rope_cos_sin,
    rope_inv_freq,
    token_blocked,
)

# Name of each layer's input inside the rematerialised layer; "offload" keeps exactly
# what "full" keeps (one [B, T, D] input per layer), in host memory instead of HBM.
LAYER_INPUT = "layer_input"
REMAT_POLICIES = {
    "none": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
    "offload": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[],
        names_which_can_be_offloaded=[LAYER_INPUT],
        offload_src="device",
        offload_dst="pinned_host",
    ),
}


def named_layer_input(h: jax.Array) -> jax.Array:
    """h [B, T, D] unchanged, named for the ``offload`` remat policy. The name is on the
    first value inside the rematerialised layer: saving it (to the host) is what lets
    the backward pass recompute the layer without keeping its input on the device."""
    return checkpoint_name(h, LAYER_INPUT)


@dataclass(frozen=True)
class LlamaConfig:
    """Architecture of a Llama-family decoder (hashable: it is static under jit).

    ``rope_scaling`` is a tuple of ``(key, value)`` pairs (hashable form of HF's dict).
    ``layer_windows`` gives a per-layer sliding window (0 = global); when None every
    layer uses ``sliding_window`` (None = global).
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 128
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, object], ...] | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    layer_windows: tuple[int, ...] | None = None
    max_position_embeddings: int = 4096
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = None
    # Execution options (not architecture): safe to change after loading.
    scan_layers: bool = True
    remat: str = "none"
    attention_impl: str = "auto"
    mlp_chunks: int = 1
    family: str = "llama"

    def replace(self, **kw) -> LlamaConfig:
        return dataclasses.replace(self, **kw)

    @property
    def windows(self) -> tuple[int, ...]:
        """Per-layer sliding window sizes (0 = global attention)."""
        if self.layer_windows is not None:
            return tuple(self.layer_windows)
        return (self.sliding_window or 0,) * self.num_layers

    @property
    def rope_scaling_dict(self) -> dict | None:
        return dict(self.rope_scaling) if self.rope_scaling else None

    # ---- presets (published architectures; weights come from HF/GGUF files) ----
    @classmethod
    def tiny(cls, **kw) -> LlamaConfig:
        base = dict(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=16,
            max_position_embeddings=256,
        )
        return cls(**{**base, **kw})

    @classmethod
    def llama2_7b(cls, **kw) -> LlamaConfig:
        return cls(**{**dict(rms_norm_eps=1e-5), **kw})

    @classmethod
    def llama3_8b(cls, **kw) -> LlamaConfig:
        base = dict(
            vocab_size=128256,
            hidden_size=4096,
            intermediate_size=14336,
            num_layers=32,
            num_heads=32,
            num_kv_heads=8,
            head_dim=128,
            rope_theta=500000.0,
            rms_norm_eps=1e-5,
            max_position_embeddings=8192,
            bos_token_id=128000,
            eos_token_id=128001,
        )
        return cls(**{**base, **kw})

    @classmethod
    def llama31_8b(cls, **kw) -> LlamaConfig:
        scaling = (
            ("rope_type", "llama3"),
            ("factor", 8.0),
            ("low_freq_factor", 1.0),
            ("high_freq_factor", 4.0),
            ("original_max_position_embeddings", 8192),
        )
        return cls.llama3_8b(**{**dict(rope_scaling=scaling, max_position_embeddings=131072), **kw})

    @classmethod
    def mistral_7b(cls, **kw) -> LlamaConfig:
        base = dict(
            vocab_size=32768,
            intermediate_size=14336,
            num_kv_heads=8,
            rope_theta=1000000.0,
            rms_norm_eps=1e-5,
            max_position_embeddings=32768,
            family="mistral",
        )
        return cls(**{**base, **kw})

    @classmethod
    def tinyllama_1b(cls, **kw) -> LlamaConfig:
        base = dict(
            hidden_size=2048,
            intermediate_size=5632,
            num_layers=22,
            num_heads=32,
            num_kv_heads=4,
            head_dim=64,
            rms_norm_eps=1e-5,
            max_position_embeddings=2048,
        )
        return cls(**{**base, **kw})

    @classmethod
    def smollm2_135m(cls, **kw) -> LlamaConfig:
        base = dict(
            vocab_size=49152,
            hidden_size=576,
            intermediate_size=1536,
            num_layers=30,
            num_heads=9,
            num_kv_heads=3,
            head_dim=64,
            rope_theta=100000.0,
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
            max_position_embeddings=8192,
            bos_token_id=1,
            eos_token_id=2,
        )
        return cls(**{**base, **kw})

    @classmethod
    def qwen2_0_5b(cls, **kw) -> LlamaConfig:
        base = dict(
            vocab_size=151936,
            hidden_size=896,
            intermediate_size=4864,
            num_layers=24,
            num_heads=14,
            num_kv_heads=2,
            head_dim=64,
            rope_theta=1000000.0,
            qkv_bias=True,
            tie_word_embeddings=True,
            max_position_embeddings=32768,
            family="qwen2",
        )
        return cls(**{**base, **kw})

    @classmethod
    def qwen2_1_5b(cls, **kw) -> LlamaConfig:
        base = dict(
            hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12, head_dim=128
        )
        return cls.qwen2_0_5b(**{**base, **kw})


class Attention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, lead, dtype, rngs):
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        lin = dict(lead=lead, dtype=dtype, rngs=rngs)
        self.q_proj = Linear(d, n * h, ("embed", "heads"), use_bias=cfg.qkv_bias, **lin)
        self.k_proj = Linear(d, k * h, ("embed", "kv_heads"), use_bias=cfg.qkv_bias, **lin)
        self.v_proj = Linear(d, k * h, ("embed", "kv_heads"), use_bias=cfg.qkv_bias, **lin)
        self.o_proj = Linear(n * h, d, ("heads", "embed"), use_bias=cfg.o_bias, **lin)
        self.cfg = cfg

    def __call__(self, x, cos, sin, mask, kv=None, cache_index=None, rngs=None):
        """x: [B, T, D] -> ([B, T, D], (k, v) cache [B, S, K, H] each, or None)."""
        cfg = self.cfg
        b, t, _ = x.shape
        r = rngs if rngs is not None else (None,) * 4
        q = self.q_proj(x, r[0]).reshape(b, t, cfg.num_heads, cfg.head_dim)
        k = self.k_proj(x, r[1]).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        v = self.v_proj(x, r[2]).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
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
            scale=cfg.head_dim**-0.5,
            implementation=cfg.attention_impl,
            causal=kv is None,
        )
        return self.o_proj(out.reshape(b, t, -1), r[3]), kv


class MLP(nnx.Module):
    def __init__(self, cfg: LlamaConfig, lead, dtype, rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        lin = dict(use_bias=cfg.mlp_bias, lead=lead, dtype=dtype, rngs=rngs)
        self.gate_proj = Linear(d, f, ("embed", "mlp"), **lin)
        self.up_proj = Linear(d, f, ("embed", "mlp"), **lin)
        self.down_proj = Linear(f, d, ("mlp", "embed"), **lin)
        self.blocks = cfg.mlp_chunks

    def __call__(self, x, rngs=None):
        """SwiGLU. x: [B, T, D] -> [B, T, D]."""
        return token_blocked(self._swiglu, x, self.blocks, rngs)

    def _swiglu(self, x, rngs):
        r = rngs if rngs is not None else (None,) * 3
        return self.down_proj(jax.nn.silu(self.gate_proj(x, r[0])) * self.up_proj(x, r[1]), r[2])


class Block(nnx.Module):
    """Pre-norm decoder layer; optional bottleneck adapters after attention / MLP."""

    def __init__(self, cfg: LlamaConfig, lead=(), dtype=jnp.float32, rngs=None):
        norm = dict(eps=cfg.rms_norm_eps, lead=lead, dtype=dtype, rngs=rngs)
        self.input_norm = RMSNorm(cfg.hidden_size, **norm)
        self.attn = Attention(cfg, lead, dtype, rngs)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, **norm)
        self.mlp = MLP(cfg, lead, dtype, rngs)
        # Set by jaxtune.peft.adapters (identity at init). Declared as data, not static,
        # so adapter modules can be assigned into the slots later.
        self.attn_adapter = nnx.data(None)
        self.mlp_adapter = nnx.data(None)

    def __call__(self, x, cos, sin, mask, kv=None, cache_index=None, rng=None):
        """x: [B, T, D] -> ([B, T, D], updated kv or None)."""
        # 4 attention + 3 MLP projections + 2 adapters, each with its own dropout key.
        rngs = tuple(jax.random.split(rng, 9)) if rng is not None else None
        h, kv = self.attn(self.input_norm(x), cos, sin, mask, kv, cache_index, rngs and rngs[:4])
        if self.attn_adapter is not None:
            h = self.attn_adapter(h, rngs and rngs[7])
        x = x + h
        h = self.mlp(self.post_attn_norm(x), rngs and rngs[4:7])
        if self.mlp_adapter is not None:
            h = self.mlp_adapter(h, rngs and rngs[8])
        return x + h, kv


def run_layers(
    layers, cfg, x, cos, sin, mask_fn, cache=None, cache_index=None, rng=None, rope_ids=None
):
    """Applies every layer to x: [B, T, D], scanning over a stacked Block if scanned.

    Args:
      layers: a stacked ``Block`` (scan) or an ``nnx.List`` of Blocks.
      cos, sin: RoPE tables [B, T, H] shared by every layer; with ``rope_ids``, stacks
        [R, B, T, H] of R tables (None for families without RoPE).
      mask_fn: window -> bool mask [B, 1, T, S] (windows differ per layer).
      cache: optional dict ``{"k", "v"}`` of [L, B, S, K, H].
      rope_ids: optional int [L]: layer l uses table ``rope_ids[l]`` (Gemma 3 gives
        sliding-window layers their own RoPE base). Like the windows, a per-layer array
        passed through the scan, so one compiled body serves every layer.

    Returns:
      (x [B, T, D], new cache or None).
    """
    windows = jnp.asarray(cfg.windows, jnp.int32)
    n = cfg.num_layers
    keys = jax.random.split(rng, n) if rng is not None else None
    policy = REMAT_POLICIES[cfg.remat]

    def one_layer(block, h, window, rope_id, kv, key):
        c, s = (cos, sin) if rope_id is None else (cos[rope_id], sin[rope_id])
        return block(named_layer_input(h), c, s, mask_fn(window), kv, cache_index, key)

    if cfg.remat != "none":
        one_layer = nnx.remat(one_layer, policy=policy)

    if not cfg.scan_layers:
        new_k, new_v = [], []
        for i, block in enumerate(layers):
            kv = (cache["k"][i], cache["v"][i]) if cache is not None else None
            rope_id = None if rope_ids is None else rope_ids[i]
            x, kv = one_layer(block, x, windows[i], rope_id, kv, None if keys is None else keys[i])
            if kv is not None:
                new_k.append(kv[0])
                new_v.append(kv[1])
        new_cache = {"k": jnp.stack(new_k), "v": jnp.stack(new_v)} if cache is not None else None
        return x, new_cache

    graphdef, state = nnx.split(layers)

    def body(h, xs):
        layer_state, window, rope_id, kv, key = xs
        block = nnx.merge(graphdef, layer_state)
        h, kv = one_layer(block, h, window, rope_id, kv, key)
        return h, kv

    kv = (cache["k"], cache["v"]) if cache is not None else None
    x, kv = jax.lax.scan(body, x, (state, windows, rope_ids, kv, keys))
    return x, ({"k": kv[0], "v": kv[1]} if cache is not None else None)


def causal_layout(input_ids, attention_mask, segment_ids, cache, cache_index):
    """Token slots and the mask builder of one decoder forward pass (any family).

    Args:
      input_ids: int [B, T]; attention_mask: int [B, T] or, with a cache, [B, S].
      segment_ids: int [B, T] packed-example ids or None.
      cache: ``{"k": [L, B, S, ...], ...}`` or None; cache_index: first slot written.

    Returns:
      (q_index int [B, T]: each token's slot, also its default position;
       mask_fn: window -> bool mask [B, 1, T, S]).
    """
    b, t = input_ids.shape
    start = 0 if cache_index is None else cache_index
    q_index = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
    kv_valid = attention_mask
    if cache is None:
        kv_index = q_index
    else:
        s = cache["k"].shape[2]
        kv_index = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        filled = kv_index < start + t  # slots not written yet are not attended to
        kv_valid = filled if kv_valid is None else (kv_valid > 0) & filled

    def mask_fn(window):
        return attention_mask_for(q_index, kv_index, kv_valid, segment_ids, window)

    return q_index, mask_fn


class DecoderLM:
    """What every decoder-only LM here shares once ``hidden_states`` is written:
    logits (tied or separate head), ``__call__`` and the KV cache layout.
    Expects ``config``, ``embed_tokens``, ``lm_head`` and ``compute_dtype``.
    """

    cache_heads_attr = "num_kv_heads"  # config field: heads stored in the KV cache

    def cap_logits(self, logits: jax.Array) -> jax.Array:
        """Family-specific final transform of the float32 logits (identity here)."""
        return logits

    def logits_from_hidden(self, h: jax.Array) -> jax.Array:
        """h: [B, T, D] -> float32 logits [B, T, V]."""
        if self.lm_head is None:
            return self.cap_logits(self.embed_tokens.attend(h).astype(jnp.float32))
        return self.cap_logits(self.lm_head(h).astype(jnp.float32))

    def __call__(self, input_ids, attention_mask=None, **kw):
        """int [B, T] -> float32 logits [B, T, V] (and the new cache if one is given)."""
        out = self.hidden_states(input_ids, attention_mask, **kw)
        if isinstance(out, tuple):
            return self.logits_from_hidden(out[0]), out[1]
        return self.logits_from_hidden(out)

    def init_cache(self, batch: int, max_len: int, dtype=None) -> dict:
        """Zeroed KV cache ``{"k", "v"}``, each [L, B, max_len, K, H]."""
        cfg = self.config
        dtype = dtype or self.compute_dtype or self.embed_tokens.embedding.dtype
        heads = getattr(cfg, self.cache_heads_attr)
        shape = (cfg.num_layers, batch, max_len, heads, cfg.head_dim)
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


class LlamaForCausalLM(DecoderLM, nnx.Module):
    """Decoder-only LM. ``model(input_ids, attention_mask=None) -> logits [B, T, V]``."""

    config_class = LlamaConfig

    def __init__(self, cfg: LlamaConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        self.config = cfg
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs)
        if cfg.scan_layers:
            self.layers = Block(cfg, lead=(cfg.num_layers,), dtype=dtype, rngs=rngs)
        else:
            self.layers = nnx.List(
                [Block(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_layers)]
            )
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype, rngs=rngs)
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
        x = self.embed_tokens(input_ids, dtype)
        q_index, mask_fn = causal_layout(input_ids, attention_mask, segment_ids, cache, cache_index)
        if positions is None:
            positions = q_index
        cos, sin = rope_cos_sin(
            positions, rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_dict)
        )
        x, cache = run_layers(self.layers, cfg, x, cos, sin, mask_fn, cache, cache_index, rng)
        x = self.norm(x)
        return x if cache is None else (x, cache)


def attention_mask_for(q_index, kv_index, kv_valid, segment_ids, window):
    """Causal (+ padding, + segments, + window) mask [B, 1, T, S]."""
    seg_q = seg_k = None
    if segment_ids is not None and q_index.shape == kv_index.shape:
        seg_q = seg_k = segment_ids
    return attention_mask(q_index, kv_index, kv_valid, seg_q, seg_k, window)
