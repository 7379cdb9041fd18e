"""jaxtune as an lm-evaluation-harness backend: ``--model jaxtune``.

::

    pip install -e ".[lmeval]"
    lm-eval --model jaxtune --model_args pretrained=PATH_OR_RUN,dtype=float32,batch_size=32 \\
        --tasks arc_easy,hellaswag
    python -m jaxtune.eval.harness_cli --model jaxtune --model_args pretrained=... --tasks ...
    jaxtune eval --model PATH_OR_RUN --lm-eval arc_easy,hellaswag --out DIR

``PATH_OR_RUN`` is anything :func:`jaxtune.loading.from_pretrained` loads: an HF dir, a
``.gguf`` file, a ``pkg:`` path, a jaxtune checkpoint, or a run directory (latest
checkpoint with its adapters). The three request types reuse jaxtune's evaluator:

* ``loglikelihood``: lm-eval's own tokenization (``TemplateLM._encode_pair``), then the
  requests that share a context (the choices of one item) go to
  :func:`~jaxtune.eval.scoring.score_token_requests` together, so the context is run once
  into a KV cache and shared by its continuations;
* ``loglikelihood_rolling``: lm-eval's disjoint rolling windows of ``max_length`` tokens
  (``get_rolling_token_windows(..., context_len=1)``), each window one scored request;
* ``generate_until``: :func:`~jaxtune.eval.generate.generate_ids` (KV cache, greedy or
  ``do_sample`` + ``temperature``/``top_k``/``top_p``), stopping a row as soon as its text
  holds one of ``until``; the text is cut at the first stop sequence as lm-eval's ``hf``
  backend does.

Discovery: lm-eval releases after 0.4.13 load models from the ``lm_eval.models`` entry
point group, which jaxtune's package metadata declares. lm-eval 0.4.13 (the newest on
PyPI) only knows its built-in list, so there ``python -m jaxtune.eval.harness_cli ARGS`` is
``lm-eval ARGS`` with this backend registered (the way lm-eval's plugin guide documents
for modules that are not entry points: import, then run), and ``jaxtune eval --lm-eval``
calls ``lm_eval.simple_evaluate`` itself.

This module imports ``lm_eval`` at the top: only import it when the ``lmeval`` extra is
installed (``jaxtune`` and ``jaxtune.eval`` never import it). Neither ``lm_eval.api`` nor
this backend loads torch.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import jax

# lm-eval registers its built-in backends only while its registry is empty: importing
# lm_eval.models first keeps `--model hf` & co. resolvable once `jaxtune` is registered.
import lm_eval.models  # noqa: F401
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from lm_eval.utils import (
    get_rolling_token_windows,
    make_disjoint_window,
    simple_parse_args_string,
)
from tqdm import tqdm

from jaxtune.errors import ConfigError
from jaxtune.eval.generate import SamplingConfig, eos_token_ids, generate_ids
from jaxtune.eval.scoring import score_token_requests
from jaxtune.loading import from_pretrained, load_tokenizer
from jaxtune.models import DTYPES
from jaxtune.peft import has_adapters, has_lora, merged_copy
from jaxtune.sharding import make_mesh, variable_sharding

__all__ = ["MODEL_ARGS", "JaxtuneLM"]

# model_args keys, with what they mean (the error for an unknown key lists them).
MODEL_ARGS = {
    "pretrained": "HF dir, .gguf file, pkg: path, jaxtune checkpoint or run dir",
    "dtype": f"parameter dtype ({', '.join(DTYPES)}; default float32)",
    "batch_size": "(request, continuation) rows per forward pass (default 32)",
    "max_length": "token budget per sequence (default: the model's max positions, else 2048)",
    "max_gen_toks": "generate_until default max new tokens (default 256)",
    "add_bos_token": "prepend BOS when encoding (default: the tokenizer's own setting)",
    "seed": "sampling seed for do_sample generation (default 1234)",
    "tokenizer": "tokenizer path when it differs from pretrained",
    "fsdp": "shard the weights over this many devices (jaxtune's fsdp mesh axis; default 1)",
    "tensor": "tensor-parallel devices (jaxtune's tensor mesh axis; default 1)",
    "device": "accepted for lm-eval's --device; JAX picks the device",
    "max_batch_size": "accepted for lm-eval's --max_batch_size; unused",
    "trust_remote_code": "accepted for compatibility; never honoured (no remote code)",
}


def _as_bool(key: str, value) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise ConfigError(f"model_args {key}: got {value!r}, expected true or false")


def _as_int(key: str, value, default: int) -> int:
    if value is None or value == "auto":  # lm-eval's --batch_size auto: our default
        return default
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"model_args {key}: got {value!r}, expected a positive integer") from None
    if n <= 0:
        raise ConfigError(f"model_args {key}: got {value!r}, expected a positive integer")
    return n


@register_model("jaxtune")
class JaxtuneLM(TemplateLM):
    """An lm-eval ``LM`` over a jaxtune model (see the module docstring).

    Args:
      pretrained: model path (anything ``jaxtune.from_pretrained`` loads).
      dtype: parameter dtype name.
      batch_size: rows per forward pass for scoring, prompts per batch for generation.
      max_length: token budget per sequence (left truncation beyond it, as lm-eval does).
      max_gen_toks: default ``max_gen_toks`` of generation requests.
      add_bos_token: force BOS on (True) or off (False); None keeps the tokenizer's.
      seed: seed of sampled generation.
      tokenizer: tokenizer path, when not the model's own.
      **kwargs: ``fsdp`` / ``tensor``: load the weights sharded over a mesh of
        ``fsdp x tensor`` devices (a model larger than one device; the scorer and generator
        run unchanged, XLA partitions them). lm-eval's ``device`` / ``max_batch_size`` / ``trust_remote_code`` are
        accepted and unused; any other key is a :class:`ConfigError`.
    """

    def __init__(
        self,
        pretrained: str | None = None,
        dtype: str = "float32",
        batch_size: int | str | None = None,
        max_length: int | str | None = None,
        max_gen_toks: int | str = 256,
        add_bos_token: bool | str | None = None,
        seed: int | str = 1234,
        tokenizer: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__()
        unknown = sorted(set(kwargs) - set(MODEL_ARGS))
        if unknown:
            raise ConfigError(
                f"model_args: unknown key(s) {', '.join(unknown)}; jaxtune accepts "
                + ", ".join(MODEL_ARGS)
            )
        if not pretrained:
            raise ConfigError("model_args: pretrained=PATH is required (model path or run dir)")
        if dtype not in DTYPES:
            raise ConfigError(
                f"model_args dtype: got {dtype!r}, expected one of {', '.join(DTYPES)}"
            )
        self.batch_size = _as_int("batch_size", batch_size, 32)
        self.max_gen_toks = _as_int("max_gen_toks", max_gen_toks, 256)
        self.add_bos_token = _as_bool("add_bos_token", add_bos_token)
        try:
            self.seed = int(seed)
        except (TypeError, ValueError):
            raise ConfigError(f"model_args seed: got {seed!r}, expected an integer") from None
        self.pretrained = str(pretrained)
        fsdp = _as_int("fsdp", kwargs.get("fsdp"), 1)
        tensor = _as_int("tensor", kwargs.get("tensor"), 1)
        sharding = None
        if fsdp * tensor > 1:
            if fsdp * tensor > jax.device_count():
                raise ConfigError(
                    f"model_args fsdp x tensor = {fsdp * tensor}, but there are "
                    f"{jax.device_count()} devices"
                )
            mesh = make_mesh(1, fsdp, tensor, jax.devices()[: fsdp * tensor])
            sharding = variable_sharding(mesh)
        model = from_pretrained(self.pretrained, dtype=dtype, sharding=sharding)
        if has_lora(model) and not has_adapters(model):
            # Folding a run's LoRA factors in once is exact (merged == unmerged is tested)
            # and makes every scored forward pass cheaper.
            model = merged_copy(model)
        self.model = model
        self.tokenizer = load_tokenizer(tokenizer or self.pretrained)
        # lm-eval's hf backend defaults to the config's max positions (else 2048); the same
        # default keeps loglikelihood_rolling's windows, and so perplexities, comparable.
        positions = int(getattr(model.config, "max_position_embeddings", 0) or 2048)
        self._max_length = _as_int("max_length", max_length, positions)
        self._eos_ids = eos_token_ids(model, self.tokenizer)
        pad = self.tokenizer.pad_token_id
        self._pad_id = int(pad) if pad is not None else 0

    # ---------------------------------------------------------------- tokenizer facts

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        # BOS, else EOS: what lm-eval's hf backend conditions an empty context on.
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "") or self.pretrained).replace(
            "/", "__"
        )

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs
    ) -> list[int]:
        """Token ids of a string, special tokens as lm-eval's ``hf`` backend adds them."""
        if add_special_tokens is None:
            add_special_tokens = self.add_bos_token
            # A prompt that already starts with BOS (a chat template wrote it) gets no second.
            bos = self.tokenizer.decode([self.prefix_token_id])
            if bos and string.startswith(bos):
                add_special_tokens = False
        if add_special_tokens is None:
            return list(self.tokenizer.encode(string))
        return list(self.tokenizer.encode(string, add_special_tokens=add_special_tokens))

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """The chat history rendered by the tokenizer's chat template (a string)."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ConfigError(
                f"--apply_chat_template: the tokenizer of {self.pretrained} has no chat template"
            )
        return self.tokenizer.apply_chat_template(
            chat_history,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )

    # ---------------------------------------------------------------- scoring

    def _score(self, pairs: Sequence[tuple[list[int], list[int]]], disable_tqdm: bool):
        """(logprob, is_greedy) per (context ids, continuation ids) pair, in order.

        Pairs with equal context ids are one scorer request (one cached context pass).
        """
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (ctx, _) in enumerate(pairs):
            groups.setdefault(tuple(ctx), []).append(i)
        requests = [(list(ctx), [pairs[i][1] for i in rows]) for ctx, rows in groups.items()]
        bar = tqdm(total=len(requests), desc="jaxtune scoring", disable=disable_tqdm)

        def progress(done: int, total: int) -> None:
            bar.update(done - bar.n)

        # lm-eval's hf backend feeds the last max_length tokens of context + continuation
        # minus one as input: max_length + 1 tokens in all.
        scores = score_token_requests(
            self.model,
            requests,
            batch_size=self.batch_size,
            max_len=self.max_length + 1,
            pad_id=self._pad_id,
            progress=progress,
        )
        bar.close()
        out: list[tuple[float, bool] | None] = [None] * len(pairs)
        for rows, s in zip(groups.values(), scores, strict=True):
            for j, i in enumerate(rows):
                out[i] = (float(s.logprob[j]), bool(s.greedy[j]))
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """(logprob, is_greedy) per ``((context, continuation), context ids, cont ids)``."""
        out = self._score([(ctx, cont) for _, ctx, cont in requests], disable_tqdm)
        for (key, _, _), res in zip(requests, out, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Summed log-likelihood of each whole text over disjoint ``max_length`` windows."""
        windows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for ctx, cont in map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((ctx, cont))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (lp, _) in zip(owner, self._score(windows, disable_tqdm), strict=True):
            totals[i] += lp
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ---------------------------------------------------------------- generation

    def _sampling(self, kwargs: dict) -> SamplingConfig:
        sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
        top_k = int(kwargs.pop("top_k", 0) or 0)
        top_p = kwargs.pop("top_p", 1.0)
        return SamplingConfig(
            max_new_tokens=int(kwargs.pop("max_gen_toks")),
            temperature=temperature if sample else 0.0,
            top_k=top_k,
            top_p=1.0 if top_p is None else float(top_p),
            seed=self.seed,
        ).check()

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Generated text per ``(context, gen_kwargs)`` request, cut at ``until``."""
        eos = self.tokenizer.decode([self.eot_token_id])
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="jaxtune generate", disable=disable_tqdm)
        for rows in groups.values():
            gen_kwargs = dict(requests[rows[0]].args[1])
            kw = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            until = handle_stop_sequences(kw.pop("until", None), eos=eos)
            sampling = self._sampling(kw)
            room = self.max_length - sampling.max_new_tokens
            if room <= 0:
                raise ConfigError(
                    f"max_gen_toks {sampling.max_new_tokens} leaves no room for a prompt in "
                    f"max_length {self.max_length}"
                )
            encoded = {i: self.tok_encode(requests[i].args[0])[-room:] for i in rows}
            # Longest first: a batch holds prompts of similar length (less padding).
            order = sorted(rows, key=lambda i: -len(encoded[i]))

            def stop_fn(ids: list[int], until=until) -> bool:
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                return any(s and s in text for s in until)

            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                ids, _ = generate_ids(
                    self.model,
                    [encoded[i] for i in batch],
                    self._eos_ids,
                    sampling,
                    self._pad_id,
                    stop_fn=stop_fn,
                )
                for i, toks in zip(batch, ids, strict=True):
                    text = self.tokenizer.decode(toks, skip_special_tokens=True)
                    out[i] = postprocess_generated_text(text, until, None)
                    self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
                bar.update(len(batch))
        bar.close()
        return out  # type: ignore[return-value]

    # lm-eval passes its --batch_size (default 1) next to model_args; a batch_size in
    # model_args is the more specific of the two, so it wins instead of a duplicate-keyword
    # TypeError.
    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**{**extra, **arg_dict})
