"""Planning for MEMO (Wu et al., arXiv 2407.12117, §4-5): alpha per layer and bucket length, and
static buffer layouts that cannot fragment.

(a) alpha. For a layer of `n` whose tokens save S_in (block input) + S_attn (attention output and
    LSE) + S_oth (everything else) bytes, MEMO swaps S_in + S_attn + alpha * S_oth and picks the
    largest alpha with
      (i)  swap bytes / link bandwidth <= one layer's forward time     (the copy hides), and
      (ii) (n - resident) * swap bytes * GPUs per node <= host memory   (host RAM is per node),
           where each GPU's pinned slab counts as the CUDA host allocator takes it: rounded up to
           a power of two, so a GPU's share M/g holds at most the largest power of two <= M/g;
    the last `resident` layers are kept on the device (their backward starts right away).
    Closed form: alpha = clip(min((B*T - S_in - S_attn) / S_oth, (M / (g*(n-r)) - S_in - S_attn) / S_oth), 0, 1).
    It depends on the length, so it is planned per bucket length.

(b) Layout. Tensors with sizes and [start, end) lifetimes get byte offsets so that no two live
    at once overlap: offline dynamic storage allocation, solved as a mixed-integer program with
    `scipy.optimize.milp` (HiGHS) under a time limit, with a greedy best-fit fallback. The peak is
    reported against the lower bound max_t(live bytes at t). `trace_block` records one block's
    forward allocations (MEMO's level-1 plan); every identical block reuses the layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import Bounds, LinearConstraint, milp

from .accounting import pinned_bytes


# --- (a) alpha -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerBytes:
    """Bytes one layer saves per token: block input, attention output + LSE, the rest."""

    inp: float
    attn: float
    other: float


@dataclass(frozen=True)
class AlphaPlan:
    alpha: float
    binding: str  # "bandwidth", "host_memory" or "none" (alpha = 1 fits both)
    swap_bytes_per_layer: float  # per GPU
    host_bytes_per_node: float


def plan_alpha(tokens_per_gpu: int, layer: LayerBytes, layer_seconds: float, link_bytes_per_s: float,
               host_bytes_per_node: float, gpus_per_node: int, num_layers: int, resident_layers: int) -> AlphaPlan:
    swapped_layers = max(num_layers - resident_layers, 0)
    fixed = (layer.inp + layer.attn) * tokens_per_gpu
    other = layer.other * tokens_per_gpu
    by_link = (link_bytes_per_s * layer_seconds - fixed) / other if other else 1.0
    if swapped_layers:
        slab = pinned_slab_limit(host_bytes_per_node / gpus_per_node)
        by_host = (slab / swapped_layers - fixed) / other if other else 1.0
    else:
        by_host = 1.0
    alpha = float(min(max(min(by_link, by_host), 0.0), 1.0))
    binding = "none" if min(by_link, by_host) >= 1.0 else ("bandwidth" if by_link <= by_host else "host_memory")
    swap = fixed + alpha * other
    return AlphaPlan(alpha, binding, swap, pinned_bytes(int(swap * swapped_layers)) * gpus_per_node)


def plan_alpha_layers(tokens_per_gpu: int, layers: list[LayerBytes], layer_seconds: list[float],
                      link_bytes_per_s: float, host_bytes_per_node: float, gpus_per_node: int) -> list[AlphaPlan]:
    """alpha for each swapped layer, layers that differ (LeMo's sparse and dense layers, another
    shape) each their own. Each layer's alpha is capped by its own link budget, (i) above for that
    layer (its copy hides under its own forward). Host memory (ii) is shared: when the caps
    overflow the pinned slab, what is left after every layer's input and attention bytes goes
    first to the layers that save the most recompute time per kept byte (forward seconds per
    byte of `other`), equal alphas among layers alike (water-filling). Identical layers get
    `plan_alpha`'s alpha."""
    n = len(layers)
    if n == 0:
        return []
    slab = pinned_slab_limit(host_bytes_per_node / gpus_per_node)
    fixed = [(lb.inp + lb.attn) * tokens_per_gpu for lb in layers]
    other = [lb.other * tokens_per_gpu for lb in layers]
    caps = [min(max((link_bytes_per_s * t - f) / o, 0.0), 1.0) if o else 1.0
            for t, f, o in zip(layer_seconds, fixed, other)]
    alphas, binding = list(caps), ["bandwidth" if c < 1.0 else "none" for c in caps]
    left = slab - sum(fixed)
    if sum(f + c * o for f, c, o in zip(fixed, caps, other)) > slab:
        alphas = [0.0] * n
        # groups of equal density, densest first; within a group, raise every alpha alike until
        # one reaches its cap or the bytes run out
        density = [t / o if o else float("inf") for t, o in zip(layer_seconds, other)]
        for i in range(n):
            if not other[i]:  # nothing beyond input and attention: alpha 1 costs no bytes
                alphas[i] = caps[i]
        for d in sorted({d for d, o in zip(density, other) if o}, reverse=True):
            group = [i for i in range(n) if density[i] == d and other[i]]
            while group and left > 0:
                level = left / sum(other[i] for i in group)
                step = min(level, *(caps[i] - alphas[i] for i in group))
                for i in group:
                    alphas[i] += step
                left -= step * sum(other[i] for i in group)
                group = [i for i in group if alphas[i] < caps[i] - 1e-12]
                if step == level:
                    break
        for i in range(n):
            if alphas[i] >= caps[i] - 1e-12:
                binding[i] = "bandwidth" if caps[i] < 1.0 else "none"
            else:
                binding[i] = "host_memory"
        alphas = [max(a, 0.0) for a in alphas]
    swaps = [f + a * o for f, a, o in zip(fixed, alphas, other)]
    host = pinned_bytes(int(sum(swaps))) * gpus_per_node
    return [AlphaPlan(a, b, sw, host) for a, b, sw in zip(alphas, binding, swaps)]


def pinned_slab_limit(host_bytes_per_gpu: float) -> float:
    """The largest pinned slab whose power-of-two rounding fits in a GPU's share of host memory."""
    return float(pinned_bytes(int(host_bytes_per_gpu) + 1) // 2) if host_bytes_per_gpu >= 1 else 0.0


class MemoPlanner:
    """The policy source for MEMO-wrapped blocks: `for_layer(i)` is called with a block's tokens
    (rows x local length) and returns its LayerPolicy, alpha planned once per token count (i.e.
    per bucket) and per layer (`plan_alpha_layers`: layers that differ get their own; `layers`
    gives each swapped layer's bytes, all `layer` by default) or fixed. Calling the planner itself
    is the first layer's source. Keeps the last plan for the trainer's metrics."""

    def __init__(self, layer: LayerBytes, params_per_layer: int, attn_width: int, num_layers: int,
                 resident_layers: int, alpha: float | None, tier: str, sp_of, host_bytes_per_node: float,
                 link_bytes_per_s: float, flops_per_s: float, gpus_per_node: int, input_dtype=None,
                 layers: list[LayerBytes] | None = None) -> None:
        import functools

        from .offload import LayerPolicy

        self._policy = functools.partial(LayerPolicy, input_dtype=input_dtype)
        swapped = max(num_layers - resident_layers, 0)
        self.layers = list(layers) if layers is not None else [layer] * swapped
        if len(self.layers) != swapped:
            raise ValueError(f"{len(self.layers)} layers' bytes for {swapped} swapped layers")
        self.layer, self.params_per_layer, self.attn_width = layer, params_per_layer, attn_width
        self.num_layers, self.resident_layers, self.alpha, self.tier = num_layers, resident_layers, alpha, tier
        self.sp_of = sp_of
        self.hw = (host_bytes_per_node, link_bytes_per_s, flops_per_s, gpus_per_node)
        self.pool = None
        self.last: AlphaPlan | None = None
        self._cache: dict = {}

    def plan(self, tokens: int, seq_len: int) -> AlphaPlan:
        host, link, flops, gpus = self.hw
        seconds = (2.0 * self.params_per_layer * tokens + 2.0 * tokens * seq_len * self.attn_width) / flops
        return plan_alpha(tokens, self.layer, seconds, link, host, gpus, self.num_layers, self.resident_layers)

    def resident(self):
        """The policy source for the last blocks: the planned alpha, on the device tier."""
        def policy(tokens: int):
            return self._policy(self(tokens).alpha, "device")
        return policy

    def plans(self, tokens: int, seq_len: int) -> list[AlphaPlan]:
        """Each swapped layer's plan."""
        host, link, flops, gpus = self.hw
        seconds = (2.0 * self.params_per_layer * tokens + 2.0 * tokens * seq_len * self.attn_width) / flops
        return plan_alpha_layers(tokens, self.layers, [seconds] * len(self.layers), link, host, gpus)

    def for_layer(self, index: int):
        """The policy source of the swapped layer `index`."""
        def policy(tokens: int):
            sp = self.sp_of()
            key = (tokens, sp)
            if key not in self._cache:
                if self.alpha is None:  # one row per bucket step is the worst case
                    plans = self.plans(tokens, tokens * sp) if self.layers else [self.plan(tokens, tokens * sp)]
                else:
                    swaps = [(lb.inp + lb.attn + self.alpha * lb.other) * tokens for lb in self.layers or [self.layer]]
                    host = sum(swaps) if self.layers else 0.0  # no swapped layer: nothing on the host
                    plans = [AlphaPlan(self.alpha, "fixed", sw, host) for sw in swaps]
                self._cache[key] = [(p, self._policy(p.alpha, self.tier)) for p in plans]
            entries = self._cache[key]
            self.last, chosen = entries[min(index, len(entries) - 1)]
            return chosen
        return policy

    def __call__(self, tokens: int):
        return self.for_layer(0)(tokens)


# --- (b) layout ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    offsets: list[int]
    peak: int
    lower_bound: int
    method: str  # "milp" (optimal or best found in the time limit) or "greedy"


def _overlapping_pairs(lifetimes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    return [(i, j) for i in range(len(lifetimes)) for j in range(i + 1, len(lifetimes))
            if lifetimes[i][0] < lifetimes[j][1] and lifetimes[j][0] < lifetimes[i][1]]


def lower_bound(sizes: list[int], lifetimes: list[tuple[int, int]]) -> int:
    events = sorted({t for s, e in lifetimes for t in (s, e)})
    return max((sum(sz for sz, (s, e) in zip(sizes, lifetimes) if s <= t < e) for t in events), default=0)


def greedy_layout(sizes: list[int], lifetimes: list[tuple[int, int]]) -> list[int]:
    """Largest first; each at the lowest offset clear of the already-placed tensors it overlaps."""
    offsets = [0] * len(sizes)
    placed: list[int] = []
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], lifetimes[i])):
        s, e = lifetimes[i]
        busy = sorted((offsets[j], offsets[j] + sizes[j]) for j in placed
                      if lifetimes[j][0] < e and s < lifetimes[j][1])
        at = 0
        for lo, hi in busy:
            if at + sizes[i] <= lo:
                break
            at = max(at, hi)
        offsets[i] = at
        placed.append(i)
    return offsets


def check_layout(sizes, lifetimes, offsets) -> None:
    """Raises if two tensors that are live at the same time overlap in memory."""
    for i, j in _overlapping_pairs(lifetimes):
        if offsets[i] < offsets[j] + sizes[j] and offsets[j] < offsets[i] + sizes[i]:
            raise AssertionError(f"tensors {i} and {j} overlap in time and in memory")


def plan_layout(sizes: list[int], lifetimes: list[tuple[int, int]], time_limit_s: float = 10.0,
                method: str = "auto") -> Layout:
    """Offsets minimising the peak: min M s.t. A_i + S_i <= M, and for every pair live at once,
    A_i + S_i <= A_j + C z_ij and A_j + S_j <= A_i + C (1 - z_ij), z binary, C = the greedy peak. `method`: auto (skip the MIP when greedy already meets the lower
    bound), milp (always solve; greedy only if the MIP finds nothing better), greedy."""
    n = len(sizes)
    lb = lower_bound(sizes, lifetimes)
    greedy = greedy_layout(sizes, lifetimes)
    g_peak = max((o + s for o, s in zip(greedy, sizes)), default=0)
    pairs = _overlapping_pairs(lifetimes)
    if method == "greedy" or n == 0 or not pairs or (method == "auto" and g_peak == lb):
        return Layout(greedy, g_peak, lb, "greedy")
    # variables: A_0..A_{n-1}, M, z_0..z_{p-1}
    nv = n + 1 + len(pairs)
    cap = float(g_peak)
    rows, lo, hi = [], [], []
    for i in range(n):  # A_i - M <= -S_i
        r = np.zeros(nv)
        r[i], r[n] = 1, -1
        rows.append(r), lo.append(-np.inf), hi.append(-sizes[i])
    for p, (i, j) in enumerate(pairs):
        r = np.zeros(nv)  # A_i - A_j - C z <= -S_i
        r[i], r[j], r[n + 1 + p] = 1, -1, -cap
        rows.append(r), lo.append(-np.inf), hi.append(-sizes[i])
        r = np.zeros(nv)  # A_j - A_i + C z <= C - S_j
        r[j], r[i], r[n + 1 + p] = 1, -1, cap
        rows.append(r), lo.append(-np.inf), hi.append(cap - sizes[j])
    c = np.zeros(nv)
    c[n] = 1
    integrality = np.r_[np.zeros(n + 1), np.ones(len(pairs))]
    ub = np.r_[np.full(n, cap), cap, np.ones(len(pairs))]
    lb_vars = np.zeros(nv)
    lb_vars[n] = lb  # M >= max live bytes: the solver stops as soon as it reaches the bound
    res = milp(c, constraints=LinearConstraint(np.array(rows), lo, hi), integrality=integrality,
               bounds=Bounds(lb_vars, ub), options={"time_limit": time_limit_s})
    if res.x is None:
        return Layout(greedy, g_peak, lb, "greedy")
    offsets = [int(round(a)) for a in res.x[:n]]
    peak = max(o + s for o, s in zip(offsets, sizes))
    try:
        check_layout(sizes, lifetimes, offsets)
    except AssertionError:  # rounding of a non-optimal incumbent: keep the greedy one
        return Layout(greedy, g_peak, lb, "greedy")
    if peak > g_peak:
        return Layout(greedy, g_peak, lb, "greedy")
    return Layout(offsets, peak, lb, "milp")


# --- the allocation trace of one block -----------------------------------------------------------
def trace_block(block: torch.nn.Module, *args, backward: bool = True) -> tuple[list[int], list[tuple[int, int]]]:
    """(sizes, lifetimes) of the storages one block's forward (and backward, with a gradient of
    ones) creates, from the op that makes a storage to its last use; with backward=False, what
    autograd saves lives to the end of the forward (MEMO's level-1 forward request sequence).
    Op granularity, as a caching allocator sees the requests."""
    from torch.utils._python_dispatch import TorchDispatchMode

    born: dict[int, tuple[int, int]] = {}  # storage ptr -> (op index, bytes)
    last: dict[int, int] = {}
    keep: list = []  # hold every tensor so addresses are unique during the trace
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}

    class Trace(TorchDispatchMode):
        op = 0

        def __torch_dispatch__(self, func, types, a=(), kw=None):
            out = func(*a, **(kw or {}))
            Trace.op += 1
            for t in torch.utils._pytree.tree_leaves((a, kw)):
                if isinstance(t, torch.Tensor):
                    last[t.untyped_storage().data_ptr()] = Trace.op
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    ptr = t.untyped_storage().data_ptr()
                    if ptr not in born and ptr not in params and ptr not in inputs:
                        born[ptr] = (Trace.op, t.untyped_storage().nbytes())
                        keep.append(t)
            return out

    saved: set[int] = set()

    def pack(t):
        saved.add(t.untyped_storage().data_ptr())
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), Trace():
        y = block(*args)
        end_forward = Trace.op + 1
        if backward:
            y.backward(torch.ones_like(y))
    sizes, lifetimes = [], []
    for ptr, (start, nbytes) in born.items():
        if nbytes == 0:
            continue
        held = ptr == y.untyped_storage().data_ptr() or (not backward and ptr in saved)
        stop = max(last.get(ptr, start) + 1, end_forward if held else 0)
        sizes.append(nbytes)
        lifetimes.append((start, stop))
    return sizes, lifetimes
