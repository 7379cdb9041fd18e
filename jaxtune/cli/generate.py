"""``jaxtune generate``: text from a model with a KV cache (greedy or sampled)."""

from __future__ import annotations

import sys

from jaxtune.errors import ConfigError
from jaxtune.eval.generate import SamplingConfig, generate_text
from jaxtune.loading import from_pretrained, load_tokenizer
from jaxtune.models import DTYPES


def run(args) -> int:
    # Every option is checked before a model is loaded.
    sampling = SamplingConfig(
        args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed
    ).check()
    if args.dtype not in DTYPES:
        raise ConfigError(f"--dtype: got {args.dtype!r}, expected one of {', '.join(DTYPES)}")
    model = from_pretrained(args.model, dtype=args.dtype)
    tokenizer = load_tokenizer(args.model)
    texts, stats = generate_text(
        model, tokenizer, args.prompt, sampling, chat=args.chat, stop=args.stop
    )
    for prompt, text in zip(args.prompt, texts, strict=True):
        if len(args.prompt) > 1:
            print(f"### {prompt}")
        print(text.strip())
    print(
        f"[{stats['tokens']} tokens, {stats['tokens_per_sec']:.1f} tokens/s incl. compile]",
        file=sys.stderr,
    )
    return 0
