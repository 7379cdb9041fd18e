"""Batched generation with a KV cache: a jit-compiled prefill, then ``while_loop`` decoding.

Prompts are left-padded to a bucketed length so every row's next token lands in the
same cache slot; RoPE positions come from the attention mask (``cumsum - 1``), so
padding never shifts a prompt's positions (the tests check equality with step-by-step
decoding without a cache and with transformers' ``generate``).

Decoding runs on the device until every row has produced an EOS or ``max_new_tokens``.
With stop strings it runs in chunks of ``chunk`` tokens: between chunks the host decodes
the rows and marks those whose text contains a stop string as done, so generation ends
early instead of always running to the token limit. The cache and the other loop state
are donated between chunks (no copies).

Every row ends with a finish reason: ``eos``, ``stop`` (a stop string) or ``length``
(hit ``max_new_tokens``: a possibly truncated answer).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtune.data.encoding import bos_prefix
from jaxtune.errors import ConfigError


@dataclass(frozen=True)
class SamplingConfig:
    """Decoding options. ``temperature == 0`` is greedy; top-k then top-p filter samples."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def check(self) -> SamplingConfig:
        """Returns self; raises ConfigError naming the option (as its CLI flag) if invalid."""
        rules = (
            ("--max-new-tokens", self.max_new_tokens, self.max_new_tokens >= 1, "an integer >= 1"),
            ("--temperature", self.temperature, self.temperature >= 0, "a number >= 0 (0: greedy)"),
            ("--top-k", self.top_k, self.top_k >= 0, "an integer >= 0 (0: off)"),
            ("--top-p", self.top_p, 0 < self.top_p <= 1, "a number in (0, 1] (1: off)"),
        )
        for flag, value, ok, expected in rules:
            if not ok:  # also refuses NaN
                raise ConfigError(f"{flag}: got {value}, expected {expected}")
        return self


def sample_logits(logits: jax.Array, key: jax.Array, temperature, top_k, top_p) -> jax.Array:
    """Samples one token per row: float [B, V] -> int32 [B].

    ``key`` is one key, or one per row ([B]). ``temperature``, ``top_k`` and ``top_p``
    may be traced scalars, so changing them never recompiles. ``temperature <= 0`` is greedy (the sampling branch is skipped at
    run time by ``lax.cond``). Top-k then top-p (nucleus: the smallest set of most likely
    tokens whose probability reaches ``top_p``; the most likely token always stays) are
    applied as logit thresholds computed on the sorted logits.
    """
    temperature = jnp.asarray(temperature, jnp.float32)
    top_k = jnp.asarray(top_k, jnp.int32)
    top_p = jnp.asarray(top_p, jnp.float32)

    def greedy(_):
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sample(_):
        x = logits.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)
        neg = jnp.finfo(jnp.float32).min
        desc = -jnp.sort(-x, axis=-1)
        v = x.shape[-1]
        k = jnp.where(top_k > 0, jnp.clip(top_k, 1, v), v)
        kth = jax.lax.dynamic_slice_in_dim(desc, k - 1, 1, axis=1)  # [B, 1]
        desc = jnp.where(desc < kth, neg, desc)
        probs = jax.nn.softmax(desc, axis=-1)
        cum_before = jnp.cumsum(probs, axis=-1) - probs
        keep = (cum_before < top_p) | (top_p >= 1.0)
        thresh = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
        x = jnp.where((x < kth) | (x < thresh), neg, x)
        if key.ndim:  # one key per row: a row's draws do not depend on the rest of the batch
            return jax.vmap(jax.random.categorical)(key, x).astype(jnp.int32)
        return jax.random.categorical(key, x, axis=-1).astype(jnp.int32)

    return jax.lax.cond(temperature > 0, sample, greedy, None)


def _split(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(next key, key for this draw) of one key or of each of a row of keys."""
    if key.ndim:
        pair = jax.vmap(jax.random.split)(key)
        return pair[:, 0], pair[:, 1]
    key, sub = jax.random.split(key)
    return key, sub


@partial(jax.jit, static_argnames=("graphdef", "max_new"))
def _prefill(graphdef, state, ids, mask, eos_ids, key, temperature, top_k, top_p, *, max_new):
    """Runs the prompts [B, P] into a fresh cache and samples the first new token.

    Returns the decode carry: ``i`` (tokens produced), ``tok`` [B], ``cache``, ``out``
    [B, max_new], ``done`` [B], ``key``, ``mask`` [B, P + max_new], ``last_pos`` [B].
    """
    model = nnx.merge(graphdef, state)
    b, p = ids.shape
    cache = model.init_cache(b, p + max_new)
    full_mask = jnp.concatenate([mask, jnp.ones((b, max_new), mask.dtype)], axis=1)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
    h, cache = model.hidden_states(ids, full_mask, positions=positions, cache=cache, cache_index=0)
    # Only the last position's logits are needed: skip the vocabulary projection of the rest.
    logits = model.logits_from_hidden(h[:, -1:])[:, 0]
    key, sub = _split(key)
    tok = sample_logits(logits, sub, temperature, top_k, top_p)
    return {
        "i": jnp.int32(1),
        "tok": tok,
        "cache": cache,
        "out": jnp.zeros((b, max_new), jnp.int32).at[:, 0].set(tok),
        "done": jnp.isin(tok, eos_ids),
        "key": key,
        "mask": full_mask,
        "last_pos": positions[:, -1],
    }


@partial(jax.jit, static_argnames=("graphdef", "steps"), donate_argnames=("carry",))
def _decode(graphdef, state, carry, eos_ids, temperature, top_k, top_p, *, steps):
    """Decodes up to ``steps`` more tokens (fewer if every row is done)."""
    model = nnx.merge(graphdef, state)
    max_new = carry["out"].shape[1]
    p = carry["mask"].shape[1] - max_new
    stop_at = jnp.minimum(carry["i"] + steps, max_new)

    def cond(c):
        return (c["i"] < stop_at) & ~jnp.all(c["done"])

    def body(c):
        i = c["i"]
        pos = (c["last_pos"] + i)[:, None]
        logits, cache = model(
            c["tok"][:, None], c["mask"], positions=pos, cache=c["cache"], cache_index=p + i - 1
        )
        key, sub = _split(c["key"])
        nxt = sample_logits(logits[:, -1], sub, temperature, top_k, top_p)
        nxt = jnp.where(c["done"], 0, nxt)
        return {
            **c,
            "i": i + 1,
            "tok": nxt,
            "cache": cache,
            "out": c["out"].at[:, i].set(nxt),
            "done": c["done"] | jnp.isin(nxt, eos_ids),
            "key": key,
        }

    return jax.lax.while_loop(cond, body, carry)


def eos_token_ids(model, tokenizer) -> list[int]:
    """Ids that end generation: the model config's EOS id(s) and the tokenizer's."""
    ids = set()
    cfg_eos = getattr(model.config, "eos_token_id", None)
    if isinstance(cfg_eos, int):
        ids.add(cfg_eos)
    elif cfg_eos:
        ids.update(cfg_eos)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids) or [-1]


def _cut(row: Sequence[int], eos: set[int]) -> tuple[list[int], bool]:
    toks = []
    for t in row:
        if t in eos:
            return toks, True
        toks.append(t)
    return toks, False


def generate_ids(
    model,
    prompt_ids: list[list[int]],
    eos_ids: list[int],
    sampling: SamplingConfig,
    pad_id: int = 0,
    *,
    stop_fn: Callable[[list[int]], bool] | None = None,
    chunk: int = 16,
    row_seeds: Sequence[int] | None = None,
    bucket: int = 8,
):
    """Generates continuations of token-id prompts.

    Args:
      prompt_ids: B lists of token ids.
      eos_ids: ids that end a sequence (not included in the output).
      sampling: decoding options.
      pad_id: left-padding id (masked).
      stop_fn: ``stop_fn(generated ids) -> bool``, checked on the host every ``chunk``
        tokens; True ends that row (finish reason ``stop``). None decodes in one call.
      chunk: tokens per device call when ``stop_fn`` is given.
      row_seeds: B seeds, one random stream per row instead of ``sampling.seed`` for the
        batch: a row's sample then does not depend on which rows share its batch.
      bucket: prompts are left-padded to a multiple of this many tokens (each padded
        length compiles once).

    Returns:
      (B generated id lists, cut at EOS; stats ``{"tokens", "seconds", "tokens_per_sec",
      "prefill_seconds", "finish_reasons" [B], "token_counts" [B]}``). ``seconds``
      includes compilation on the first call of a shape.
    """
    sampling.check()
    for i, row in enumerate(prompt_ids):
        if not len(row):
            raise ConfigError(
                f"prompt {i + 1} is empty (it encodes to no tokens, nothing to continue "
                "from); give it some text"
            )
    b = len(prompt_ids)
    p = max(len(x) for x in prompt_ids)
    p = -(-p // bucket) * bucket  # bounded number of compiled prompt lengths
    ids = np.full((b, p), pad_id, np.int32)
    mask = np.zeros((b, p), np.int32)
    for i, row in enumerate(prompt_ids):
        ids[i, p - len(row) :] = row
        mask[i, p - len(row) :] = 1
    graphdef, state = nnx.split(model)
    # Traced, not static: new sampling settings reuse the compiled functions.
    knobs = (
        jnp.float32(sampling.temperature),
        jnp.int32(sampling.top_k),
        jnp.float32(sampling.top_p),
    )
    eos_arr = jnp.asarray(eos_ids, jnp.int32)
    max_new = int(sampling.max_new_tokens)
    t0 = time.perf_counter()
    carry = _prefill(
        graphdef,
        state,
        jnp.asarray(ids),
        jnp.asarray(mask),
        eos_arr,
        _keys(sampling.seed, row_seeds, b),
        *knobs,
        max_new=max_new,
    )
    jax.block_until_ready(carry["tok"])
    prefill_s = time.perf_counter() - t0
    eos, stopped = set(eos_ids), np.zeros(b, bool)
    steps = max_new if stop_fn is None else max(1, int(chunk))
    while True:
        carry = _decode(graphdef, state, carry, eos_arr, *knobs, steps=steps)
        n = int(carry["i"])
        done = np.array(carry["done"])
        if stop_fn is not None and n < max_new and not done.all():
            out = np.asarray(carry["out"][:, :n])
            for r in np.flatnonzero(~done):
                if stop_fn(_cut(out[r].tolist(), eos)[0]):
                    stopped[r] = done[r] = True
            carry = {**carry, "done": jnp.asarray(done)}
        if n >= max_new or done.all():
            break
    out = np.asarray(carry["out"][:, :n])
    elapsed = time.perf_counter() - t0
    if stop_fn is not None:  # rows that reached a stop string in the final chunk
        for r in np.flatnonzero(~stopped):
            stopped[r] = stop_fn(_cut(out[r].tolist(), eos)[0])
    results, reasons = [], []
    for r, row in enumerate(out.tolist()):
        toks, hit_eos = _cut(row, eos)
        results.append(toks)
        reasons.append("stop" if stopped[r] else "eos" if hit_eos else "length")
    produced = sum(len(r) for r in results)
    return results, {
        "tokens": produced,
        "seconds": elapsed,
        "tokens_per_sec": produced / max(elapsed, 1e-9),
        "prefill_seconds": prefill_s,
        "finish_reasons": reasons,
        "token_counts": [len(r) for r in results],
    }


def _keys(seed: int, row_seeds: Sequence[int] | None, b: int) -> jax.Array:
    if row_seeds is None:
        return jax.random.key(seed)
    if len(row_seeds) != b:
        raise ValueError(f"row_seeds: got {len(row_seeds)} seeds for {b} prompts")
    return jax.vmap(jax.random.key)(jnp.asarray(row_seeds, jnp.uint32))


def render_prompt(tokenizer, prompt: str, chat: bool, system: str | None = None) -> list[int]:
    """Token ids of a prompt, through the chat template when ``chat``.

    The rendered template holds the role markers and usually BOS, so it is tokenized with
    ``add_special_tokens=False`` (never a doubled BOS); a template that writes no BOS
    (TinyLlama, Zephyr) gets the tokenizer's, exactly as training data is encoded.
    """
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("--chat given, but the tokenizer has no chat template")
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}
        ]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        bos = bos_prefix(tokenizer)
        return bos + ids if bos and ids[: len(bos)] != bos else ids
    return tokenizer(prompt)["input_ids"]


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Text before the earliest stop string, and whether one was found."""
    hits = [text.index(s) for s in stop if s and s in text]
    return (text[: min(hits)], True) if hits else (text, False)


def generate_text(
    model,
    tokenizer,
    prompts: list[str],
    sampling: SamplingConfig,
    *,
    chat=False,
    stop=(),
    system: str | None = None,
):
    """Generates text for each prompt; stops a row at EOS or at its first stop string.

    Args:
      prompts: B prompt strings.
      sampling: decoding options.
      chat: render each prompt as a user turn with the tokenizer's chat template.
      stop: stop strings; the returned text ends before the earliest one.
      system: system message for chat rendering.

    Returns:
      (B strings, stats as :func:`generate_ids`).
    """
    prompt_ids = [render_prompt(tokenizer, p, chat, system) for p in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    stop = [s for s in stop if s]
    stop_fn = None
    if stop:

        def stop_fn(ids):
            return cut_at_stop(tokenizer.decode(ids, skip_special_tokens=True), stop)[1]

    outs, stats = generate_ids(
        model, prompt_ids, eos_token_ids(model, tokenizer), sampling, pad, stop_fn=stop_fn
    )
    texts = [cut_at_stop(tokenizer.decode(ids, skip_special_tokens=True), stop)[0] for ids in outs]
    return texts, stats
