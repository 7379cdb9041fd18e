"""``jaxtune compare``: M models on one prompt set, every pair judged; win matrix, Elo
with bootstrap intervals and a side-by-side page (see :mod:`jaxtune.eval.compare`)."""

from __future__ import annotations

from jaxtune.errors import ConfigError
from jaxtune.eval.compare import compare_models
from jaxtune.eval.compare_report import markdown
from jaxtune.eval.generate import SamplingConfig
from jaxtune.models import DTYPES


def run(args) -> int:
    # Every option is checked before a model is loaded.
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for name in ("max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            raise ConfigError(
                f"--{name.replace('_', '-')}: got {getattr(args, name)}, expected >= 1"
            )
    if args.dtype not in DTYPES:
        raise ConfigError(f"--dtype: got {args.dtype!r}, expected one of {', '.join(DTYPES)}")
    sampling = SamplingConfig(args.max_new_tokens, args.temperature, 0, 1.0, args.seed)
    results = compare_models(
        models,
        args.prompts,
        args.judge,
        args.out or "compare_out",
        sampling=sampling,
        chat=args.chat,
        judge_chat=args.judge_chat,
        stop=args.stop,
        bootstrap=args.bootstrap,
        seed=args.seed,
        template=args.judge_template,
        batch_size=args.batch_size,
        dtype=args.dtype,
        overwrite=args.overwrite,
    )
    print(markdown(results))
    print(f"wrote {', '.join(results['files'])}")
    return 0
