"""The one exception type users see, and the one way every console script turns it into a single
line naming the problem and the fix."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class UserError(Exception):
    """Bad input or settings. The CLI prints ``error: <message>`` and exits non-zero, no traceback."""


def run_cli(body: Callable[[], T]) -> T:
    """Run a console script's body: a UserError becomes one ``error: ...`` line and exit code 2."""
    try:
        return body()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
