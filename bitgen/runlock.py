"""One writer per run directory: an exclusive ``flock`` on ``<run_dir>/.bitgen.lock``.

The kernel drops an ``flock`` when its holder exits in any way (SIGKILL included), so a lock left
by a dead process never blocks anyone: there is no stale-lock cleanup to get wrong. The holder
writes its PID, host and start time into the file for the message a second writer prints. The
file itself is kept (removing it would let two processes lock two different files of one name).

Shared file systems: Linux maps ``flock`` onto NFS byte-range locks (NFSv4, or v3 with lockd), so
writers on different hosts exclude each other there too; a mount with ``nolock`` makes the lock
host-local.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from bitgen.errors import BitgenError

LOCK_NAME = ".bitgen.lock"


class RunLockedError(BitgenError):
    """Another live process holds the run directory."""


class RunLock:
    """Context manager holding ``<run_dir>/.bitgen.lock`` exclusively (non-blocking acquire)."""

    def __init__(self, run_dir: str | Path, command: str = "train"):
        self.path = Path(run_dir) / LOCK_NAME
        self.command = command
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock or raise RunLockedError naming the holder; creates the run directory."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(os.read(fd, 4096))
            os.close(fd)
            raise RunLockedError(
                f"run directory {self.path.parent} is in use by {holder}; wait for it to finish "
                "or stop it, or choose another --run-dir"
            ) from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _describe(raw: bytes) -> str:
    try:
        info = json.loads(raw.decode())
        return (f"bitgen {info['command']} (PID {info['pid']} on host {info['host']}, "
                f"since {info['since']})")
    except (ValueError, KeyError, TypeError):  # the holder has not written its details yet
        return "another bitgen process"
