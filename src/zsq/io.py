"""Output folders and files that are either complete or absent (never half-written).

A run writes into ``OUT.partial`` and renames it to ``OUT`` when it completes. Every run folder
holds a marker, ``.zsq-run`` (JSON: the options that define the run and its sessions), so
``--overwrite`` and ``--resume`` recognise zsq's own folders and never touch anything else: a run
folder that also holds files zsq does not write there (a teacher copied in, notes) is not
replaced either.
Checkpoints carry a sha256 digest file so a damaged one is refused instead of resumed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import torch

from zsq.errors import ConfigError, ZsqError
from zsq.layout import PARTIAL_SUFFIX, RunLayout, digest_file

MARKER_VERSION = 1


# --- run folders --------------------------------------------------------------------------------
def output_path(out: Path | str) -> Path:
    """``out`` made absolute and normalised, so ``.`` or ``a/..`` get a real folder name."""
    path = Path(os.path.abspath(out))
    if not path.name:
        raise ZsqError(f"cannot use {out} as the output folder; name a new folder inside it")
    return path


def partial_dir(out: Path | str) -> Path:
    """Where a run writes until it completes; renamed to ``out`` at the end."""
    path = output_path(out)
    return path.with_name(path.name + PARTIAL_SUFFIX)


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The run record in ``folder``, or None when ``folder`` is not a zsq run folder."""
    try:
        record = json.loads(RunLayout(folder).marker.read_text())
    except (OSError, ValueError):
        return None
    if isinstance(record, dict) and record.get("zsq_run") == MARKER_VERSION:
        return record
    return None


def write_marker(folder: Path, record: dict[str, Any]) -> None:
    write_json(RunLayout(folder).marker, {"zsq_run": MARKER_VERSION, **record})


def _kind(path: Path, entries: Sequence[str] = RunLayout.COMMON_ENTRIES) -> str:
    """'missing', 'file', 'empty', 'run' (holds zsq's marker and only what zsq writes), 'mixed'
    (a run holding other files too) or 'foreign' (anything else)."""
    if not path.exists():
        return "missing"
    if not path.is_dir():
        return "file"
    try:
        if read_marker(path) is not None:
            return "mixed" if users_entries(path, entries) else "run"
        return "foreign" if any(path.iterdir()) else "empty"
    except OSError:  # unreadable: treat as someone else's
        return "foreign"


def users_entries(run: Path, entries: Sequence[str] = RunLayout.COMMON_ENTRIES) -> list[str]:
    """The names in a run folder that zsq does not write there (``entries``: the glob patterns of
    what it writes: the common ones, and the files of the methods zsq knows)."""
    names = (entry.name for entry in run.iterdir())
    return sorted(n for n in names if not any(fnmatch(n, pattern) for pattern in entries))


def _refuse_mixed(folder: Path, what: str, entries: Sequence[str]) -> None:
    shown = ", ".join(users_entries(folder, entries)[:5])
    raise ConfigError(
        f"{folder} is a zsq run but also holds files zsq did not write ({shown}); {what} would "
        "delete them: move them out first or choose another «work_dir»",
    )


def check_output_dir(
    out: Path | str,
    *,
    overwrite: bool = False,
    resume: bool = False,
    entries: Sequence[str] = RunLayout.COMMON_ENTRIES,
) -> None:
    """Unless ``out`` can receive this run without losing anything, a one-line error.

    ``overwrite`` may replace only an empty folder or a zsq run (recognised by its marker);
    ``resume`` needs ``OUT.partial`` to be a zsq run holding a checkpoint. :func:`run_folder`
    checks this under the run's lock; on its own it says what a run would be told.
    """
    path, work = output_path(out), partial_dir(out)
    if path.name.endswith(PARTIAL_SUFFIX) and not resume:
        _refuse(
            f"{out}: folder names ending in {PARTIAL_SUFFIX} are zsq's unfinished runs; name "
            "the «work_dir» otherwise"
        )
    kind, work_kind = _kind(path, entries), _kind(work, entries)
    if kind == "file":
        _refuse(f"{out} is a file, not a folder; choose another «work_dir»")
    if path.is_symlink() or work.is_symlink():
        _refuse(f"{out} is a symbolic link; give the real folder's path as «work_dir»")
    if work_kind in ("file", "foreign"):
        _refuse(
            f"{work} exists and is not a zsq run folder; move it away or choose another «work_dir»"
        )
    if work_kind == "mixed" and not resume:
        _refuse_mixed(work, "starting again", entries)
    if kind == "mixed":
        _refuse_mixed(path, "replacing it", entries)
    if resume:
        _check_resumable(out, kind, work, work_kind, overwrite)
    else:
        _check_new(out, kind, work, work_kind, overwrite)
    _check_writable(path)
    if kind != "missing":  # it will be replaced at the end: make sure it can be, before the work
        _check_replaceable(out, path)


def _check_replaceable(out: Path | str, path: Path) -> None:
    if os.path.ismount(path):
        _refuse(
            f"{out} is a mount point, which a finished run cannot replace; give a folder inside "
            "it as «work_dir»"
        )
    probe = path.with_name(f".{path.name}.zsq-probe")
    try:
        os.rename(path, probe)
    except OSError as err:
        _refuse(f"{out} cannot be replaced ({err.strerror}); choose another «work_dir»")
    os.rename(probe, path)


def _refuse(message: str) -> None:
    raise ConfigError(message)


def _check_new(out: Path | str, kind: str, work: Path, work_kind: str, overwrite: bool) -> None:
    if kind == "foreign":
        _refuse(
            f"output folder {out} already exists and is not a zsq run; «overwrite=True» replaces "
            "only an empty folder or a zsq run: choose another «work_dir»"
        )
    if work_kind != "missing" and RunLayout(work).report.exists():  # never replace a result
        _refuse(
            f"{work} holds a finished run named like an unfinished one; rename it (for example "
            f"to {work.with_name(work.name.removesuffix(PARTIAL_SUFFIX) + '-finished')}), then "
            "start again"
        )
    if work_kind != "missing" and not overwrite:
        if RunLayout(work).checkpoint.exists():
            _refuse(
                f"{work} holds an unfinished run; continue it with «resume=True» or pass "
                "«overwrite=True» to start again"
            )
        _refuse(
            f"{work} holds a run that stopped before its first checkpoint; pass «overwrite=True» "
            "to start again"
        )
    if kind != "missing" and not overwrite:
        _refuse(
            f"output folder {out} already exists; pass «overwrite=True» to replace it or choose "
            "another «work_dir»"
        )


def _check_resumable(
    out: Path | str, kind: str, work: Path, work_kind: str, overwrite: bool
) -> None:
    if work_kind == "missing":
        path = output_path(out)
        if path.name.endswith(PARTIAL_SUFFIX) and RunLayout(path).checkpoint.exists():
            run = path.with_name(path.name.removesuffix(PARTIAL_SUFFIX))
            _refuse(
                f"{out} is the working folder of the unfinished run {run}; resume that run "
                f"instead: «resume=True, work_dir=»{run}"
            )
        if kind == "run":
            _refuse(f"the run in {out} already finished; there is nothing to resume")
        if kind == "foreign":
            _refuse(f"{out} is not a zsq run and {work} does not exist; nothing to resume")
        _refuse(f"there is no unfinished run {work} to resume; start one without «resume=True»")
    if not RunLayout(work).checkpoint.exists():
        _refuse(
            f"{work} holds no checkpoint (the run stopped before its first one); start it again "
            f"with «work_dir=»{out} «overwrite=True»"
        )
    if kind == "foreign":
        _refuse(
            f"output folder {out} is not a zsq run; move it away, then resume: the resumed run "
            "will be renamed to it"
        )
    if kind != "missing" and not overwrite:
        _refuse(
            f"output folder {out} already exists; pass «overwrite=True» to replace it with the "
            "resumed run"
        )
    if kind == "missing" and overwrite:
        _refuse(
            f"«overwrite=True» has no effect when resuming {out}: there is no finished folder "
            "to replace; drop it"
        )


def _check_writable(path: Path) -> None:
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    try:  # a real probe: permission bits say nothing for root or for special filesystems
        Path(tempfile.mkdtemp(dir=parent, prefix=".zsq-probe-")).rmdir()
    except OSError:
        _refuse(f"cannot write to {parent}; choose a «work_dir» you can write to")


@contextmanager
def run_folder(
    out: Path | str,
    *,
    overwrite: bool = False,
    resume: bool = False,
    entries: Sequence[str] = RunLayout.COMMON_ENTRIES,
) -> Iterator[Path]:
    """Check ``out`` (:func:`check_output_dir`) under the run's lock, held until the block ends,
    and yield its working folder ``OUT.partial``, which becomes ``out`` only if the block
    succeeds. On failure the working folder, and any parent folder this call created, is
    removed unless it holds a checkpoint a run can resume."""
    path, work = output_path(out), partial_dir(out)
    created = _make_parents(path)
    try:
        with run_lock(out):
            check_output_dir(out, overwrite=overwrite, resume=resume, entries=entries)
            if work.exists() and not resume:
                shutil.rmtree(work)
            work.mkdir(exist_ok=True)
            try:
                yield work
            except BaseException:
                if not RunLayout(work).checkpoint.exists():
                    shutil.rmtree(work, ignore_errors=True)
                raise
            if _kind(path, entries) in ("foreign", "mixed"):  # someone put files there meanwhile
                raise ZsqError(
                    f"{out} changed during the run and is not a zsq run; the result is in {work}"
                )
            shutil.rmtree(RunLayout(work).checkpoint_dir, ignore_errors=True)
            _replace_folder(work, path)
    except BaseException:
        _remove_empty(created)  # after the lock's file is gone
        raise


def _replace_folder(work: Path, path: Path) -> None:
    """``work`` becomes ``path``; an old ``path`` is moved aside first and deleted last, so a
    file that cannot be deleted never leaves half of the old run where the new one goes."""
    if not path.exists():
        work.rename(path)
        return
    old = path.with_name(f".{path.name}.zsq-old")
    shutil.rmtree(old, ignore_errors=True)
    path.rename(old)
    work.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def _make_parents(path: Path) -> list[Path]:
    try:
        return _make_dirs(path.parent)
    except OSError as err:
        raise ZsqError(
            f"cannot create the folder of {path}: {err.strerror or err}; choose another place"
        ) from None


@contextmanager
def run_lock(out: Path | str) -> Iterator[None]:
    """Held while a run writes to ``out``, so a second zsq process is refused instead of
    resuming, overwriting or finishing into a live run folder. An advisory ``flock`` on
    ``.NAME.zsq-lock`` beside the folder, on its real path: every spelling of the folder (a
    symlinked parent, another working directory) and every process environment meets the same
    lock. The file is removed when the run ends; the kernel releases the lock if the process
    dies, and a later run takes it over."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    real = Path(os.path.realpath(output_path(out)))
    lock_path = real.with_name(f".{real.name}.zsq-lock")
    while True:
        try:
            lock = open(lock_path, "a+")  # noqa: SIM115 (held across the yield)
        except OSError as err:
            why = f" ({err.strerror})" if err.strerror else ""
            _refuse(f"cannot write to {real.parent}{why}; choose a «work_dir» you can write to")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "?"
            lock.close()
            raise ConfigError(
                f"{out} is in use by another zsq run (process {holder}); wait for it to end or "
                "choose another «work_dir»",
            ) from None
        if _same_file(lock, lock_path):
            break
        lock.close()  # the file was removed by the run that held it: take the new one
    try:
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
        yield
    finally:
        lock_path.unlink(missing_ok=True)  # before the unlock: no one locks a removed file
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()


def _same_file(handle: Any, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
    except FileNotFoundError:
        return False


def _make_dirs(path: Path) -> list[Path]:
    """``mkdir -p``; returns the folders it created, deepest first."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        folder.mkdir(exist_ok=True)
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


# --- files --------------------------------------------------------------------------------------
def _file_mode() -> int:
    """The mode a plain ``open(..., 'w')`` would give: 0o666 less the user's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _atomic_replace(path: Path, write: Callable[[str], Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _file_mode())  # mkstemp (and some writers) make 0600 whatever the umask
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")

    _atomic_replace(path, write)


def write_text(path: Path, text: str) -> None:
    """UTF-8; a path of non-UTF-8 bytes quoted in ``text`` is written back as those bytes."""
    _atomic_replace(
        path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8", errors="surrogateescape")
    )


def write_bytes(path: Path, data: bytes) -> None:
    _atomic_replace(path, lambda tmp: Path(tmp).write_bytes(data))


def torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file then rename: a crash never leaves a torn checkpoint."""
    try:
        _atomic_replace(path, lambda tmp: torch.save(obj, tmp))
    except RuntimeError as err:  # torch's writer reports a full disk without an errno
        if shutil.disk_usage(path.parent).free > 64 << 20:
            raise
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from err


def save_safetensors(
    state: dict[str, torch.Tensor], path: Path, metadata: dict | None = None
) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    try:
        _atomic_replace(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    except SafetensorError as err:  # its own type for an OS error (a full disk)
        raise ZsqError(f"cannot write {path} ({err}); free space or choose another place") from None


# --- verified files (checkpoints) ---------------------------------------------------------------
def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a safetensors file at any path: safetensors opens only
    UTF-8 paths, so another path's bytes are read here. A damaged file raises safetensors'
    own error (or OSError/ValueError); each caller words it for what the file is."""
    from safetensors import safe_open
    from safetensors.torch import load

    path = Path(path)
    if is_utf8(str(path)):
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    data = path.read_bytes()
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    return load(data), header.get("__metadata__") or {}


def is_utf8(text: str) -> bool:
    """Whether ``text`` (a path with undecodable bytes as surrogates) encodes as UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def sha256_tensors(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of the tensors, in name order (so the
    order a file or a state dict lists them in does not matter), whatever their device. Image
    caches and checkpoints store it (as a teacher's digest): its format must not change."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_digests(path: Path) -> list[str]:
    try:
        lines = digest_file(path).read_text().splitlines()
    except OSError:
        return []
    return [line.split()[0] for line in lines if line.strip()]


def _write_digests(path: Path, digests: list[str]) -> None:
    write_text(digest_file(path), "".join(f"{d}  {path.name}\n" for d in digests))


def write_verified(path: Path, payload: bytes) -> None:
    """Write ``payload`` atomically with its sha256 beside it (``PATH.sha256``, sha256sum style).

    The digest file is written first and lists the new digest and the previous one, so a crash
    between the two renames leaves a pair that still verifies; it then keeps the new one only.
    """
    digest = hashlib.sha256(payload).hexdigest()
    _write_digests(path, [digest, *_read_digests(path)[:1]])
    write_bytes(path, payload)
    _write_digests(path, [digest])


def read_verified(path: Path, fix: str = "start the run again") -> bytes:
    """The bytes of a file written by :func:`write_verified`; a damaged one is an error whose
    message ends with ``fix``."""
    payload = path.read_bytes()
    digests = _read_digests(path)
    if not digests:
        raise ZsqError(
            f"checkpoint {path} has no digest file {digest_file(path).name}, so it cannot be "
            f"verified; {fix}"
        )
    if hashlib.sha256(payload).hexdigest() not in digests:
        raise ZsqError(
            f"checkpoint {path} is damaged (its sha256 differs from the one written with it); "
            f"it cannot be resumed: {fix}"
        )
    return payload
