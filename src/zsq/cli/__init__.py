"""Command line: one module per subcommand. Each parses its flags into the library's configs,
calls the library and prints the result; the library's messages name its fields, and
:func:`main` spells them as this CLI's flags."""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import signal
import sys

from zsq import distributed
from zsq.cli import analyze, budget, demo, export, launch, quantize
from zsq.cli import eval as evaluate
from zsq.cli._common import Parser, flag_for, launched_rank
from zsq.cli._signals import (
    Terminated,
    group_failure_message,
    interrupted_message,
    is_process_group_failure,
    sigterm_as_interrupt,
)
from zsq.errors import ConfigError, ZsqError

log = logging.getLogger("zsq")

# the machine's storage refused a write: a one-line error, not a traceback
STORAGE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="zsq", description="Zero-shot (data-free) quantization of PyTorch classifiers."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    evaluate.add_parser(sub)
    quantize.add_parser(sub)
    budget.add_parser(sub)
    export.add_parsers(sub)
    demo.add_parser(sub)
    analyze.add_parser(sub)
    launch.add_parser(sub)
    return parser


def error_text(err: ZsqError, args: argparse.Namespace) -> str:
    """The library's one line, with its field names spelt as the flags this command has."""
    if isinstance(err, ConfigError):
        typed = getattr(args, "typed", None)
        return err.reworded(lambda field: flag_for(field, typed))
    return str(err)


def says_error(err: ZsqError) -> bool:
    """Whether this process prints ``err``. Under torchrun every process checks the same
    options, and a bad one is said once, by rank 0; the processes of one machine read the same
    files, so an error in the checks before the work is said by one process per machine (the
    first); an error once the work runs (a process's share of the data) by its process."""
    if launched_rank() == 0:
        return True
    if isinstance(err, ConfigError):
        return False
    return distributed.work_started() or os.environ.get("LOCAL_RANK", "0") == "0"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    for stream in (sys.stdout, sys.stderr):  # a path of non-UTF-8 bytes prints as escapes
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="backslashreplace")
    parser = build_parser()
    args = launch.namespace(argv) or parser.parse_args(argv)
    distributed.reset_work()
    rank = launched_rank()  # torchrun's; the other ranks only warn
    logging.basicConfig(
        level=logging.WARNING if args.quiet or rank else logging.INFO,
        format=("" if not rank else f"[rank {rank}] ") + "%(levelname)s %(name)s: %(message)s",
    )
    from zsq.execution import tune_cpu_allocator

    tune_cpu_allocator()
    try:
        with sigterm_as_interrupt():
            return args.func(args)
    except ZsqError as err:
        if says_error(err):
            prefix = f"[rank {rank}] " if rank else ""
            print(f"{prefix}zsq: error: {error_text(err, args)}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno not in STORAGE_ERRORS:
            raise
        where = f" writing {err.filename}" if err.filename else ""
        resume = (
            " (a run keeps its last checkpoint: continue it with --resume)"
            if args.command == "quantize"
            else ""
        )
        print(
            f"zsq: error: {err.strerror}{where}; free space or choose another place{resume}",
            file=sys.stderr,
        )
        return 2
    except Exception as err:
        if not is_process_group_failure(err):
            raise
        print(f"zsq: error: {group_failure_message(err, args, argv)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as stop:
        print(f"zsq: {interrupted_message(args, argv)}", file=sys.stderr)
        return 128 + signal.SIGTERM if isinstance(stop, Terminated) else 130
