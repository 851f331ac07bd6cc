"""The one exception a user sees as a line: `UserError` (the commands print it as `error: ...`, exit code 2)."""


class UserError(Exception):
    """A mistake in what the user asked for: the CLIs print it as one line and exit with code 2."""
