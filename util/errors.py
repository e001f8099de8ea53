"""User-facing errors: bad flags, bad files, bad data.

Scripts catch :class:`UserError` at the top level and print its message as a single line (no traceback) and exit
with status 2, so that a mistyped flag never looks like a crash and never touches existing checkpoints or logs.
"""


class UserError(Exception):
    """An error the user can fix; the message names the flag or file and what to do."""


def check(cond: bool, message: str) -> None:
    """Raise :class:`UserError` with ``message`` unless ``cond`` holds."""
    if not cond:
        raise UserError(message)
