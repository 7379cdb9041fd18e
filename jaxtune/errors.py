"""User-facing errors.

Anything a user can cause (a bad config, a missing file, a corrupt checkpoint) raises a
subclass of :class:`JaxtuneError`. The CLI prints its message on one line and exits with
``exit_code``; no traceback. Messages name the file, the field or line, and what was
expected.
"""

from __future__ import annotations


class JaxtuneError(Exception):
    """Base class for errors caused by user input (exit code 2)."""

    exit_code = 2


class ConfigError(JaxtuneError):
    """A config file, a CLI override, or a model ``config.json`` is invalid."""


class DataError(JaxtuneError):
    """A data file or row is malformed or does not fit the chosen format."""


class ModelLoadError(JaxtuneError):
    """A model directory, weights file or checkpoint cannot be loaded."""


class TrainingError(JaxtuneError):
    """Training cannot continue (NaN loss, diverged); exit code 1 since it is runtime."""

    exit_code = 1


class DiskFullError(JaxtuneError):
    """The disk filled up while writing (a checkpoint, the run directory); exit code 1
    since it is runtime: free space and re-run (the run resumes from its last complete
    checkpoint)."""

    exit_code = 1


class ExportError(JaxtuneError):
    """A written export does not reproduce the model (it is removed); exit code 1."""

    exit_code = 1
