"""User-facing errors: bad flags, bad files, bad data.

Scripts catch :class:`UserError` at the top level and print its message as a single line (no traceback) and exit
with status 2, so that a mistyped flag never looks like a crash and never touches existing checkpoints or logs.
"""

import sys
from typing import Callable, NoReturn, Sequence


class UserError(Exception):
    """An error the user can fix; the message names the flag or file and what to do."""


def check(cond: bool, message: str) -> None:
    """Raise :class:`UserError` with ``message`` unless ``cond`` holds."""
    if not cond:
        raise UserError(message)


def exit_main(main: Callable[[Sequence[str]], int], argv: Sequence[str]) -> NoReturn:
    """``sys.exit(main(argv))`` for a tool's ``__main__``: a :class:`UserError` becomes one ``error:`` line on
    stderr and exit status 2 instead of a traceback."""
    try:
        code = main(argv)
    except UserError as e:
        print(f'error: {e}', file=sys.stderr, flush=True)
        sys.exit(2)
    sys.exit(code)
