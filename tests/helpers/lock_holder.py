"""A second process that holds a command's one-writer lock, for the concurrency tests of each writing command.

``held_by_other_process(path, what)`` starts a Python process that takes :func:`capret.locks.exclusive_output`
on ``path`` exactly as a running command would, waits until it holds it, and yields its PID; the command under
test then runs in the test process and must be refused at once, naming that PID, without touching ``path``.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

_HOLD = """
import sys, time
from pathlib import Path
from capret.locks import exclusive_output
with exclusive_output(sys.argv[1], what=sys.argv[2]):
    Path(sys.argv[3]).write_text("held")
    sys.stdin.read()  # hold until the test closes our stdin, then release cleanly
"""


@contextlib.contextmanager
def held_by_other_process(path: Path, *, what: str = "output") -> Iterator[int]:
    """Yield the PID of a live process that holds the one-writer lock on ``path``; it releases the lock cleanly
    (removing its lock file) when the block ends, and is killed if the block fails."""
    flag = path.parent / f".{path.name}.held-flag"
    path.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(path), what, str(flag)], stdin=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not flag.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"lock holder exited with {proc.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError("lock holder never took the lock")
            time.sleep(0.02)
        flag.unlink()
        yield proc.pid
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
