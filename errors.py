"""Errors the user can fix, and how a script turns them into one line and an exit code.

Every module raises a subclass of UserError for bad input (a flag, a file, a data set); ``run_main``
in each script prints it as ``error: ...`` and exits with its code (2 for misuse). Nothing here
imports the rest of the project, so the lowest modules can raise these.
"""
from __future__ import annotations

import sys


class UserError(ValueError):
    """Bad input from the user (a flag, a file, a data set): the scripts print it and exit with code 2.

    Checkpoint, data set and LoRA errors subclass it, so one ``except`` in ``run_main`` covers all.
    A subclass that is not command-line misuse (a run that diverged) sets another ``exit_code``."""
    exit_code = 2


class CLIError(UserError):
    """Bad command-line input."""


def run_main(fn, args, cleanup=None):
    """Run a script's body: a UserError becomes one ``error: ...`` line on stderr and its exit code (2).

    ``cleanup(ok)`` runs last either way; ``ok`` says whether the body returned normally."""
    ok = False
    try:
        result = fn(args)
        ok = True
        return result
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (which saves first): every file is whole or absent
        print("\ninterrupted: stopped without finishing; files already written are complete", file=sys.stderr)
        sys.exit(130)
    finally:
        if cleanup is not None:
            cleanup(ok)
