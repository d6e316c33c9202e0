"""The base of bitgen's own errors: bad input whose message names the problem and the fix.

The ``bitgen`` command prints a ``BitgenError`` as one line and exits with status 2
(``BITGEN_TRACEBACK=1`` shows the traceback); anything else is a bug and is re-raised.
"""

from __future__ import annotations

import re

# Annotations libraries append to messages (TensorStore: `` [tensorstore_spec='{...}']``).
_ANNOTATION = re.compile(r"\s\[[\w.\[\]]+=.*$")


class BitgenError(Exception):
    """A problem the user can fix; ``str(err)`` is one line naming the problem and the fix."""


class ConfigError(BitgenError, ValueError):
    """A configuration value or file is invalid; the message names the key and the fix."""


def one_line(err: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message`` of a foreign error's root cause (the innermost
    ``raise ... from``); a longer one keeps its start and its end (where nested library errors put
    the detail)."""
    while err.__cause__ is not None:
        err = err.__cause__
    text = str(err).strip().splitlines()
    first = _ANNOTATION.sub("", text[0].strip()) if text else ""
    summary = f"{type(err).__name__}: {first}" if first else type(err).__name__
    return summary if len(summary) <= limit else f"{summary[: limit // 3]} … {summary[-limit // 2:]}"
