"""How every command line of the project ends on bad input: one line on stderr and exit code 2.

A config, data set, checkpoint or recipe that cannot be used is the user's to fix, so it
gets a message naming the key, file or shape, never a traceback. Anything else is a bug
and keeps its traceback.
"""
from __future__ import annotations

import sys
from typing import Callable

from common.checkpoint import CheckpointError
from common.config import ConfigError
from common.data import DataError
from common.recipe import RecipeError
from common.spec import SpecError
from common.training import NonFiniteError, ProcessGroupError

EXIT_BAD_INPUT = 2

# What "the input cannot be used" means; a backend adds its own (a missing VAE, say).
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, DataError, CheckpointError, RecipeError, SpecError,
                                                NonFiniteError, ProcessGroupError)


def one_line(err: BaseException) -> str:
    """The error's message on one line (multi-line lists of problems are joined with '; ')."""
    text = str(err).strip() or type(err).__name__
    return "; ".join(part.strip() for part in text.splitlines() if part.strip())


def run_cli(main: Callable[[], object], extra_errors: tuple[type[BaseException], ...] = ()) -> None:
    """Call ``main()``; a user error becomes ``error: <message>`` on stderr and exit code 2."""
    try:
        main()
    except USER_ERRORS + extra_errors as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT) from None
    except OSError as err:  # a file that cannot be read or written: permissions, disk full, a folder
        where = f"{err.filename}: " if err.filename else ""
        print(f"error: {where}{err.strerror or err}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT) from None
