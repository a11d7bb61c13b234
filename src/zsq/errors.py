"""zsq's one error type, and its kind for bad configuration values."""

from __future__ import annotations

import re
from collections.abc import Callable

FIELD = re.compile(r"«([^«»|]+)(?:\|([^«»]*))?»")


class ZsqError(Exception):
    """A user-facing error: one line saying what is wrong and how to fix it.

    The CLI prints it and exits with status 2.
    """


class ConfigError(ZsqError):
    """A bad value or a misplaced option, worded in the library's own names for its options.

    The message marks each option it names: ``«calib_size»``, or ``«in_channels|the channels of
    image_shape»`` where the library words it otherwise. ``str()`` shows the names (or those
    words); a front end that spells options its own way (the CLI's flags) gets the message from
    :meth:`reworded`, so library code never needs to know how a flag is spelt.
    """

    def __init__(self, message: str) -> None:
        self.template = message
        super().__init__(FIELD.sub(lambda m: m.group(2) or m.group(1), message))

    @property
    def fields(self) -> list[str]:
        """The option names the message marks, in order."""
        return [match.group(1) for match in FIELD.finditer(self.template)]

    def reworded(self, spelling: Callable[[str], str | None]) -> str:
        """The message with each marked option spelt ``spelling(name)`` (None: as ``str()``)."""

        def spell(match: re.Match) -> str:
            return spelling(match.group(1)) or match.group(2) or match.group(1)

        return FIELD.sub(spell, self.template)
