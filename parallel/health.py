"""Which rank is gone, when a collective fails.

Collectives run under the recipe's `parallel.timeout_seconds`, so a dead or stuck peer ends a
step with an error instead of a hang; gloo and NCCL only say a connection closed or timed out.
Each rank therefore keeps a counter in the rendezvous store (MASTER_ADDR:MASTER_PORT, the store
torchrun and `init_process_group` already use), bumped by a daemon thread every `period` seconds,
and records the step it starts. After a failed collective `diagnose` reads every counter twice,
a few periods apart: a rank whose counter did not move is dead, one whose step is behind is stuck.
"""

from __future__ import annotations

import datetime
import os
import threading
import time

import torch.distributed as dist


class RankFailure(RuntimeError):
    pass


class Heartbeat:
    def __init__(self, rank: int, world: int, period: float = 0.5):
        self.rank, self.world, self.period = rank, world, period
        self._stop = threading.Event()
        self.store = self._client()
        self.store.set(self._key("step", rank), "0")
        self._thread = threading.Thread(target=self._run, name="longctx-heartbeat", daemon=True)
        self._thread.start()

    @staticmethod
    def _client() -> dist.TCPStore:
        return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                             timeout=datetime.timedelta(seconds=10), wait_for_workers=False)

    @staticmethod
    def _key(kind: str, rank: int) -> str:
        return f"longctx/health/{kind}/{rank}"

    def _run(self) -> None:
        key = self._key("beat", self.rank)
        while not self._stop.wait(self.period):
            try:
                self.store.add(key, 1)
            except Exception:  # noqa: BLE001 - the store's host is gone: diagnose reports it
                return

    def step(self, step: int) -> None:
        self.store.set(self._key("step", self.rank), str(step))

    def stop(self) -> None:
        """Ends the thread and drops the store client before the process group goes away."""
        self._stop.set()
        self._thread.join(timeout=5 * self.period)
        self.store = None

    def diagnose(self, step: int) -> str:
        """A sentence naming the ranks that are dead (no heartbeat) or behind `step`."""
        try:
            probe = self._client()
            before = [probe.add(self._key("beat", r), 0) for r in range(self.world)]
            time.sleep(4 * self.period)
            after = [probe.add(self._key("beat", r), 0) for r in range(self.world)]
            steps = [int(probe.get(self._key("step", r))) for r in range(self.world)]
        except Exception as e:  # noqa: BLE001
            return f"the rendezvous store at {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} is " \
                   f"unreachable ({type(e).__name__}): rank 0's host or the launcher is gone"
        dead = [r for r in range(self.world) if r != self.rank and after[r] == before[r]]
        behind = [r for r in range(self.world) if r not in dead and r != self.rank and steps[r] < step]
        parts = []
        if dead:
            parts.append(f"rank{'s' if len(dead) > 1 else ''} {', '.join(map(str, dead))} stopped responding "
                         f"(process gone; last started step {', '.join(str(steps[r]) for r in dead)})")
        if behind:
            parts.append(f"rank{'s' if len(behind) > 1 else ''} {', '.join(map(str, behind))} still at step "
                         f"{', '.join(str(steps[r]) for r in behind)}")
        return "; ".join(parts)
