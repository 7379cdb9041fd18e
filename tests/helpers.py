"""Helpers shared by several test files (test files never import each other).

pytest puts ``tests/`` on ``sys.path`` (rootdir-relative ``prepend`` import mode: the
test files are not a package), so tests ``import helpers``.
"""

from __future__ import annotations


def tensorboard_scalars(log_dir) -> dict[tuple[int, str], list[float]]:
    """``(step, tag) -> values`` of every scalar event in the event files of ``log_dir``,
    read by TensorBoard's own ``EventAccumulator``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0: keep all
    acc.Reload()
    out: dict[tuple[int, str], list[float]] = {}
    for tag in acc.Tags()["scalars"]:
        for event in acc.Scalars(tag):
            out.setdefault((event.step, tag), []).append(event.value)
    return out
