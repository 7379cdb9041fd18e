"""Batched generation with a KV cache: one jit-compiled prefill + ``while_loop`` decode.

Prompts are left-padded to a bucketed length so every row's next token lands in the
same cache slot; RoPE positions come from the attention mask (``cumsum - 1``), so
padding never shifts a prompt's positions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@dataclass(frozen=True)
class SamplingConfig:
    """Decoding options. ``temperature == 0`` is greedy."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0


def sample_logits(logits: jax.Array, key: jax.Array, temperature: float, top_k: int, top_p: float):
    """logits: float [B, V] -> token ids int32 [B]."""
    if temperature <= 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    neg = jnp.finfo(logits.dtype).min
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        cum_before = jnp.cumsum(probs, axis=-1) - probs
        drop_sorted = cum_before >= top_p
        drop = (
            jnp.zeros_like(drop_sorted)
            .at[jnp.arange(logits.shape[0])[:, None], order]
            .set(drop_sorted)
        )
        logits = jnp.where(drop, neg, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@partial(jax.jit, static_argnames=("graphdef", "max_new", "temperature", "top_k", "top_p"))
def _generate(graphdef, state, ids, mask, eos_ids, key, *, max_new, temperature, top_k, top_p):
    model = nnx.merge(graphdef, state)
    b, p = ids.shape
    s = p + max_new
    cache = model.init_cache(b, s)
    full_mask = jnp.concatenate([mask, jnp.ones((b, max_new), mask.dtype)], axis=1)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
    logits, cache = model(ids, full_mask, positions=positions, cache=cache, cache_index=0)
    last_pos = positions[:, -1]
    key, sub = jax.random.split(key)
    tok = sample_logits(logits[:, -1], sub, temperature, top_k, top_p)
    out = jnp.zeros((b, max_new), jnp.int32).at[:, 0].set(tok)
    done = jnp.isin(tok, eos_ids)

    def cond(carry):
        i, _, _, _, done, _ = carry
        return (i < max_new) & ~jnp.all(done)

    def body(carry):
        i, tok, cache, out, done, key = carry
        pos = (last_pos + i)[:, None]
        logits, cache = model(
            tok[:, None], full_mask, positions=pos, cache=cache, cache_index=p + i - 1
        )
        key, sub = jax.random.split(key)
        nxt = sample_logits(logits[:, -1], sub, temperature, top_k, top_p)
        nxt = jnp.where(done, 0, nxt)
        out = out.at[:, i].set(nxt)
        done = done | jnp.isin(nxt, eos_ids)
        return i + 1, nxt, cache, out, done, key

    n, _, _, out, done, _ = jax.lax.while_loop(
        cond, body, (jnp.int32(1), tok, cache, out, done, key)
    )
    return out, n


def eos_token_ids(model, tokenizer) -> list[int]:
    ids = set()
    cfg_eos = getattr(model.config, "eos_token_id", None)
    if isinstance(cfg_eos, int):
        ids.add(cfg_eos)
    elif cfg_eos:
        ids.update(cfg_eos)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids) or [-1]


def generate_ids(
    model,
    prompt_ids: list[list[int]],
    eos_ids: list[int],
    sampling: SamplingConfig,
    pad_id: int = 0,
):
    """Generates continuations of token-id prompts.

    Args:
      prompt_ids: B lists of token ids.
      eos_ids: ids that end a sequence (not included in the output).

    Returns:
      (list of B generated id lists, stats dict with ``tokens_per_sec``).
    """
    b = len(prompt_ids)
    p = max(len(x) for x in prompt_ids)
    p = -(-p // 8) * 8  # bucket: bounded number of compiled prompt lengths
    ids = np.full((b, p), pad_id, np.int32)
    mask = np.zeros((b, p), np.int32)
    for i, row in enumerate(prompt_ids):
        ids[i, p - len(row) :] = row
        mask[i, p - len(row) :] = 1
    graphdef, state = nnx.split(model)
    t0 = time.perf_counter()
    out, n = _generate(
        graphdef,
        state,
        jnp.asarray(ids),
        jnp.asarray(mask),
        jnp.asarray(eos_ids, jnp.int32),
        jax.random.key(sampling.seed),
        max_new=sampling.max_new_tokens,
        temperature=float(sampling.temperature),
        top_k=int(sampling.top_k),
        top_p=float(sampling.top_p),
    )
    out = np.asarray(out)
    elapsed = time.perf_counter() - t0
    results = []
    for row in out[:, : int(n)]:
        toks = []
        for t in row.tolist():
            if t in eos_ids:
                break
            toks.append(t)
        results.append(toks)
    produced = sum(len(r) for r in results)
    return results, {
        "tokens": produced,
        "seconds": elapsed,
        "tokens_per_sec": produced / max(elapsed, 1e-9),
    }


def render_prompt(tokenizer, prompt: str, chat: bool, system: str | None = None) -> list[int]:
    """Token ids of a prompt, through the chat template when ``chat``."""
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            from jaxtune.errors import ConfigError

            raise ConfigError("--chat given, but the tokenizer has no chat template")
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}
        ]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]


def generate_text(
    model, tokenizer, prompts: list[str], sampling: SamplingConfig, *, chat=False, stop=()
):
    """Generates text for each prompt; cuts at the first stop string.

    Returns:
      (list of B strings, stats dict).
    """
    prompt_ids = [render_prompt(tokenizer, p, chat) for p in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    outs, stats = generate_ids(model, prompt_ids, eos_token_ids(model, tokenizer), sampling, pad)
    texts = []
    for ids in outs:
        text = tokenizer.decode(ids, skip_special_tokens=True)
        for s in stop:
            if s and s in text:
                text = text[: text.index(s)]
        texts.append(text)
    return texts, stats
