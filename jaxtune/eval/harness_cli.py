"""``python -m jaxtune.eval.harness_cli ARGS``: lm-eval's own command line, ``--model jaxtune`` included.

lm-eval 0.4.13 resolves ``--model`` against its built-in list only (entry-point
discovery, group ``lm_eval.models``, came after it), so this runs lm-eval's console entry
(``lm_eval.__main__.cli_evaluate``, the function behind ``lm-eval``) after registering
jaxtune's backend. jaxtune's user errors (a bad path, an unknown model_args key) print
one ``error:`` line and exit 2 instead of a traceback.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Sequence

from jaxtune.errors import JaxtuneError

INSTALL_HINT = 'lm-evaluation-harness is not installed: pip install "jaxtune[lmeval]"'


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``lm-eval`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    if importlib.util.find_spec("lm_eval") is None:
        print(f"error: {INSTALL_HINT}", file=sys.stderr)
        return 2
    # The backend module imports lm_eval at its top: load it only once lm_eval is known
    # to be there (the extra is optional).
    importlib.import_module("jaxtune.eval.harness")
    cli = importlib.import_module("lm_eval.__main__")
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    try:
        cli.cli_evaluate()
    except JaxtuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
