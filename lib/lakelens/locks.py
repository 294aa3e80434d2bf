"""Run locks: one embed run per table and one index run per index folder at a time on a machine.

An advisory `flock` on a lock file: the kernel releases it when the holder exits, however it exits
(killed with SIGKILL too), so a crashed run never leaves a stale lock. The file holds who took it, so
the second run's message says who is running."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import sys
import time
from pathlib import Path

from lakelens.errors import BusyError


def lock_dir() -> Path:
    """Where the lock files of tables live: $LAKELENS_LOCK_DIR, else ~/.cache/lakelens/locks."""
    env = os.environ.get("LAKELENS_LOCK_DIR")
    return Path(env) if env else Path.home() / ".cache" / "lakelens" / "locks"


def table_lock_file(table_uri: str) -> Path:
    """One lock file per table URI (a table on object storage has no local folder to hold it)."""
    digest = hashlib.sha256(table_uri.rstrip("/").encode()).hexdigest()[:24]
    return lock_dir() / f"table-{digest}.lock"


class RunLock:
    """`with RunLock(path, what, wait=0):` holds an exclusive lock or raises BusyError naming the
    holder. `wait` seconds > 0 polls for that long before giving up."""

    def __init__(self, path: str | Path, what: str, wait: float = 0.0):
        self.path, self.what, self.wait = Path(path), what, wait
        self._fd: int | None = None

    def holder(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def _holder_soon(self) -> dict:
        """The holder's note; a holder that has just taken the lock writes it a moment later."""
        for _ in range(10):
            h = self.holder()
            if h:
                return h
            time.sleep(0.05)
        return {}

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + max(0.0, self.wait)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    h = self._holder_soon()
                    who = (f"pid {h.get('pid')} on {h.get('host')} since {h.get('since')} ({h.get('command')})"
                           if h else "another process")
                    raise BusyError(f"{self.what} is in use by {who}; try again when it has finished "
                                    f"(lock file {self.path})") from None
                time.sleep(0.2)
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "since": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": " ".join(sys.argv[:3])[:200]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
