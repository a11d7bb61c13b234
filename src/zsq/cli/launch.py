"""``zsq launch``: ``torchrun`` for a zsq command, failing as zsq fails.

``zsq launch --nproc-per-node 8 quantize ...`` is ``torchrun --nproc-per-node 8 -m zsq quantize
...`` run by torch's own launcher in this process, with one difference: when a process fails,
what it printed (zsq's one line) is all there is, and the exit status is the failing process's,
where torchrun adds its own traceback and a table of the failed processes."""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any, NoReturn

from zsq.cli._signals import LAUNCHED_BY
from zsq.errors import ZsqError

COMMAND = "quantize"  # the one command that runs over several processes


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "launch",
        help="run 'zsq quantize' over several processes with torchrun's launcher "
        "(zsq launch [TORCHRUN OPTIONS] quantize ...)",
        description="torchrun's options (e.g. --nproc-per-node 8, --nnodes 2 --node-rank 0 "
        "--rdzv-backend c10d --rdzv-endpoint HOST:29500), then the zsq quantize command. A failed "
        "process's own error line is the only output and its exit status is zsq launch's.",
    )
    p.add_argument("rest", nargs=argparse.REMAINDER, help="TORCHRUN OPTIONS quantize ...")
    p.set_defaults(func=run, quiet=True, rest=[])


def namespace(argv: list[str]) -> argparse.Namespace | None:
    """``zsq launch``'s arguments, taken as they are (argparse would read torchrun's options
    as zsq's); ``None`` for any other command, and for ``zsq launch --help``."""
    if argv[:1] != ["launch"] or argv[1:2] in (["-h"], ["--help"]):
        return None
    return argparse.Namespace(command="launch", func=run, rest=argv[1:], quiet=True)


def run(args: argparse.Namespace) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.run import get_args_parser
    from torch.distributed.run import run as torchrun

    if COMMAND not in args.rest:
        raise ZsqError(
            "give the command to launch after torchrun's options, e.g. "
            "zsq launch --nproc-per-node 2 quantize --model ..."
        )
    at = args.rest.index(COMMAND)
    parser = get_args_parser()

    def refuse(message: str) -> NoReturn:
        raise ZsqError(f"torchrun option: {message}; see 'torchrun --help'")

    parser.error = refuse  # type: ignore[method-assign]
    launcher = parser.parse_args([*args.rest[:at], "--module", "zsq", *args.rest[at:]])
    _quiet_launcher_logs()
    os.environ[LAUNCHED_BY] = "zsq launch"  # the processes' resume advice names zsq launch
    try:
        torchrun(launcher)
    except ChildFailedError as err:  # each process has said what went wrong
        _, failure = err.get_first_failure()
        return failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode
    except SignalException as stop:  # Ctrl-C or SIGTERM: torchrun stopped the processes
        return 128 + int(stop.sigval)
    except RendezvousError as err:
        raise ZsqError(f"torchrun could not gather the processes: {_first_line(err)}") from None
    except (ValueError, AssertionError) as err:  # torchrun's checks of its option values
        raise ZsqError(
            f"torchrun: {_first_line(err) or 'an option value it refuses'}; check torchrun's "
            "options (see 'torchrun --help')"
        ) from None
    return 0


def _first_line(err: BaseException) -> str:
    return next(iter(str(err).strip().splitlines()), "")


def _quiet_launcher_logs() -> None:
    """torch's launcher logs each failure again (and the OMP_NUM_THREADS default it sets)."""
    for name in list(logging.Logger.manager.loggerDict):
        if name.startswith(("torch.distributed.elastic", "torch.distributed.run")):
            logging.getLogger(name).setLevel(logging.CRITICAL)
