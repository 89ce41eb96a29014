"""Signals and several-device failures: a run ends with its real cause in ``run.json`` and one console line.

* SIGTERM / SIGINT raise :class:`Stopped` in the main thread (exit 143 / 130, "terminated by SIGTERM" /
  "interrupted"), instead of Lightning's exit 0 (SIGTERM) or a ``KeyboardInterrupt`` turned into exit 1.
* A child rank that raises writes ``run.rank<r>.json`` (its one-line error and traceback) before it exits; rank 0
  reports that cause instead of its own "Connection closed by peer".
* Lightning's child-process observer SIGKILLs rank 0 as soon as a child exits non-zero, so ``run.json`` stayed
  ``running``. :class:`RankObserver` replaces it: it stops the other children and raises
  :class:`RankFailedError` in rank 0 (via SIGUSR2), naming the failed rank and its cause ("killed by SIGKILL"
  when it left no file), so rank 0 records it. If rank 0 does not react within ``GRACE_S`` seconds it is killed
  as Lightning would.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

from vlmad.errors import one_line
from vlmad.io import atomic_write_json

GRACE_S = 60.0  # rank 0 gets this long to record a child's failure before it is killed
POLL_S = 1.0
FAILURE_GLOB = "run.rank*.json"


class Stopped(BaseException):
    """A signal (SIGTERM, SIGINT) ended the run; ``exit_code`` follows the 128 + signal convention."""

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        self.exit_code = 128 + self.signum
        name = signal.Signals(signum).name
        super().__init__("interrupted (SIGINT)" if self.signum == signal.SIGINT else f"terminated by {name}")


class RankFailedError(Exception):
    """Another rank of this run failed or was killed (raised in rank 0 by the observer)."""


def failure_file(out_dir: str | os.PathLike, rank: int) -> Path:
    """Where rank ``rank`` (> 0) records why it failed."""
    return Path(out_dir) / f"run.rank{rank}.json"


def record_rank_failure(out_dir: str | os.PathLike, rank: int, err: BaseException) -> None:
    """A child rank's error (one line and traceback) for rank 0 to report; never raises."""
    with contextlib.suppress(OSError):
        tb = "".join(traceback.format_exception(type(err), err, err.__traceback__))
        atomic_write_json(failure_file(out_dir, rank), {"rank": rank, "error": one_line(err), "traceback": tb})


def clear_rank_failures(out_dir: str | os.PathLike) -> None:
    """Remove the failure files of an earlier run into the same folder (rank 0, before any child starts)."""
    for path in Path(out_dir).glob(FAILURE_GLOB):
        path.unlink(missing_ok=True)


def _exit_cause(rank: int, code: int) -> str:
    if code < 0:
        return f"rank {rank} was killed by {signal.Signals(-code).name}"
    return f"rank {rank} exited with code {code}"


class RankObserver(threading.Thread):
    """Watches the child ranks Lightning started (in place of its ``_ChildProcessObserver``).

    Args:
        procs: the child processes (rank r = index + 1).
        out_dir: the run folder, where children leave ``run.rank<r>.json``.
    """

    active: RankObserver | None = None

    def __init__(self, procs: list[subprocess.Popen], out_dir: str | os.PathLike) -> None:
        super().__init__(daemon=True, name="vlmad-rank-observer")
        self.procs, self.out_dir, self.main_pid = procs, Path(out_dir), os.getpid()
        self.cause: str | None = None
        self.standing_down = threading.Event()  # rank 0 is already failing or done: nothing to do

    def run(self) -> None:
        """Poll the children; on the first non-zero exit stop the others and signal rank 0."""
        while not self.standing_down.wait(POLL_S):
            codes = [p.poll() for p in self.procs]
            if all(c == 0 for c in codes):
                return
            failed = [(r, c) for r, c in enumerate(codes, start=1) if c not in (None, 0)]
            if not failed:
                continue
            self.cause = self.child_cause() or _exit_cause(*failed[0])
            self.stop_children()
            if self.standing_down.is_set():
                return
            with contextlib.suppress(OSError):
                os.kill(self.main_pid, signal.SIGUSR2)
            if not self.standing_down.wait(GRACE_S):  # rank 0 did not react (stuck): Lightning's remedy
                os.kill(self.main_pid, signal.SIGKILL)
            return

    def child_cause(self) -> str | None:
        """The first recorded child error, as ``rank r: <Type: message>``; else a child's exit by a signal."""
        for rank in range(1, len(self.procs) + 1):
            path = failure_file(self.out_dir, rank)
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                return f"rank {rank}: {json.loads(path.read_text())['error']}"
        codes = [(r, p.poll()) for r, p in enumerate(self.procs, start=1)]
        killed = [(r, c) for r, c in codes if c is not None and c < 0 and c != -signal.SIGKILL]
        killed += [(r, c) for r, c in codes if c == -signal.SIGKILL]
        return _exit_cause(*killed[0]) if killed else None

    def settle(self, wait_s: float = 5.0) -> str | None:
        """Rank 0 is failing: wait briefly for a failed child to exit, stand down, return the child's cause."""
        self.standing_down.set()
        deadline = time.monotonic() + wait_s
        cause = self.child_cause()
        while cause is None and time.monotonic() < deadline and any(p.poll() is None for p in self.procs):
            time.sleep(0.1)
            cause = self.child_cause()
        self.stop_children()
        return cause or self.cause

    def stop_children(self) -> None:
        """SIGKILL the children still running (they would wait on rank 0 forever)."""
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(OSError):
                    p.kill()


def _raise_rank_failed(signum: int, frame: object) -> None:
    observer = RankObserver.active
    raise RankFailedError((observer.cause if observer else None) or "another rank failed")


def _stop(signum: int, frame: object) -> None:
    # the first signal stops the run; later ones are ignored, so the failure is recorded once
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    raise Stopped(signum)


@contextlib.contextmanager
def watched(out_dir: str | os.PathLike) -> Iterator[None]:
    """Install the handlers above (main thread only) and Lightning's child observer replacement; restore on exit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    from lightning.pytorch.strategies.launchers import subprocess_script

    def launch_observer(procs: list[subprocess.Popen]) -> None:
        RankObserver.active = RankObserver(procs, out_dir)
        RankObserver.active.start()

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)}
    lightning_observer = subprocess_script._launch_process_observer
    subprocess_script._launch_process_observer = launch_observer
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGUSR2, _raise_rank_failed)
    try:
        yield
    finally:
        subprocess_script._launch_process_observer = lightning_observer
        for sig, handler in saved.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
