"""``jaxtune data generate``: synthetic instruction pairs from raw text (resumable)."""

from __future__ import annotations

from jaxtune.synth.filters import FilterConfig
from jaxtune.synth.generate import GenerateOptions, generate_data, summary_table


def options(args) -> GenerateOptions:
    """The parsed command line as :class:`GenerateOptions`."""
    return GenerateOptions(
        model=args.model,
        inputs=list(args.input),
        out=args.out,
        template=args.template,
        per_doc=args.per_doc,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        batch_size=args.batch_size,
        text_field=args.text_field,
        id_field=args.id_field,
        chunk_chars=args.chunk_chars,
        chat=not args.no_chat,
        dtype=args.dtype,
        max_docs=args.max_docs,
        filters=FilterConfig(
            max_chars=args.max_chars,
            max_repeat=args.max_repeat,
            near_dup_threshold=args.near_dup_threshold,
            require_support=args.require_support,
            min_support=args.min_support,
        ),
    )


def run(args) -> int:
    stats = generate_data(options(args))
    print(summary_table(stats))
    print(f"{stats['samples']['accepted']} pairs in {args.out} ({stats['seconds']:.0f} s in all)")
    return 0
