"""Checks of a run config against its model, made before anything is written.

``train.seq_len`` must fit the positions the model covers: past a learned table
(BERT, GPT-2, GPT-Neo) positions index nothing and losses turn NaN; past a RoPE model's
range attention sees angles it never saw in pre-training.
"""

from __future__ import annotations

from jaxtune.config import Config
from jaxtune.errors import ConfigError
from jaxtune.loading import model_kind
from jaxtune.resources import resolve_path
from jaxtune.train.plan import model_config


def position_limit(model_cfg) -> tuple[int | None, bool]:
    """(positions the model covers, whether they are learned) from its config.

    Learned position tables (BERT, GPT-2, GPT-Neo) have ``max_position_embeddings``
    rows. RoPE models cover ``max_position_embeddings``, or what ``rope_scaling``
    extends it to (``original_max_position_embeddings`` x ``factor``).
    """
    n = getattr(model_cfg, "max_position_embeddings", None)
    if not n:
        return None, False
    if not hasattr(model_cfg, "rope_theta"):
        return int(n), True
    scaling = dict(getattr(model_cfg, "rope_scaling", None) or ())
    factor = float(scaling.get("factor") or 1.0)
    original = int(scaling.get("original_max_position_embeddings") or n)
    return max(int(n), int(original * factor)), False


def check_positions(cfg: Config) -> None:
    """ConfigError when ``train.seq_len`` exceeds the model's position limit.

    Past a learned table, positions index nothing (NaN losses); past a RoPE model's
    range, attention sees angles it never saw. ``model.max_seq_len`` set explicitly
    lets a RoPE model be trained past its range on purpose (context extension).
    """
    if not cfg.model.path:
        raise ConfigError(
            "model.path is required (an HF dir, a .gguf file or a jaxtune checkpoint)"
        )
    model_kind(resolve_path(cfg.model.path))  # a missing path: one line, now
    limit, learned = position_limit(model_config(cfg))
    seq_len = cfg.train.seq_len
    if limit is None or seq_len <= limit:
        return
    if learned:
        raise ConfigError(
            f"train.seq_len={seq_len} exceeds the {limit} positions of {cfg.model.path} "
            f"(max_position_embeddings, a learned table): set train.seq_len <= {limit}"
        )
    if cfg.model.max_seq_len is None:
        raise ConfigError(
            f"train.seq_len={seq_len} exceeds the {limit} positions {cfg.model.path} "
            f"supports (max_position_embeddings / rope_scaling): set train.seq_len <= "
            f"{limit}, or model.max_seq_len={seq_len} to train past it on purpose"
        )
