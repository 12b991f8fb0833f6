"""Stop requests by signal: SIGUSR1 (SLURM's pre-emption warning) and SIGTERM.

The handler only records the signal; the training loop polls `StopRequest.agreed()`
at each step boundary. A signal may reach only some ranks (SLURM may forward it to a
single task, a user may `kill` one pid), so the ranks all-reduce the max of their
flags: if any rank was signalled, every rank saves the checkpoint and exits together
instead of the others hanging in the next collective.
"""
from __future__ import annotations

import signal

# No torch import at module level: pretrain.py installs the handlers before anything
# heavy is imported, so a pre-emption signal during start-up is recorded, not fatal.

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopRequest:
    def __init__(self, signals=STOP_SIGNALS):
        self.signum = 0
        self._previous = {}
        for s in signals:
            self._previous[s] = signal.signal(s, self._handle)

    def _handle(self, signum, frame) -> None:
        # Keep the first signal: a SIGTERM following a SIGUSR1 changes nothing.
        self.signum = self.signum or signum

    def agreed(self, device) -> int:
        """The signal number any rank received (0: none). A collective: call on every rank."""
        import torch
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.signum
        flag = torch.tensor([self.signum], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name
