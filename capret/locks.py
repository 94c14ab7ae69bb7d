"""One writer per output: an exclusive lock on every folder or store a command writes.

Two runs into one output folder used to both exit 0 and mix it (run B moved run A's checkpoint aside while A ran
on). Every command that writes a folder or store therefore wraps its whole write in :func:`exclusive_output`
*before it touches anything*; a second writer is refused at once with :class:`OutputLockedError`, whose one line
names the output and the holder's PID and command.

How it works, and why:

- The lock is an ``fcntl.flock`` on a small file *beside* the output (``<parent>/.<name>.lock``), not inside it:
  a writer that replaces or deletes the output folder (``--overwrite``) must not delete the lock with it, and a
  store file must not be created just to be refused (a refused run leaves nothing behind).
- The kernel releases a ``flock`` when its holder dies, even on ``kill -9``, so a dead holder can never block a
  rerun. The lock file records the holder (PID, host, command, start time); it is removed on a clean release, so
  a lock file that is still there with a record but whose lock is free was left by a holder that died: the new
  writer takes it over and says so in a warning naming the dead PID.
- Removing the file on release races with a writer that opened it just before: after locking, the writer checks
  that the path still names the inode it locked and retries if not (the standard unlink-safe flock dance).
- A second hold is refused even within one process (two open writers of one store would interleave lines);
  ``reentrant=True`` lets the holding thread nest a hold (a CLI that locks a folder around a library call that
  locks it again).
- Where ``flock`` is unsupported (``ENOLCK`` on some network file systems) the record alone decides: a live
  holder PID on this host refuses, a dead one is taken over.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capret.errors import CapretError

__all__ = [
    "LockHolder",
    "OutputLockedError",
    "StaleLockWarning",
    "exclusive_output",
    "holder_of",
    "job_output",
    "job_token_from_env",
    "lock_path_for",
    "read_holder",
]

LOCK_SUFFIX = ".lock"


class OutputLockedError(CapretError):
    """Another live process (or thread) is writing the same output folder or store."""


class StaleLockWarning(UserWarning):
    """A lock left by a writer that died was taken over (its record names the dead PID)."""


@dataclass(frozen=True)
class LockHolder:
    """Who holds (or last held) a lock, as recorded in the lock file."""

    pid: int
    host: str
    command: str
    what: str
    started: str
    job: str = ""

    def describe(self) -> str:
        where = "" if self.host == socket.gethostname() else f" on {self.host}"
        return f"PID {self.pid}{where} ({self.command}, since {self.started})"


def lock_path_for(path: str | os.PathLike[str]) -> Path:
    """The lock file of an output: ``runs/a`` -> ``runs/.a.lock``; ``c/captions.jsonl`` -> ``c/.captions.jsonl.lock``.

    Beside the output, never inside it, so replacing the output (``--overwrite``) keeps the lock. Symlinks are
    resolved first, so two spellings of one output (a linked folder, a linked parent) share one lock.
    """
    path = Path(os.path.realpath(path))
    if path.name in ("", ".", ".."):
        raise CapretError(f"cannot lock output {str(path)!r}: it names no folder or file", path=path)
    return path.with_name(f".{path.name}{LOCK_SUFFIX}")


def read_holder(lock_file: str | os.PathLike[str]) -> LockHolder | None:
    """The holder recorded in ``lock_file``, or None when it is missing, empty or unreadable (being written)."""
    try:
        text = Path(lock_file).read_text(encoding="utf-8")
        data = json.loads(text)
        return LockHolder(
            pid=int(data["pid"]),
            host=str(data.get("host", "")),
            command=str(data.get("command", "")),
            what=str(data.get("what", "")),
            started=str(data.get("started", "")),
            job=str(data.get("job", "")),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _command_line() -> str:
    argv = [os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python", *sys.argv[1:]]
    text = " ".join(argv)
    return text if len(text) <= 200 else text[:197] + "..."


# Locks this process holds: lock file -> [owning thread id, depth, fd]. Guarded by _HELD_GUARD.
_HELD: dict[Path, list[int]] = {}
_HELD_GUARD = threading.Lock()


def _refuse(output: Path, what: str, holder: LockHolder | None) -> OutputLockedError:
    who = holder.describe() if holder is not None else "another process (its PID is not recorded yet)"
    return OutputLockedError(
        f"{what} {output} is being written by {who}; wait for it to finish, stop it, or choose another output",
        path=output,
    )


def _warn_stale(lock_file: Path, message: str) -> None:
    """Warn that a dead holder's lock was taken over, located at the lock file (not at a frame of contextlib,
    which is where ``warnings.warn`` would point from inside a context manager)."""
    warnings.warn_explicit(
        message, StaleLockWarning, filename=str(lock_file), lineno=0, module="capret.locks"
    )


def _disk_full_named(lock_file: Path) -> contextlib.AbstractContextManager[None]:
    """A full disk while creating or writing the lock file is :class:`~capret.errors.DiskFullError` naming it.

    Imported late: :mod:`capret.io` pulls in torch, and a lock is taken by commands that may not need it.
    """
    from capret.io import disk_full_named

    return disk_full_named(lock_file)


def _write_record(fd: int, *, what: str, job: str = "") -> None:
    record = {
        "job": job,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": _command_line(),
        "what": what,
        "started": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    payload = (json.dumps(record) + "\n").encode("utf-8")
    os.ftruncate(fd, 0)
    os.pwrite(fd, payload, 0)


def _acquire(output: Path, lock_file: Path, *, what: str) -> int:
    """Lock ``lock_file`` (creating it), record this process in it and return its fd; refuse a live holder."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(100):  # retries only when the file was removed between open and lock
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise _refuse(output, what, read_holder(lock_file)) from None
            except OSError as exc:
                if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                holder = read_holder(lock_file)  # no flock here: the record alone decides
                if holder is not None and holder.host == socket.gethostname() and _pid_alive(holder.pid):
                    if holder.pid != os.getpid():
                        raise _refuse(output, what, holder) from None
            try:
                same = os.stat(lock_file).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # released and removed by its holder between our open and lock: try the new file
                os.close(fd)
                continue
            previous = read_holder(lock_file)
            if previous is not None:
                alive = previous.host == socket.gethostname() and _pid_alive(previous.pid)
                state = "is no longer running" if not alive else "no longer holds the lock"
                _warn_stale(
                    lock_file,
                    f"taking over the lock on {what} {output}: its holder {previous.describe()} {state} "
                    "(killed or crashed); its partial output is resumed or replaced as the command decides",
                )
            try:
                _write_record(fd, what=what)
            except OSError:  # e.g. a full disk: we hold the lock, so remove the torn record, leave nothing
                with contextlib.suppress(OSError):
                    lock_file.unlink()
                raise
            return fd
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise
    raise OutputLockedError(f"cannot lock {what} {output}: its lock file {lock_file} keeps being replaced")


def _release(lock_file: Path, fd: int) -> None:
    # Unlink while still holding the lock, so a waiting opener sees the inode change and retries.
    with contextlib.suppress(OSError):
        if os.stat(lock_file).st_ino == os.fstat(fd).st_ino:
            lock_file.unlink()
    os.close(fd)  # releases the flock


@contextlib.contextmanager
def exclusive_output(path: str | os.PathLike[str], *, what: str, reentrant: bool = False) -> Iterator[Path]:
    """Hold the one-writer lock on output ``path`` (a folder or a store file) for the ``with`` block.

    Take it before anything in the output is read for resuming, moved or written. ``what`` names the output in
    messages ("training output folder", "caption store"). Yields the lock file's path. ``reentrant`` lets the
    thread that already holds the lock take it again (a command that locks a folder around a library call that
    locks it too); without it a second hold is refused even in the same thread, as two open writers would be.

    Raises:
        OutputLockedError: another live process or thread holds it; the one-line message names the output and
            the holder's PID and command.

    Warns:
        StaleLockWarning: a lock left by a dead holder was taken over.
    """
    output = Path(os.path.abspath(path))
    lock_file = lock_path_for(output)
    me = threading.get_ident()
    with _HELD_GUARD:
        entry = _HELD.get(lock_file)
        if entry is not None:
            if entry[0] != me or not reentrant:
                holder = read_holder(lock_file)
                raise _refuse(output, what, holder)
            entry[1] += 1
            nested = True
        else:
            nested = False
    if nested:
        try:
            yield lock_file
        finally:
            with _HELD_GUARD:
                _HELD[lock_file][1] -= 1
        return
    with _disk_full_named(lock_file):
        fd = _acquire(output, lock_file, what=what)
    with _HELD_GUARD:
        _HELD[lock_file] = [me, 1, fd]
    try:
        yield lock_file
    finally:
        with _HELD_GUARD:
            _HELD.pop(lock_file, None)
        _release(lock_file, fd)


def holder_of(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The recorded holder of output ``path`` as a dict (for status reports), or None when unlocked."""
    holder = read_holder(lock_path_for(path))
    return None if holder is None else holder.__dict__.copy()


def job_token_from_env() -> str:
    """A token shared by every process of one ``torchrun`` job and by no other live job on the host.

    torchrun gives all ranks of a job the same rendezvous address and port (two live jobs on one host cannot
    share a port) and run id; a single process is its own job.
    """
    world = os.environ.get("WORLD_SIZE", "1")
    if world not in ("", "1") and os.environ.get("MASTER_PORT"):
        return ":".join(
            [
                "torchrun",
                os.environ.get("MASTER_ADDR", ""),
                os.environ.get("MASTER_PORT", ""),
                os.environ.get("TORCHELASTIC_RUN_ID", ""),
                world,
            ]
        )
    return f"process:{socket.gethostname()}:{os.getpid()}"


def _lock_nb(fd: int, mode: int) -> bool:
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


@contextlib.contextmanager
def job_output(path: str | os.PathLike[str], *, what: str, job: str, member: int) -> Iterator[Path]:
    """One *job* per output, many member processes: the lock for outputs that every rank of a job writes.

    Each member (a rank) holds an exclusive lock on its own part (``.<name>.r<member>.lock``), so two processes
    of one rank never write together; every member also holds a *shared* lock on the output's lock file, which
    records the ``job`` token (see :func:`job_token_from_env`) of the job that holds it. A member of another job
    -- whatever its rank or world size -- finds a different token there and is refused, so two jobs never mix
    one folder, while the ranks of one job never refuse each other.

    Raises:
        OutputLockedError: another job (or another process of this rank) is writing ``path``.
    """
    output = Path(os.path.abspath(path))
    lock_file = lock_path_for(output)
    with _disk_full_named(lock_file):
        fd = _join(output, lock_file, what=what, job=job)  # another job is refused first, naming its holder
    try:
        part = output.with_name(f"{output.name}.r{member}")
        with contextlib.ExitStack() as stack:
            with warnings.catch_warnings():  # a dead job was reported once, by _join, not again per rank
                warnings.simplefilter("ignore", StaleLockWarning)
                stack.enter_context(exclusive_output(part, what=f"{what} (rank {member})"))
            yield lock_file
    finally:
        _leave(lock_file, fd)


def _same_file(lock_file: Path, fd: int) -> bool:
    try:
        return os.stat(lock_file).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _join(output: Path, lock_file: Path, *, what: str, job: str) -> int:
    """Hold a shared lock on ``lock_file`` as a member of ``job``; refuse when another job holds it."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(400):
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            if _lock_nb(fd, fcntl.LOCK_EX):  # nobody holds it: this job claims the output
                if not _same_file(lock_file, fd):
                    os.close(fd)
                    continue
                previous = read_holder(lock_file)
                if previous is not None and previous.job != job:
                    alive = previous.host == socket.gethostname() and _pid_alive(previous.pid)
                    if alive and attempt < 200:
                        # A claimer of another job between writing its record and taking its shared lock
                        # (flock downgrades are not atomic): look again shortly before calling it stale.
                        os.close(fd)
                        time.sleep(0.01)
                        continue
                    _warn_stale(
                        lock_file,
                        f"taking over the lock on {what} {output}: its holder {previous.describe()} is no "
                        "longer running (killed or crashed)",
                    )
                if previous is None or previous.job != job:
                    _write_record(fd, what=what, job=job)
                fcntl.flock(fd, fcntl.LOCK_SH)  # let the other ranks of this job join
            elif not _lock_nb(fd, fcntl.LOCK_SH):  # a claimer holds it exclusively for a moment: retry
                os.close(fd)
                time.sleep(0.01)
                continue
            if not _same_file(lock_file, fd):  # removed by the last member of a finished job
                os.close(fd)
                continue
            holder = read_holder(lock_file)
            if holder is None:  # the claimer has not written its record yet
                os.close(fd)
                time.sleep(0.01)
                continue
            if holder.job != job:
                raise _refuse(output, what, holder)
            return fd
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise
    raise OutputLockedError(
        f"cannot lock {what} {output}: its lock file {lock_file} keeps changing", path=output
    )


def _leave(lock_file: Path, fd: int) -> None:
    """Drop this member's shared lock; the last member out removes the lock file (a clean release)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
        if _lock_nb(fd, fcntl.LOCK_EX):
            with contextlib.suppress(OSError):
                if os.stat(lock_file).st_ino == os.fstat(fd).st_ino:
                    lock_file.unlink()
    finally:
        os.close(fd)
