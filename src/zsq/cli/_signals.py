"""Ctrl-C, SIGTERM and a failed process group: what an interrupted command left behind and the
command that continues it."""

from __future__ import annotations

import argparse
import shlex
import signal
from collections.abc import Iterator
from contextlib import contextmanager

from zsq.errors import ZsqError


class Terminated(KeyboardInterrupt):
    """SIGTERM as an exception, so a run cleans up and keeps its checkpoint as on Ctrl-C."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def interrupted_message(args: argparse.Namespace, argv: list[str]) -> str:
    """What an interrupted command left behind: a run to resume (and the command), or nothing."""
    hint = _resume_hint(args, argv)
    if hint is None:
        return "interrupted"
    return "interrupted" + hint


def _resume_hint(args: argparse.Namespace, argv: list[str]) -> str | None:
    """`` before the first checkpoint; nothing was kept`` or ``; continue with: zsq ...``; None
    for commands that leave no run behind."""
    target = getattr(args, "out", None) or getattr(args, "resume", None)
    if args.command != "quantize" or not target:
        return None
    from zsq.io import partial_dir
    from zsq.layout import RunLayout

    try:
        resumable = RunLayout(partial_dir(target)).checkpoint.exists()
    except ZsqError:
        resumable = False
    if not resumable:
        return " before the first checkpoint; nothing was kept"
    return "; continue with: " + shlex.join([*_launcher(), *_resume_argv(argv)])


LAUNCHED_BY = "ZSQ_LAUNCHED_BY"  # set by ``zsq launch`` for the processes it starts


def _launcher() -> list[str]:
    """``zsq``, or the torchrun command this process was started by (same process count)."""
    import os

    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return ["zsq"]
    per_node = os.environ.get("LOCAL_WORLD_SIZE", str(size))
    if os.environ.get(LAUNCHED_BY) == "zsq launch":
        return ["zsq", "launch", f"--nproc-per-node={per_node}"]
    return ["torchrun", f"--nproc-per-node={per_node}", "-m", "zsq"]


def is_process_group_failure(err: Exception) -> bool:
    """A collective that failed because another rank stopped (or the group timed out)."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch.distributed as dist

    return isinstance(err, (dist.DistError, RuntimeError))


def group_failure_message(err: Exception, args: argparse.Namespace, argv: list[str]) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    detail = lines[0][:160] if lines else type(err).__name__
    hint = _resume_hint(args, argv) or ""
    return f"the process group failed ({detail}); another process of the run stopped{hint}"


def _resume_argv(argv: list[str]) -> list[str]:
    """``argv`` with ``--out DIR`` (or an abbreviation argparse accepted) as ``--resume DIR``."""
    resumed = []
    for token in argv:
        key, eq, value = token.partition("=")
        is_out = key.startswith("--") and len(key) > 3 and "--out".startswith(key)
        resumed.append("--resume" + eq + value if is_out else token)
    return resumed
