"""Stop a run at a chosen call, as Ctrl-C would: the resume tests' one way of interrupting."""

from __future__ import annotations

from typing import Any


def interrupt_at_call(patch: Any, owner: Any, name: str, call: int | None) -> list[int]:
    """Patch ``owner.name`` (with ``patch``, a monkeypatch) to raise KeyboardInterrupt on its
    ``call``-th call (1-based; None: never, only count) and run normally otherwise. Returns the
    list of calls made so far."""
    original, calls = getattr(owner, name), []

    def stopping(*args: Any, **kwargs: Any) -> Any:
        calls.append(len(calls) + 1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    patch.setattr(owner, name, stopping)
    return calls
