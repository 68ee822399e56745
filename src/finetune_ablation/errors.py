"""The one exception type users see: a single line naming the problem and the fix."""


class UserError(Exception):
    """Bad input or settings. The CLI prints ``error: <message>`` and exits non-zero, no traceback."""
