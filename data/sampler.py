"""Variable sequence length curriculum over decomposition buckets (arXiv 2405.13226, §2.2-2.3).

Every optimizer step draws one bucket (the same on every rank) and `tokens_per_step / L` rows of
length L, so the token budget is fixed while length and batch vary. The order of buckets within
an epoch follows a curriculum:
  natural   buckets drawn in proportion to their remaining batches (a random interleave)
  grow_p2   the paper's best: odds proportional to 2^(max-k) (short first), cycled `cycles` times
  fixed     one bucket length only (`fixed_len`)
  weights   user odds per length, cycled like grow_p2
Each epoch a bucket's pieces are permuted from (seed, epoch, L); step s takes the next batch of
that permutation, and data-parallel rank r takes every world-th row of it. The whole stream is a
function of (seed, step), so `state_dict()` is the step and a resumed run continues with exactly
the next batch.

Sequence parallelism per bucket: a bucket too short to give every rank of the sp group
`min_tokens_per_sp_rank` tokens runs at the largest divisor sp' of sp that does, and the sp/sp'
sub-groups take different rows (`row_group`). Any sp works: a length that 2*sp' does not divide
is padded by parallel/layout.py after its last real token, with ignored labels.
"""

from __future__ import annotations

from array import array

import numpy as np

SCHEDULES = ("natural", "grow_p2", "fixed", "weights")


class SamplerError(ValueError):
    pass


def sp_for_length(L: int, sp: int, min_tokens_per_sp_rank: int) -> int:
    """The largest divisor sp' of sp with L // sp' >= min_tokens_per_sp_rank (1 if none larger).

    A divisor, so the sp group splits into sp/sp' whole sub-groups of consecutive ranks."""
    return max(s for s in range(1, sp + 1) if sp % s == 0 and (s == 1 or L // s >= min_tokens_per_sp_rank))


def row_group(dp_rank: int, sp_rank: int, sp: int, sp_eff: int) -> int:
    """Which row group a rank serves when the bucket runs at sp_eff <= sp: the sp group splits into sp/sp_eff."""
    return dp_rank * (sp // sp_eff) + sp_rank // sp_eff


class _Plan:
    """An epoch's (bucket length, batch index) per step as two int64 arrays (16 bytes a step; a list
    of tuples is ~80, and a large corpus's epoch has millions of steps)."""

    def __init__(self) -> None:
        self.lengths, self.batches = array("q"), array("q")

    def append(self, item: tuple[int, int]) -> None:
        self.lengths.append(item[0])
        self.batches.append(item[1])

    def done(self) -> _Plan:
        self.lengths = np.frombuffer(self.lengths, dtype=np.int64).copy()
        self.batches = np.frombuffer(self.batches, dtype=np.int64).copy()
        return self

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, pos: int) -> tuple[int, int]:
        return int(self.lengths[pos]), int(self.batches[pos])


class CurriculumSampler:
    def __init__(self, buckets: dict[int, int], tokens_per_step: int, schedule: str = "grow_p2",
                 rank: int = 0, world: int = 1, seed: int = 0, cycles: int = 8,
                 weights: dict[int, float] | None = None, fixed_len: int | None = None,
                 sp: int = 1, min_tokens_per_sp_rank: int = 1) -> None:
        if schedule not in SCHEDULES:
            raise SamplerError(f"schedule={schedule!r}: expected one of {SCHEDULES}")
        self.sizes = {int(L): int(n) for L, n in sorted(buckets.items()) if n}
        self.tokens_per_step, self.schedule, self.seed = tokens_per_step, schedule, seed
        self.rank, self.world, self.cycles = rank, world, max(1, cycles)
        self.sp, self.min_tokens_per_sp_rank = sp, min_tokens_per_sp_rank
        if schedule == "fixed":
            if fixed_len not in self.sizes:
                raise SamplerError(f"fixed_len={fixed_len}: no bucket of that length (have {list(self.sizes)})")
            self.sizes = {fixed_len: self.sizes[fixed_len]}
        self.batches_per_epoch: dict[int, int] = {}
        for L, n in self.sizes.items():
            if tokens_per_step % L:
                raise SamplerError(f"tokens_per_step={tokens_per_step}: not a multiple of bucket length {L}")
            rows = tokens_per_step // L
            groups = world * (sp // sp_for_length(L, sp, min_tokens_per_sp_rank))
            if rows % groups:
                raise SamplerError(
                    f"tokens_per_step={tokens_per_step}: a step of length {L} has {rows} rows, which the "
                    f"{groups} row groups cannot share evenly; use tokens_per_step >= max_len x dp ranks"
                )
            if n // rows:
                self.batches_per_epoch[L] = n // rows
        if not self.batches_per_epoch:
            raise SamplerError(f"no bucket holds a full step of tokens_per_step={tokens_per_step} tokens")
        log_max = max(self.sizes).bit_length() - 1
        if schedule == "weights":
            missing = set(self.batches_per_epoch) - set(weights or {})
            if missing:
                raise SamplerError(f"weights: no weight for bucket length(s) {sorted(missing)}")
            self.odds = {L: float(weights[L]) for L in self.batches_per_epoch}
        else:
            self.odds = {L: 2.0 ** (log_max - (L.bit_length() - 1)) for L in self.batches_per_epoch}
        self.steps_per_epoch = sum(self.batches_per_epoch.values())
        self.step = 0
        self._plans: dict[int, _Plan] = {}
        self._permutations: dict[int, tuple[int, np.ndarray]] = {}

    # --- the plan of one epoch -------------------------------------------------------------------
    def _plan(self, epoch: int) -> _Plan:
        """[(L, batch index within the bucket's epoch permutation)] in step order."""
        if epoch in self._plans:
            return self._plans[epoch]
        rng = np.random.default_rng([self.seed, epoch, 7])
        lengths = list(self.batches_per_epoch)
        cycles = 1 if self.schedule in ("natural", "fixed") else self.cycles
        plan = _Plan()
        next_batch = {L: 0 for L in lengths}
        for cycle in range(cycles):
            # a bucket's batches in this cycle: np.array_split's sizes (the first n % cycles get one more)
            in_cycle = {L: n // cycles + (cycle < n % cycles) for L, n in self.batches_per_epoch.items()}
            left = dict(in_cycle)
            while any(left.values()):
                live = [L for L in lengths if left[L]]
                if self.schedule == "natural":
                    w = np.array([left[L] for L in live], dtype=float)
                elif self.schedule == "fixed":
                    w = np.ones(len(live))
                else:  # mix weights fixed per cycle: batches in the cycle x odds; exhausted buckets drop out
                    w = np.array([self.odds[L] * in_cycle[L] for L in live], dtype=float)
                L = live[int(rng.choice(len(live), p=w / w.sum()))]
                plan.append((L, next_batch[L]))
                next_batch[L] += 1
                left[L] -= 1
        self._plans = {epoch: plan.done()}  # keep one epoch cached
        return plan

    def _permutation(self, L: int, epoch: int) -> np.ndarray:
        cached = self._permutations.get(L)
        if cached is None or cached[0] != epoch:  # one per bucket: drawn once an epoch, not every step
            cached = self._permutations[L] = (epoch, np.random.default_rng([self.seed, epoch, L]).permutation(self.sizes[L]))
        return cached[1]

    # --- per step --------------------------------------------------------------------------------
    def length_at(self, step: int) -> int:
        """The bucket length of 0-based optimizer step `step` (what the console's ETA sums over)."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        return self._plan(epoch)[pos][0]

    def step_rows(self, step: int) -> tuple[int, np.ndarray]:
        """(L, piece indices of every row of step `step`, all ranks together)."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        L, b = self._plan(epoch)[pos]
        rows_per_step = self.tokens_per_step // L
        return L, self._permutation(L, epoch)[b * rows_per_step : (b + 1) * rows_per_step]

    def batch_at(self, step: int, dp_rank: int | None = None, sp_rank: int = 0) -> tuple[int, np.ndarray, int]:
        """(L, piece indices of this rank's rows, sp_eff) for 0-based optimizer step `step`."""
        L, rows = self.step_rows(step)
        sp_eff = sp_for_length(L, self.sp, self.min_tokens_per_sp_rank)
        groups = self.world * (self.sp // sp_eff)
        group = row_group(self.rank if dp_rank is None else dp_rank, sp_rank, self.sp, sp_eff)
        return L, rows[group::groups], sp_eff

    def __iter__(self):
        return self

    def __next__(self) -> tuple[int, np.ndarray, int]:
        out = self.batch_at(self.step)
        self.step += 1
        return out

    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed, "schedule": self.schedule,
                "tokens_per_step": self.tokens_per_step, "sizes": {str(k): v for k, v in self.sizes.items()}}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("seed", "schedule", "tokens_per_step", "sizes"):
            if state.get(key) != mine[key]:
                raise SamplerError(
                    f"sampler state was saved with {key}={state.get(key)!r} but this run has {mine[key]!r}; "
                    "resume with the same data settings"
                )
        self.step = int(state["step"])
