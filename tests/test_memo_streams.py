"""MEMO's CUDA branch on CPU: the host pool's side-stream copies through a stand-in of
torch.cuda's streams and events that runs each copy as late as the real GPU may (only when an
event is waited on), so freeing a tensor whose device-to-host copy is still queued is caught
(issue 15, defect 4: the swap released the source with resize_(0) right after queueing its copy).
And: that swapping really releases the saved activations' memory (live storages counted)."""

import copy

import pytest
import torch
from longctx.memory import offload
from longctx.memory.accounting import pinned_bytes
from longctx.memory.offload import HostPool, LayerPolicy
from test_memory import batch, run, tiny
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode


class _Stream:
    """A side stream whose work runs only when something waits for it."""

    def __init__(self, device=None) -> None:
        self.queue, self.done = [], 0

    def run_until(self, upto: int) -> None:
        while self.done < upto:
            op, self.queue[self.done] = self.queue[self.done], None  # a finished copy holds nothing
            self.done += 1
            op()

    def wait_stream(self, other) -> None:
        mark = len(other.queue)
        self.queue.append(lambda: other.run_until(mark))

    def wait_event(self, event) -> None:
        self.queue.append(event.synchronize)


class _Compute(_Stream):
    """The current stream: it runs at once, so waiting on an event runs that work now."""

    def wait_stream(self, other) -> None:
        other.run_until(len(other.queue))

    def wait_event(self, event) -> None:
        event.synchronize()


class _Event:
    def __init__(self, *args, **kwargs) -> None:
        self.stream, self.mark = None, 0

    def record(self, stream=None) -> None:
        self.stream = stream or _STATE["current"]
        self.mark = len(self.stream.queue)

    def synchronize(self) -> None:
        if self.stream is not None:
            self.stream.run_until(self.mark)

    def query(self) -> bool:
        return self.stream is None or self.stream.done >= self.mark


_STATE = {"current": None}


def _copy_later(stream, dst, src):
    def op():
        need = src.storage_offset() + src.numel() * src.element_size()
        if src.untyped_storage().nbytes() < need:
            raise AssertionError("a queued device->host copy read memory that was already freed")
        with torch.utils._python_dispatch._disable_current_modes():
            dst.copy_(src)
    stream.queue.append(op)


class _DeferCopies(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        current = _STATE["current"]
        if func is torch.ops.aten.copy_.default and not isinstance(current, _Compute):
            _copy_later(current, args[0], args[1])
            return args[0]
        return func(*args, **kwargs)


class _StreamContext:
    def __init__(self, stream) -> None:
        self.stream, self.mode = stream, _DeferCopies()

    def __enter__(self):
        self.prev, _STATE["current"] = _STATE["current"], self.stream
        self.mode.__enter__()

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)
        _STATE["current"] = self.prev


@pytest.fixture
def fake_cuda(monkeypatch):
    compute = _Compute()
    _STATE["current"] = compute
    monkeypatch.setattr(torch.cuda, "Stream", _Stream)
    monkeypatch.setattr(torch.cuda, "Event", _Event)
    monkeypatch.setattr(torch.cuda, "stream", _StreamContext)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: compute)

    def pool():
        p = HostPool("cpu")
        p.cuda, p.d2h, p.h2d = True, _Stream(), _Stream()
        return p

    monkeypatch.setattr(HostPool, "_new_chunk", lambda self, n: torch.empty(n, dtype=torch.uint8))
    yield pool
    _STATE["current"] = None


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_cuda_swap_frees_sources_only_after_their_copies(fake_cuda, alpha):
    model = tiny()
    ids, labels = batch()
    want = run(model, ids, labels, steps=2)
    m = copy.deepcopy(model)
    pool = fake_cuda()
    for layer in m.model.layers[:-1]:  # the last block stays unwrapped, as resident layers do
        offload.wrap(layer, LayerPolicy(alpha=alpha, tier="host"), pool, chunk_tokens=17)
    got = run(m, ids, labels, steps=2)
    for (l0, g0), (l1, g1) in zip(want, got):
        assert abs(l0.item() - l1.item()) <= 1e-6 * abs(l0.item())
        for name in g0:
            torch.testing.assert_close(g1[name], g0[name], atol=1e-6 * max(g0[name].abs().max().item(), 1e-3),
                                       rtol=1e-5)
    assert pool.d2h.done == len(pool.d2h.queue) > 0, "every queued copy ran"
    assert not pool.records


# --- does swapping release the saved activations? ------------------------------------------------
class _Births(TorchDispatchMode):
    """Weak references to the storages of every tensor the forward creates."""

    def __init__(self) -> None:
        super().__init__()
        self.refs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.refs.append(StorageWeakRef(t.untyped_storage()))
        return out


def _live_bytes(refs, exclude) -> int:
    seen, total = set(), 0
    for ref in refs:
        if ref.cdata in seen or ref.expired():
            continue
        seen.add(ref.cdata)
        storage = torch.UntypedStorage._new_with_weak_ptr(ref.cdata)
        if storage.data_ptr() not in exclude:
            total += storage.nbytes()
    return total


def _forward_live_bytes(model, ids, labels, pool=None) -> int:
    births = _Births()
    with births:
        loss = model(ids, labels=labels)
    exclude = {c.data_ptr() for c in (pool.chunks if pool else [])}
    live = _live_bytes(births.refs, exclude)
    loss.backward()
    return live


def test_host_swap_releases_saved_activations():
    """After forward, the device (here: the process) holds what autograd saved. With every block
    swapped to the host pool that must fall to near nothing: a swap that copies but frees nothing
    would pass a values test and fail this one."""
    model = tiny(num_layers=2)
    ids, labels = batch(B=2, S=64)
    plain = _forward_live_bytes(copy.deepcopy(model), ids, labels)
    recompute = copy.deepcopy(model)
    for layer in recompute.model.layers:
        offload.wrap(layer, offload.FULL_RECOMPUTE, None)
    floor = _forward_live_bytes(recompute, ids, labels)  # block inputs kept, the rest recomputed
    swapped = copy.deepcopy(model)
    pool = HostPool("cpu")
    for layer in swapped.model.layers:
        offload.wrap(layer, LayerPolicy(alpha=1.0, tier="host"), pool)
    live = _forward_live_bytes(swapped, ids, labels, pool)
    assert plain > floor
    # all of a block's kept activations are in the pool: only what lies outside the blocks stays
    assert live <= floor, f"swapped forward left {live} bytes live; full recompute leaves {floor}, no swap {plain}"
    assert pool.last_step_bytes > 0.5 * (plain - floor)


def test_pinned_slab_is_sized_as_the_allocator_rounds_it():
    """torch's CUDA host allocator rounds every pinned request up to a power of two: the pool asks
    for the rounded size (so it can use it) and the alpha plan budgets host memory with it."""
    from longctx.memory.plan import LayerBytes, plan_alpha

    assert [pinned_bytes(n) for n in (0, 1, 4096, 4097, 5 << 30)] == [0, 1, 4096, 8192, 8 << 30]
    layer = LayerBytes(inp=10.0, attn=10.0, other=100.0)
    # 6 GiB of host per GPU, 4 swapped layers of 320 MiB + alpha * 1600 MiB each: without the
    # rounding alpha would be 0.76 (a 6 GiB slab, pinned as 8 GiB: over the budget)
    plan = plan_alpha(1 << 24, layer, 1.0, 1e15, 12 * 2**30, 2, 5, 1)
    assert plan.binding == "host_memory" and plan.alpha == pytest.approx((1024 - 320) / 1600)
    per_gpu = plan.swap_bytes_per_layer * 4
    assert pinned_bytes(int(per_gpu * (1 - 1e-9))) * 2 <= 12 * 2**30
    assert plan.host_bytes_per_node <= 12 * 2**30


def test_cuda_swap_releases_all_but_the_last_two_blocks_during_forward(fake_cuda):
    """Under CUDA's deferred copies a block's device memory is released once its copy is done,
    at the latest two blocks later (the MEMO rhythm): after forward at most the last two host
    blocks still hold theirs; with 4 swapped blocks, a swap that freed nothing would hold 4."""
    model = tiny(num_layers=4)
    ids, labels = batch(B=2, S=64)
    recompute = copy.deepcopy(model)
    for layer in recompute.model.layers:
        offload.wrap(layer, offload.FULL_RECOMPUTE, None)
    floor = _forward_live_bytes(recompute, ids, labels)
    swapped = copy.deepcopy(model)
    pool = fake_cuda()
    for layer in swapped.model.layers:
        offload.wrap(layer, LayerPolicy(alpha=1.0, tier="host"), pool)
    births = _Births()
    with births:
        loss = swapped(ids, labels=labels)
    per_block = max(r.nbytes for r in pool.records)
    live = _live_bytes(births.refs, {c.data_ptr() for c in pool.chunks})
    assert [bool(r.sources) for r in pool.records] == [False, False, True, True]
    assert live <= floor + 2.2 * per_block, f"{live} live vs floor {floor} + 2 blocks of {per_block}"
    loss.backward()
    assert not pool.records


def test_plan_counts_the_two_blocks_whose_copies_are_in_flight(fake_cuda):
    """memory/estimate.py's `swap_in_flight` term is what the code holds after forward under CUDA's
    deferred copies: the last two host blocks' device copies (calibrated on an H200, where leaving
    it out made the plan 10-16% low). Both counted by the same per-token formula the planner uses."""
    from longctx.memory.estimate import Setting, estimate
    from longctx.train.build import model_shape

    model = tiny(num_layers=4)
    B, S = 2, 64
    ids, labels = batch(B=B, S=S)
    pool = fake_cuda()
    for layer in model.model.layers:
        offload.wrap(layer, LayerPolicy(alpha=0.5, tier="host"), pool)
    loss = model(ids, labels=labels)
    holding = [r for r in pool.records if r.sources or r.free_after_copy]
    held = sum(r.nbytes for r in holding)
    loss.backward()
    e = estimate(model_shape(model.config), Setting(seq_len=S, rows=B, autocast=False, policy="memo", alpha=0.5,
                                                    tier="host", resident_layers=0, gpus_per_node=1,
                                                    loss_tile_tokens=None))  # this model's head is whole
    assert len(holding) == 2, len(holding)
    assert e.terms["swap_in_flight"] == pytest.approx(held, rel=0.05), (e.terms["swap_in_flight"], held)
    # with no resident block the first backward is a swapped block's: its fetch releases them first
    assert e.phases["backward_first_block"] == pytest.approx(
        e.terms["activations"] + 4.0 * model.config.vocab_size * model.config.hidden_size
        * (1 if model.config.tie_word_embeddings else 2) + e.terms["layer_workspace"] + e.terms["attention_workspace"])
