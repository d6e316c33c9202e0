"""The base of bitgen's own errors: bad input whose message names the problem and the fix.

The ``bitgen`` command prints a ``BitgenError`` as one line and exits with status 2
(``BITGEN_TRACEBACK=1`` shows the traceback); anything else is a bug and is re-raised.
"""

from __future__ import annotations


class BitgenError(Exception):
    """A problem the user can fix; ``str(err)`` is one line naming the problem and the fix."""


def one_line(err: BaseException, limit: int = 240) -> str:
    """``Type: first line of the message``, cut to ``limit`` characters (for wrapping foreign errors)."""
    text = str(err).strip().splitlines()
    first = text[0].strip() if text else ""
    summary = f"{type(err).__name__}: {first}" if first else type(err).__name__
    return summary if len(summary) <= limit else summary[: limit - 1] + "…"
