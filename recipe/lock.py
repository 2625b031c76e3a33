"""One run per --output_dir: a lock file naming the host and process that hold it.

The main process creates OUTPUT_DIR/.run.lock (O_EXCL: of two starting together one wins) with
its host name and PID, and removes it when the run ends, however it ends short of SIGKILL. While
it holds the lock, one thread of the main process touches the file every REFRESH_SECONDS (its
modification time: the run is alive, through every phase, data validation and evaluation too).
A lock left by a process that no longer runs on this host (killed, node rebooted) is taken over
with a warning, and so is another host's lock not refreshed for STALE_SECONDS (a run killed there,
a lost node: its processes cannot be checked from here); a lock held by a live process on this
host, or refreshed lately by another host, stops the new run at once with one line. Only the
main process touches the file; the others learn the outcome from it (a broadcast), so every rank
stops together.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

from .errors import UserError

__all__ = ["LOCK_FILE", "REFRESH_SECONDS", "STALE_SECONDS", "OutputDirLock"]

logger = logging.getLogger("recipe")

LOCK_FILE = ".run.lock"
REFRESH_SECONDS = 30
# Another host's lock untouched this long is a dead run's (ten refreshes missed: room for a busy
# shared file system and the hosts' clocks differing by minutes).
STALE_SECONDS = 300


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class OutputDirLock:
    """acquire() / release(); `path` is OUTPUT_DIR/.run.lock."""

    def __init__(self, output_dir: str | Path, refresh_seconds: float = REFRESH_SECONDS):
        self.path = Path(output_dir) / LOCK_FILE
        self.held = False
        self.refresh_seconds = refresh_seconds
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None

    def _write(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "w") as f:
            json.dump({"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")},
                      f)
        self.held = True
        self._start_refreshing()

    def _start_refreshing(self) -> None:
        """One daemon thread for the run: touches the lock file every refresh_seconds until release()."""
        if self._refresher is not None and self._refresher.is_alive():
            return
        self._stop.clear()
        self._refresher = threading.Thread(target=self._refresh_until_released, name="output-dir-lock", daemon=True)
        self._refresher.start()

    def _refresh_until_released(self) -> None:
        while not self._stop.wait(self.refresh_seconds):
            try:
                os.utime(self.path)
            except OSError:  # (deleted by hand, or the file system away for a moment: the next try)
                pass

    def _age(self) -> float | None:
        """Seconds since the holder last refreshed the lock file (None: gone)."""
        try:
            return max(time.time() - self.path.stat().st_mtime, 0.0)
        except OSError:
            return None

    def _holder(self) -> dict:
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}  # (being written this instant, or garbage: treated as held by an unknown process)

    def acquire(self) -> str | None:
        """Takes the lock; returns None, or why not (one line)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                self._write()
                return None
            except FileExistsError:
                holder = self._holder()
            host, pid = holder.get("host"), holder.get("pid")
            age = self._age()
            if host == socket.gethostname() and isinstance(pid, int) and not _alive(pid):
                logger.warning("%s: taking over the lock of process %d on %s, which no longer runs (a run that "
                               "was killed); its checkpoints are resumed as usual", self.path, pid, host)
                self.path.unlink(missing_ok=True)
                continue
            if host != socket.gethostname() and age is not None and age > STALE_SECONDS:
                logger.warning("%s: taking over the lock of process %s on %s, not refreshed for %.0f s (over %d s: "
                               "a run killed there, or a lost node); its checkpoints are resumed as usual",
                               self.path, pid, host or "an unknown host", age, STALE_SECONDS)
                self.path.unlink(missing_ok=True)
                continue
            if host == socket.gethostname() and pid == os.getpid():
                self.held = True  # (run() called twice in one process, e.g. in a notebook)
                self._start_refreshing()
                return None
            who = f"process {pid} on {host} since {holder.get('since', '?')}" if holder else "an unknown process"
            if age is not None and host != socket.gethostname():
                who += f", refreshed {age:.0f} s ago; taken over after {STALE_SECONDS} s without"
            return (f"--output_dir {self.path.parent} is in use by another run ({who}; lock file {self.path}); wait for "
                    "it to finish or choose another --output_dir (delete the lock file only if that run is gone)")
        return f"--output_dir {self.path.parent}: could not take the lock {self.path}"

    def release(self) -> None:
        self._stop.set()
        if self._refresher is not None:
            self._refresher.join()
            self._refresher = None
        if self.held:
            holder = self._holder()
            if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
                self.path.unlink(missing_ok=True)
            self.held = False


def lock_output_dir(output_dir: str | Path) -> OutputDirLock:
    """The main process takes the lock, every rank gets its answer; raises UserError on every rank
    if the directory is in use."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    state = PartialState()
    lock = OutputDirLock(output_dir)
    problem = [lock.acquire() if state.is_main_process else None]
    if state.num_processes > 1:
        broadcast_object_list(problem, from_process=0)
    if problem[0]:
        raise UserError(problem[0], everywhere=True)
    return lock
