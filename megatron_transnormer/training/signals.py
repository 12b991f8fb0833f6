"""Stop requests by signal: SIGUSR1 (SLURM's pre-emption warning) and SIGTERM.

The handler only records the signal; the training loop checks it at each step boundary
(and between validation batches), in an all-reduce of the max of every rank's flag: a
signal may reach only some ranks (SLURM may forward it to a single task, a user may
`kill` one pid), and if any rank was signalled, every rank saves the checkpoint and exits
together instead of the others hanging in the next collective.

A run can be stuck where no boundary comes: a rank blocked in data loading (a `pipe:`
shard command that never returns) or waiting in a collective for such a rank. So the
first stop signal also starts a deadline, `grace_s` seconds (`train.stop_grace_s`), and
the process ends itself when

  * no step boundary acknowledged the signal (`acknowledge`) before the deadline; time
    spent writing a checkpoint (`holding`) does not count; or
  * a second stop signal arrives before that boundary (after it, the checkpoint is being
    written and further signals change nothing).

It then says why and what the run was doing (`phase`), kills its child processes (shard
pipe commands, loader workers, which would outlive it) and exits 0 when nothing was
trained since the last checkpoint (`unsaved` is false: the checkpoint on disk is the
run's state, and the launcher may requeue the job), else 128 + the signal number.

Python runs signal handlers in the main thread between bytecodes, so a signal reaching a
rank blocked inside a collective is seen when the collective returns: at the latest after
`train.collective_timeout_s`, when it fails. A blocking read (the pipe of a shard
command) is interrupted and the handler runs at once.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

# No torch import: pretrain.py installs the handlers before anything heavy is imported, so
# a pre-emption signal during start-up is recorded, not fatal.

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
DEFAULT_GRACE_S = 120.0  # train.stop_grace_s's default, in force until the config is read


class StopRequest:
    def __init__(self, signals=STOP_SIGNALS, grace_s: float = DEFAULT_GRACE_S):
        self.signum = 0  # the first stop signal received (0: none)
        self.phase = "starting"  # what the run is doing; the loop keeps it current
        self.unsaved = False  # updates since the last checkpoint; the loop keeps it current
        self._grace_s = grace_s
        self._received = 0
        self._signalled_at = None  # time.monotonic() of the first signal
        self._acknowledged = False
        self._holds = 0
        self._closed = threading.Event()
        self._watchdog = None
        self._previous = {}
        for s in signals:
            self._previous[s] = signal.signal(s, self._handle)

    # ----------------------------------------------------------- signal side
    def _handle(self, signum, frame) -> None:
        self._received += 1
        if self._received == 1:
            self.signum = signum
            self._signalled_at = time.monotonic()
            self._watchdog = threading.Thread(target=self._watch, name="stop-deadline", daemon=True)
            self._watchdog.start()
        elif not self._acknowledged:
            self._escape(f"a second stop signal ({signal_name(signum)}) came before the step boundary")

    def _deadline(self) -> float | None:
        if self._signalled_at is None or self._acknowledged or self._holds:
            return None
        return self._signalled_at + self._grace_s

    def _watch(self) -> None:
        while not self._closed.wait(0.1):
            deadline = self._deadline()
            if deadline is not None and time.monotonic() >= deadline:
                self._escape(f"no step boundary came within {self._grace_s:g} s of {signal_name(self.signum)}")

    def _escape(self, why: str) -> None:
        """End the process now (from the watchdog thread or the handler), saying why."""
        name = signal_name(self.signum)
        if self.unsaved:
            code, fd = 128 + self.signum, 2
            text = (f"pretrain.py: error: {why} (the run was {self.phase}); exiting without a checkpoint: "
                    f"the updates since the last one are lost")
        else:
            code, fd = 0, 1
            text = (f"stopped while {self.phase} after signal {name}: {why}; nothing was trained since the "
                    f"last checkpoint, so there is nothing to save")
        # os.write, not print: the main thread may hold sys.stdout's lock where it is stuck.
        try:
            os.write(fd, (text + "\n").encode())
        except OSError:
            pass
        terminate_children()
        os._exit(code)

    # -------------------------------------------------------------- loop side
    @property
    def grace_s(self) -> float:
        return self._grace_s

    @grace_s.setter
    def grace_s(self, seconds: float) -> None:
        """The run's train.stop_grace_s, counted from the signal even if it came before."""
        self._grace_s = float(seconds)

    def acknowledge(self) -> None:
        """The ranks agreed to stop at this boundary: the deadline no longer applies, and
        further signals do not interrupt the checkpoint that follows."""
        self._acknowledged = True

    @contextmanager
    def holding(self):
        """Suspend the deadline while a checkpoint is written (its collectives are bounded by
        the collective timeout); afterwards at least grace_s seconds remain."""
        self._holds += 1
        try:
            yield
        finally:
            self._holds -= 1
            if self._signalled_at is not None and not self._holds:
                self._signalled_at = max(self._signalled_at, time.monotonic())

    def restore(self) -> None:
        """Put the previous handlers back and stop the deadline."""
        self._closed.set()
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def _children(pid: int) -> list[int]:
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    found = []
    for tid in tasks:
        try:
            found += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        except (OSError, ValueError):
            continue
    return found


def descendants(pid: int) -> list[int]:
    """The processes below `pid` (its children, theirs, ...), from /proc; [] where there is none."""
    pending, found = _children(pid), []
    while pending:
        child = pending.pop()
        found.append(child)
        pending += _children(child)
    return found


def terminate_children() -> None:
    """SIGKILL this process's descendants: shard commands (a `pipe:` URL runs a shell, which
    may run the command as its own child) and loader workers stuck with it would otherwise
    keep running after it exits. Linux (/proc); elsewhere nothing."""
    for pid in descendants(os.getpid()):  # the whole tree first: a killed parent's children are re-parented
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
