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


def exit_with(error):
    """The one way a script stops on bad input, argparse's own errors included: ``error: ...`` as one line on
    stderr, then the error's exit code (2 for misuse)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    print(f"error: {' '.join(lines)}", file=sys.stderr)
    sys.exit(getattr(error, "exit_code", 2))


def run_main(fn, args, cleanup=None):
    """Run a script's body: a UserError becomes one ``error: ...`` line on stderr and its exit code (2).

    ``cleanup(ok)`` runs last either way; ``ok`` says whether the body returned normally."""
    ok = False
    try:
        result = fn(args)
        ok = True
        return result
    except UserError as e:
        exit_with(e)
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (which saves first): every file is whole or absent
        print("\ninterrupted: stopped without finishing; files already written are complete", file=sys.stderr)
        sys.exit(130)
    finally:
        if cleanup is not None:
            cleanup(ok)
