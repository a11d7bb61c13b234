"""The files an export writes: refused when they exist (unless overwriting), and staged under
temporary names so they reach their own names only whole and checked."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from zsq.errors import ConfigError


def check_targets(
    targets: list[Path], *, overwrite: bool = False, keep: Iterable[Path] = ()
) -> None:
    """Fail unless every file in ``targets`` (the export first, then its companions, e.g. the
    manifest) may be written: none is a folder or one of ``keep``, and none exists unless
    ``overwrite``; their folder exists."""
    folder = targets[0].parent
    if not folder.is_dir():
        raise ConfigError(
            f"«out» {targets[0]}: the folder {folder} does not exist; create it first",
        )
    kept = {_real(p) for p in keep}
    for target in targets:
        role = "" if target == targets[0] else f" (written with {targets[0].name})"
        if target.is_dir():
            raise ConfigError(f"{target}{role} is a folder; choose another «out»")
        if _real(target) in kept:
            raise ConfigError(
                f"{target} is a file of the run being exported; choose another «out»",
            )
        if os.path.lexists(target) and not overwrite:
            raise ConfigError(f"{target}{role} exists; pass «overwrite=True» to replace it")


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


@contextmanager
def staged(targets: list[Path], *, overwrite: bool = False) -> Iterator[list[Path]]:
    """Yield a temporary path per target, in a hidden folder beside them (same names, same
    filesystem); when the block succeeds they are renamed onto ``targets``, else removed.

    The companions are renamed before the export itself, so a reader that finds the export
    finds its manifest. The targets are checked again first: the export may have taken long.
    """
    folder = Path(
        tempfile.mkdtemp(dir=targets[0].parent, prefix=f".{targets[0].name}.", suffix=".tmp")
    )
    try:
        temporary = [folder / target.name for target in targets]
        yield temporary
        check_targets(targets, overwrite=overwrite)
        for tmp, target in reversed(list(zip(temporary, targets, strict=True))):
            os.replace(tmp, target)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
