"""zsq's one error type, and its kind for bad configuration values."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence


class ZsqError(Exception):
    """A user-facing error: one line saying what is wrong and how to fix it.

    The CLI prints it and exits with status 2.
    """


class ConfigError(ZsqError):
    """A bad value or a misplaced option of a config, worded in the config's own field names.

    ``fields`` are the names the message uses; a front end that spells them differently (the
    CLI's flags) rewords the message with :meth:`reworded`, and library code never needs to know
    how a flag is spelt.
    """

    def __init__(self, message: str, *, fields: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.fields = tuple(fields)

    def reworded(self, spelling: Callable[[str], str]) -> str:
        """The message with each of its field names replaced by ``spelling(name)``."""
        text = str(self)
        for name in sorted(set(self.fields), key=len, reverse=True):  # calib_size before calib
            after = r"(?![\w-])" if re.match(r"\w", name[-1]) else ""  # 'image_size=' ends a token
            pattern = rf"(?<![\w.-]){re.escape(name)}{after}"
            text = re.sub(pattern, lambda _, name=name: spelling(name), text)
        return text
