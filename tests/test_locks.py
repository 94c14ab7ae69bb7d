"""The one-writer lock (capret.locks): refusal names the output and the holder's PID, dead holders are taken
over with a warning, nesting in one thread works, other threads and processes are refused."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from capret.locks import (
    OutputLockedError,
    StaleLockWarning,
    exclusive_output,
    holder_of,
    lock_path_for,
)

HOLD = """
import sys, time
from pathlib import Path
from capret.locks import exclusive_output
with exclusive_output(sys.argv[1], what="test folder"):
    Path(sys.argv[2]).write_text("locked")
    time.sleep(float(sys.argv[3]))
"""


def _start_holder(tmp_path: Path, output: Path, seconds: float = 30.0) -> subprocess.Popen[bytes]:
    flag = tmp_path / "holding.flag"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(output), str(flag), str(seconds)])
    deadline = time.monotonic() + 30
    while not flag.exists():
        assert proc.poll() is None, "holder exited early"
        assert time.monotonic() < deadline, "holder never took the lock"
        time.sleep(0.02)
    return proc


def test_lock_file_sits_beside_the_output(tmp_path: Path) -> None:
    assert lock_path_for(tmp_path / "run") == tmp_path / ".run.lock"
    assert lock_path_for(tmp_path / "c" / "captions.jsonl") == tmp_path / "c" / ".captions.jsonl.lock"


def test_second_process_is_refused_at_once_naming_folder_and_pid(tmp_path: Path) -> None:
    output = tmp_path / "out"
    proc = _start_holder(tmp_path, output)
    try:
        start = time.monotonic()
        with pytest.raises(OutputLockedError) as info, exclusive_output(output, what="test folder"):
            pytest.fail("the second writer got the lock")
        assert time.monotonic() - start < 1.0
        message = str(info.value)
        assert str(output) in message and f"PID {proc.pid}" in message and "\n" not in message
        holder = holder_of(output)
        assert holder is not None and holder["pid"] == proc.pid
    finally:
        proc.kill()
        proc.wait()


def test_clean_release_removes_the_lock_file_and_lets_the_next_writer_in(tmp_path: Path) -> None:
    output = tmp_path / "out"
    with exclusive_output(output, what="test folder") as lock_file:
        record = json.loads(lock_file.read_text())
        assert record["pid"] == os.getpid() and record["what"] == "test folder"
    assert not lock_file.exists()
    assert not output.exists()  # the lock creates nothing in the output itself
    with exclusive_output(output, what="test folder"):
        pass


def test_dead_holder_is_taken_over_with_a_warning(tmp_path: Path) -> None:
    output = tmp_path / "out"
    proc = _start_holder(tmp_path, output)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert lock_path_for(output).exists()  # kill -9 left the record behind
    with (
        pytest.warns(StaleLockWarning, match=f"PID {proc.pid}"),
        exclusive_output(output, what="test folder"),
    ):
        assert holder_of(output)["pid"] == os.getpid()  # type: ignore[index]


def test_reentrant_in_one_thread_but_refused_from_another_thread(tmp_path: Path) -> None:
    output = tmp_path / "out"
    errors: list[BaseException] = []

    def other() -> None:
        try:
            with exclusive_output(output, what="test folder"):
                pass
        except OutputLockedError as exc:
            errors.append(exc)

    with exclusive_output(output, what="test folder"):
        with exclusive_output(output, what="test folder", reentrant=True):
            pass
        with pytest.raises(OutputLockedError), exclusive_output(output, what="test folder"):
            pytest.fail("a second writer in the same thread got the lock")
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
        assert lock_path_for(output).exists()  # the inner exit did not release the outer hold
    assert len(errors) == 1 and f"PID {os.getpid()}" in str(errors[0])
    assert not lock_path_for(output).exists()


def _race(output: str, marker: str, barrier: object) -> str:
    barrier.wait()  # type: ignore[attr-defined]
    try:
        with exclusive_output(output, what="test folder"):
            Path(output).mkdir(exist_ok=True)
            (Path(output) / marker).write_text(marker)
            time.sleep(0.5)
        return "wrote"
    except OutputLockedError as exc:
        return f"refused: {exc}"


def test_two_racing_processes_one_writes_one_is_refused(tmp_path: Path) -> None:
    output = tmp_path / "out"
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(2)
        with ctx.Pool(2) as pool:
            results = pool.starmap(_race, [(str(output), "a", barrier), (str(output), "b", barrier)])
    assert sorted(r.split(":")[0] for r in results) == ["refused", "wrote"]
    assert len(list(output.iterdir())) == 1  # nothing mixed


JOB = """
import sys, time
from pathlib import Path
from capret.locks import job_output
with job_output(sys.argv[1], what="test folder", job=sys.argv[2], member=int(sys.argv[3])):
    Path(sys.argv[4]).write_text("locked")
    time.sleep(float(sys.argv[5]))
"""


def _start_member(
    tmp_path: Path, output: Path, *, job: str, member: int, seconds: float = 30.0
) -> subprocess.Popen[bytes]:
    flag = tmp_path / f"{job}-{member}.flag"
    args = [sys.executable, "-c", JOB, str(output), job, str(member), str(flag), str(seconds)]
    proc = subprocess.Popen(args)
    deadline = time.monotonic() + 30
    while not flag.exists():
        assert proc.poll() is None, "member exited early"
        assert time.monotonic() < deadline, "member never took the lock"
        time.sleep(0.02)
    return proc


def test_ranks_of_one_job_share_the_output_another_job_is_refused(tmp_path: Path) -> None:
    from capret.locks import job_output

    output = tmp_path / "out"
    ranks = [_start_member(tmp_path, output, job="job-a", member=m) for m in (0, 1)]
    try:
        for member in (0, 1, 5):  # any rank of another job, whatever its world size
            with pytest.raises(OutputLockedError, match=f"PID {ranks[0].pid}"):
                with job_output(output, what="test folder", job="job-b", member=member):
                    pytest.fail("a second job got into the folder")
        with pytest.raises(OutputLockedError, match=r"rank 1"):  # a second process of one rank
            with job_output(output, what="test folder", job="job-a", member=1):
                pytest.fail("two processes of one rank")
    finally:
        for proc in ranks:
            proc.kill()
            proc.wait()
    with pytest.warns(StaleLockWarning), job_output(output, what="test folder", job="job-b", member=0):
        pass
    assert not lock_path_for(output).exists()  # the last member out removed it


def test_job_lock_released_cleanly_by_last_member(tmp_path: Path) -> None:
    from capret.locks import job_output

    output = tmp_path / "out"
    member = _start_member(tmp_path, output, job="job-a", member=0, seconds=0.3)
    with job_output(output, what="test folder", job="job-a", member=1):
        pass
    assert member.wait(timeout=30) == 0
    assert not lock_path_for(output).exists()
    with job_output(output, what="test folder", job="job-b", member=0):  # no warning: nothing stale
        pass


def test_two_spellings_of_one_output_share_the_lock(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    with exclusive_output(real / "out", what="test folder"):
        with (
            pytest.raises(OutputLockedError),
            exclusive_output(tmp_path / "link" / "out", what="test folder"),
        ):
            pytest.fail("a symlinked spelling of the same folder got the lock")


@pytest.mark.parametrize("kind", ["exclusive", "job"])
def test_full_disk_while_writing_the_lock_is_disk_full_naming_the_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    import errno

    from capret.errors import DiskFullError
    from capret.locks import job_output

    output = tmp_path / "out"

    def full(fd: int, data: bytes, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    hold = (
        exclusive_output(output, what="test folder")
        if kind == "exclusive"
        else job_output(output, what="test folder", job="j1", member=0)
    )
    with pytest.raises(DiskFullError) as info, hold:
        pass
    message = str(info.value)
    assert "disk full" in message and str(lock_path_for(output)) in message and "\n" not in message
    assert info.value.path == lock_path_for(output)
    monkeypatch.undo()
    if kind == "exclusive":
        assert not lock_path_for(output).exists()  # the torn record is not left behind
    with exclusive_output(output, what="test folder"):  # and the next writer gets in
        pass
