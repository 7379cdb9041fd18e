"""The built-in training tasks and the lookup of a config's task; importing this package
registers them.

Adding a task: a module here with a :class:`~jaxtune.train.task.Task` subclass decorated
with :func:`~jaxtune.train.task.register`, and its import below (or, outside the
package, the module's import before training: ``register`` is all the loop needs).
"""

from __future__ import annotations

from jaxtune.config import Config
from jaxtune.errors import ConfigError
from jaxtune.train.task import TASKS, Task
from jaxtune.train.tasks import classification, lm, preference

__all__ = ["classification", "lm", "preference", "task_for", "task_name"]


def task_name(cfg: Config) -> str:
    """The task a config selects: ``classification`` for ``peft.head: classification``,
    else ``train.objective``."""
    return "classification" if cfg.peft.head == "classification" else cfg.train.objective


def task_for(cfg: Config) -> Task:
    """The registered task of ``cfg``; ConfigError naming the registered ones."""
    name = task_name(cfg)
    if name not in TASKS:
        raise ConfigError(
            f"train.objective: {name!r} is not a registered task (registered: "
            f"{', '.join(sorted(TASKS))})"
        )
    return TASKS[name](cfg)
