"""MEMO activation memory (Wu et al., "Efficiently Training 7B LLM with 1 Million Sequence Length
on 8 GPUs", arXiv 2407.12117, SIGMOD 2025): token-wise swap + recompute around attention.

A block is split at attention: `before_attention(x, cos, sin) -> (q, k, v)` and
`after_attention(x, out) -> y` are per token; attention is not. Per wrapped block and step:
- the attention output and its LSE are always kept (so attention is never recomputed), and so is
  the block input of the recomputed tokens;
- of the tokens' other saved activations, the first `alpha` fraction of tokens is kept (their
  autograd graphs are built in forward and their saved tensors packed into the tier) and the
  rest is recomputed token-wise in backward from the kept input and attention output;
- "kept" means the layer's `tier`: "host" = copied into a `HostPool` and the device copy freed,
  "device" = left where it is (the last layers, whose backward starts at once).
`LayerPolicy(alpha=0, tier="device", keep_attention=False)` is classic full recomputation.

Backward (per block): fetch the kept tensors (prefetched one layer ahead on CUDA), recompute
the dropped tokens' q, k, v (no graph), run their work after attention forward and backward
chunk by chunk (`chunk_tokens` tokens at a time), attention's backward from the kept (out, lse),
then their work before attention chunk by chunk; the kept tokens back-propagate through their
stored graphs. So a block's backward holds the whole sequence's q, k, v, out and their gradients
but only one chunk's other activations. That is the path under sequence parallelism, where a
schedule's backward takes the whole shard. At sp 1 (`_forward_by_rows`, `_backward_by_rows`)
attention too goes query tile by query tile, forward from the first and backward from the last,
so only k, v, their fp32 gradients and the residual stream's gradients span the sequence. Parameter gradients are returned from the autograd
Function, so recomputation is exact: the same ops on the same values, autocast state and RNG
state (chunked sums differ from the unchunked ones by rounding only).

`segment` recomputes segments of blocks (Megatron-LM's uniform `recompute_num_layers`): fewer
block inputs kept, one more forward; for when the host tier cannot hold more (e.g. on a CPU run,
where it is the same memory).

`HostPool` is the host tier. On CUDA: one pinned slab (grown only between steps, when a step
needed more), a D2H and an H2D stream, and two device staging buffers used by alternating layers
in backward, the next layer's copy issued while this one computes. On CPU the slab and staging
buffers are ordinary tensors and copies are synchronous: the same code path, so logic, numbers
and byte counts are tested for real.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from . import accounting

_ALIGN = 64  # bytes; every dtype's element size divides it
# Tokens per chunk when backward recomputes and back-propagates the per-token work: the chunk's
# activations (one block's saved tensors for these tokens) are the only ones live at a time.
DEFAULT_CHUNK_TOKENS = 4096


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _storage_bytes(t: torch.Tensor) -> torch.Tensor:
    """A uint8 view of t's whole storage."""
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())


@dataclass(frozen=True)
class LayerPolicy:
    alpha: float = 0.0  # fraction of tokens whose per-token activations are kept
    tier: str = "host"  # where kept tensors live: host | device
    keep_attention: bool = True  # keep attention out + lse (MEMO); False = recompute attention too
    # the dtype the recomputed tokens' block input is kept in (None: its own). The trainer sets the
    # autocast dtype: the residual stream is fp32 under autocast, but the projections only ever
    # see bf16 casts of its normalised values, so a bf16 copy recomputes within bf16's error
    input_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha={self.alpha}: expected a fraction in [0, 1]")
        if self.tier not in ("host", "device"):
            raise ValueError(f"tier={self.tier!r}: expected host or device")


FULL_RECOMPUTE = LayerPolicy(alpha=0.0, tier="device", keep_attention=False)


# --- tiers -----------------------------------------------------------------------------------------
class _Handle:
    __slots__ = ("key", "dtype", "size", "stride", "offset")

    def __init__(self, t: torch.Tensor) -> None:
        self.key = accounting.storage_key(t)
        self.dtype, self.size, self.stride, self.offset = t.dtype, t.shape, t.stride(), t.storage_offset()


class DeviceRecord:
    """What one block keeps on the device: references, counted once per storage."""

    tier = "device"

    def __init__(self) -> None:
        self.nbytes = 0
        self._keys: set = set()

    def put(self, t: torch.Tensor):
        key = accounting.storage_key(t)
        if key not in self._keys:
            self._keys.add(key)
            n = t.untyped_storage().nbytes()
            self.nbytes += n
            accounting.record(self.tier, n)
        return t

    def get(self, handle):
        return handle

    def fetch(self) -> None:
        pass

    def release(self) -> None:
        pass


class HostRecord:
    """What one block keeps in the host pool: storages copied into the slab at `offsets`, and
    their places (`local`) in a staging buffer when fetched back."""

    tier = "host"

    def __init__(self, pool: HostPool, index: int) -> None:
        self.pool, self.index = pool, index
        self.offsets: dict = {}  # storage key -> (slab chunk, offset, nbytes, local offset)
        self.nbytes = 0  # staging bytes (aligned)
        self.sources: list[torch.Tensor] = []  # device tensors until their D2H copy is done
        self.free_after_copy: list[torch.Tensor] = []  # graph tensors whose memory goes once copied
        self.d2h_done = None
        self.h2d_done = None
        self.staging: torch.Tensor | None = None
        self.released = False

    def put(self, t: torch.Tensor) -> _Handle:
        h = _Handle(t)
        if h.key not in self.offsets:
            src = _storage_bytes(t)
            n = src.numel()
            chunk, off = self.pool.alloc(n)
            self.offsets[h.key] = (chunk, off, n, self.nbytes)
            self.nbytes += _aligned(n)
            self.pool.copy_out(chunk[off:off + n], src, self)
            accounting.record(self.tier, n)
        return h

    def fetch(self) -> None:
        self.pool.fetch(self)

    def get(self, h: _Handle) -> torch.Tensor:
        _, _, n, local = self.offsets[h.key]
        base = self.staging[local:local + n].view(h.dtype)
        return base.as_strided(h.size, h.stride, base.storage_offset() + h.offset)

    def release(self) -> None:
        self.pool.release(self)


class HostPool:
    """The host tier shared by all wrapped blocks of a model (see the module docstring)."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.chunks: list[torch.Tensor] = []
        self.top = 0  # bytes used in the last chunk
        self.high_water = 0  # bytes used by one step, for the next step's single slab
        self.records: list[HostRecord] = []  # this step's, in forward order
        self.staging: list[torch.Tensor | None] = [None, None]
        self.regrows = 0
        self.last_step_bytes = 0  # host bytes the last finished step kept
        if self.cuda:
            self.d2h, self.h2d = torch.cuda.Stream(self.device), torch.cuda.Stream(self.device)

    # --- slab ------------------------------------------------------------------------------------
    def _new_chunk(self, nbytes: int) -> torch.Tensor:
        if self.cuda:  # the pinned allocator takes a power of two anyway: ask for it, and use it
            return torch.empty(accounting.pinned_bytes(nbytes), dtype=torch.uint8, pin_memory=True)
        return torch.empty(nbytes, dtype=torch.uint8)

    def reserve(self, nbytes: int) -> None:
        """Allocate the slab up front (between steps only)."""
        if not self.records and (not self.chunks or self.chunks[0].numel() < nbytes):
            self.chunks, self.top = [self._new_chunk(_aligned(nbytes))], 0

    def alloc(self, nbytes: int) -> tuple[torch.Tensor, int]:
        need = _aligned(nbytes)
        if not self.chunks or self.top + need > self.chunks[-1].numel():
            # Over the reservation in the middle of a step: a further chunk; the next step gets
            # one slab of this step's size.
            self.chunks.append(self._new_chunk(max(need, 64 << 20)))
            self.top = 0
            self.regrows += 1
        off = self.top
        self.top += need
        self.high_water += need
        return self.chunks[-1], off

    @property
    def capacity_bytes(self) -> int:
        return sum(c.numel() for c in self.chunks)

    @property
    def bytes_in_use(self) -> int:
        return sum(r.nbytes for r in self.records if not r.released)

    # --- forward: device -> host -----------------------------------------------------------------
    def begin(self) -> HostRecord:
        rec = HostRecord(self, len(self.records))
        self.records.append(rec)
        return rec

    def copy_out(self, dst: torch.Tensor, src: torch.Tensor, rec: HostRecord) -> None:
        # The source stays referenced until the block's forward ends (so its address, the dedupe
        # key, cannot be reused by a later tensor of the block) and, on CUDA, until its copy is done.
        rec.sources.append(src)
        if not self.cuda:
            dst.copy_(src)
            return
        self.d2h.wait_stream(torch.cuda.current_stream(self.device))  # src is ready on compute
        with torch.cuda.stream(self.d2h):
            dst.copy_(src, non_blocking=True)

    def seal(self, rec: HostRecord, free_after_copy=()) -> None:
        """End of a block's forward: its copies are queued. `free_after_copy` are device tensors
        whose memory is released once their copies are done, never before: on CUDA the copy runs
        on the D2H stream, and memory freed while it is queued goes back to the caching allocator,
        which hands it to the next block while the copy still reads it. Copies finished by now
        are released; the block two back is waited for (MEMO's two rounding buffers' rhythm)."""
        rec.free_after_copy.extend(free_after_copy)
        if not self.cuda:  # copies were synchronous
            self._copied(rec)
            return
        rec.d2h_done = torch.cuda.Event()
        rec.d2h_done.record(self.d2h)
        for old in self.records[:rec.index]:
            if old.d2h_done is not None and (old.index <= rec.index - 2 or old.d2h_done.query()):
                old.d2h_done.synchronize()
                self._copied(old)

    @staticmethod
    def _copied(rec: HostRecord) -> None:
        """rec's device->host copies are done: drop its sources, release its graph tensors."""
        rec.sources.clear()
        for t in rec.free_after_copy:
            t.untyped_storage().resize_(0)
        rec.free_after_copy.clear()

    # --- backward: host -> device, one block ahead -----------------------------------------------
    def _staging_for(self, rec: HostRecord) -> torch.Tensor:
        slot = rec.index % 2
        buf = self.staging[slot]
        if buf is None or buf.numel() < rec.nbytes:
            buf = torch.empty(max(rec.nbytes, 1), dtype=torch.uint8, device=self.device)
            self.staging[slot] = buf
        return buf

    def _copy_in(self, rec: HostRecord) -> None:
        buf = self._staging_for(rec)
        if self.cuda:
            if rec.d2h_done is not None:
                self.h2d.wait_event(rec.d2h_done)
            self.h2d.wait_stream(torch.cuda.current_stream(self.device))  # the slot's last user is done
            with torch.cuda.stream(self.h2d):
                for chunk, off, n, local in rec.offsets.values():
                    buf[local:local + n].copy_(chunk[off:off + n], non_blocking=True)
            rec.h2d_done = torch.cuda.Event()
            rec.h2d_done.record(self.h2d)
        else:
            for chunk, off, n, local in rec.offsets.values():
                buf[local:local + n].copy_(chunk[off:off + n])
        rec.staging = buf

    def fetch(self, rec: HostRecord) -> None:
        if self.cuda:  # backward has begun: the forward's copies are all queued; release them
            for old in self.records:
                if old.d2h_done is not None and (old.sources or old.free_after_copy):
                    old.d2h_done.synchronize()
                    self._copied(old)
        if rec.staging is None:
            self._copy_in(rec)
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(rec.h2d_done)
        # Prefetch the block before this one into the other staging buffer.
        prev = next((r for r in reversed(self.records[:rec.index]) if not r.released), None)
        if prev is not None and prev.staging is None:
            self._copy_in(prev)

    def release(self, rec: HostRecord) -> None:
        rec.released, rec.staging = True, None
        if all(r.released for r in self.records):  # the step's backward is done
            self.records.clear()
            self.last_step_bytes = self.high_water
            if len(self.chunks) > 1:  # one slab of the size this step needed
                self.chunks = [self._new_chunk(self.high_water)]
                if self.cuda:
                    _empty_host_cache()
            self.top = self.high_water = 0


def _empty_host_cache() -> None:
    """Return the replaced pinned chunks to the OS: PyTorch's host allocator keeps freed pinned
    blocks cached, so without this the process would hold the old chunks beside the new slab."""
    empty = getattr(getattr(torch, "accelerator", None), "empty_host_cache", None)  # torch >= 2.9
    empty = empty or getattr(torch._C, "_host_emptyCache", None)  # older CUDA builds
    if empty is not None:
        empty()


# --- the wrapped block ---------------------------------------------------------------------------
def attention_pair(fn: Callable) -> tuple[Callable, Callable]:
    """(forward -> (out, lse), backward(dout, q, k, v, out, lse)) for an attention callable."""
    if hasattr(fn, "forward_lse"):
        return fn.forward_lse, fn.backward_lse
    raise TypeError(f"attention {fn!r} has no forward_lse/backward_lse; MEMO needs attention's (out, lse)")


class _Layer:
    """Per wrapped block: the block, its policy source, the host pool, the recompute chunk."""

    def __init__(self, block: nn.Module, policy: Callable[[int], LayerPolicy], pool: HostPool | None,
                 chunk_tokens: int, arena=None) -> None:
        if pool is None and policy(1).tier == "host":
            raise ValueError("a host-tier policy needs a HostPool")
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens={chunk_tokens}: expected a positive number of tokens")
        self.block, self.policy, self.pool, self.chunk_tokens = block, policy, pool, chunk_tokens
        self.arena = arena  # memory/arena.Arena for the whole-sequence buffers by query tiles, or None

    def buffers(self, specs, zero=()) -> list[torch.Tensor]:
        """Tensors of these (shape, dtype) specs: views into the arena, or from the allocator;
        those whose index is in `zero` filled with zeros."""
        if self.arena is not None:
            out = self.arena.views(specs)
        else:
            out = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype, device in specs]
        for i in zero:
            out[i].zero_()
        return out


def _chunks(length: int, rows: int, chunk_tokens: int) -> list[slice]:
    """Slices of the sequence axis holding about `chunk_tokens` tokens (rows x positions) each."""
    step = max(1, chunk_tokens // max(rows, 1))
    return [slice(i, min(i + step, length)) for i in range(0, length, step)]


def _tiled(fn, chunks: list[slice], *inputs: Callable[[slice], torch.Tensor]):
    """fn over token tiles, its outputs (a tensor or a tuple) assembled along the sequence axis
    into buffers of the whole length: `inputs` are functions of a tile's slice, so a tile's input
    can be made (e.g. cast) for that tile alone."""
    bufs, single = None, False
    for c in chunks:
        out = fn(*(get(c) for get in inputs))
        single = isinstance(out, torch.Tensor)
        outs = (out,) if single else tuple(out)
        if bufs is None:
            length = chunks[-1].stop
            bufs = [torch.empty((t.shape[0], length, *t.shape[2:]), dtype=t.dtype, device=t.device) for t in outs]
        for buf, t in zip(bufs, outs):
            buf[:, c] = t
        del out, outs
    return bufs[0] if single else tuple(bufs)


def _grad(outputs, inputs, grads):
    """Gradients of `inputs` (None for those that need none: frozen parameters, e.g. LoRA's base)."""
    wanted = [i for i, t in enumerate(inputs) if t.requires_grad]
    got = torch.autograd.grad(outputs, [inputs[i] for i in wanted], grads, allow_unused=True)
    out = [None] * len(inputs)
    for i, g in zip(wanted, got):
        out[i] = g
    return out


def _add(a, b):
    if a is None:
        return b
    return a if b is None else a + b


class _MemoBlock(torch.autograd.Function):
    @staticmethod
    def forward(ctx, lay: _Layer, x, cos, sin, *params):
        block = lay.block
        S = x.shape[1]
        policy = lay.policy(x.shape[0] * S)
        a = round(policy.alpha * S)
        rec = lay.pool.begin() if policy.tier == "host" else DeviceRecord()
        attn_fwd, _ = attention_pair(block.attention_fn)
        weights = {accounting.storage_key(p) for p in params} | {accounting.storage_key(cos),
                                                                  accounting.storage_key(sin)}

        def pack(t):
            return ("ref", t) if accounting.is_weight(t, weights) else ("kept", rec.put(t))

        def unpack(packed):
            kind, h = packed
            return h if kind == "ref" else rec.get(h)

        ctx.device = x.device.type
        ctx.autocast = (torch.is_autocast_enabled(ctx.device), torch.get_autocast_dtype(ctx.device))
        ctx.rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(x.device) if x.is_cuda else None

        hooks = torch.autograd.graph.saved_tensors_hooks(pack, unpack)
        xa = None
        # a copy, not a view: with one row x[:, a:] is contiguous already, and a view kept for
        # backward would hold the whole input's storage (found by the traced step, tests/test_memory.py)
        xb = (x[:, a:].clone(memory_format=torch.contiguous_format) if a else x) if a < S else None
        graphs = None
        if a:  # kept tokens: build their graphs now, saved tensors packed into the tier
            with torch.enable_grad(), hooks:
                xa = x[:, :a].detach().clone().requires_grad_()
                qa, ka, va = block.before_attention(xa, cos[:, :a], sin[:, :a])
        rows = getattr(block.attention_fn, "by_rows", lambda: None)()
        if rows is not None:  # sp 1: query tiles, first to last (_forward_by_rows)
            out_a, out_b, lse, y = _forward_by_rows(lay, rows, xb, cos, sin, a, (qa, ka, va) if a else None,
                                                    policy.keep_attention)
        else:
            with torch.no_grad():
                if a < S:
                    qb, kb, vb = block.before_attention(xb, cos[:, a:], sin[:, a:])
                    if a:
                        q, k, v = (torch.cat([p.detach(), r], 1) for p, r in zip((qa, ka, va), (qb, kb, vb)))
                    else:
                        q, k, v = qb, kb, vb
                    del qb, kb, vb
                else:
                    q, k, v = qa.detach(), ka.detach(), va.detach()
                out, lse = attn_fwd(q, k, v)
                del q, k, v
                out_a = out[:, :a] if a else None
                out_b = (out[:, a:].contiguous() if a else out) if a < S else None
                del out
                y = None
                if a < S:
                    # the recomputed tokens' MLP in tiles, as backward runs it: no transient of the
                    # whole local sequence's intermediate width (issue 21, sequence tiling)
                    y = torch.empty_like(x)
                    for c in _chunks(S - a, x.shape[0], lay.chunk_tokens):
                        y[:, a:][:, c] = block.after_attention(xb[:, c], out_b[:, c])
        if a:
            with torch.enable_grad(), hooks:
                # by query tiles out_a is a buffer of its own; otherwise a slice of the whole output
                oa = (out_a.detach() if rows is not None else out_a.detach().clone()).requires_grad_()
                ya = block.after_attention(xa, oa)
            graphs = (xa, oa, (qa, ka, va), ya)
            if y is None:
                y = ya.detach().clone()
            else:
                y[:, :a] = ya.detach()

        # What backward needs besides the graphs: kept tokens' q/k/v, attention's (out, lse) or
        # (full recompute) nothing of attention, and the input of the recomputed tokens.
        keep = {}
        if a:
            keep["qkv_a"] = tuple(rec.put(t.detach()) for t in (qa, ka, va))
        if policy.keep_attention:
            if a:
                keep["out_a"] = rec.put(oa.detach())
            if a < S:
                keep["out_b"] = rec.put(out_b)
            keep["lse"] = rec.put(lse)
        if a < S:
            # in the autocast dtype only under autocast in that dtype (the projections then only see
            # bf16 casts of its normalised values); fp32 math keeps fp32 inputs
            low = policy.input_dtype not in (None, xb.dtype) and ctx.autocast == (True, policy.input_dtype)
            keep["x_b"] = rec.put(xb.to(policy.input_dtype) if low else xb)
        ctx.x_dtype = x.dtype
        if rec.tier == "host":  # the graphs' device memory now lives in the host pool
            lay.pool.seal(rec, (xa, oa, qa, ka, va, ya) if graphs is not None else ())
        ctx.lay, ctx.rec, ctx.keep, ctx.graphs, ctx.a, ctx.policy = lay, rec, keep, graphs, a, policy
        ctx.cos, ctx.sin = cos, sin
        return y

    @staticmethod
    def backward(ctx, dy):
        lay, rec, keep, a, policy = ctx.lay, ctx.rec, ctx.keep, ctx.a, ctx.policy
        block = lay.block
        params = list(block.parameters())
        attn_fwd, attn_bwd = attention_pair(block.attention_fn)
        S = dy.shape[1]
        cos, sin = ctx.cos, ctx.sin
        rec.fetch()
        enabled, dtype = ctx.autocast
        devices = [dy.device] if ctx.cuda_rng is not None else []
        with torch.random.fork_rng(devices=devices), torch.autocast(ctx.device, dtype=dtype, enabled=enabled):
            torch.set_rng_state(ctx.rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, dy.device)
            rows = getattr(block.attention_fn, "by_rows", lambda: None)()
            if rows is not None:
                dx, dparams = _backward_by_rows(ctx, dy, rows, params)
                rec.release()
                ctx.graphs = ctx.keep = None
                return (None, dx, None, None, *dparams)
            dx_parts, dparams = [], [None] * len(params)

            # 1. q, k, v of the dropped tokens, recomputed without a graph (rebuilt chunk by chunk
            #    in step 4), next to the kept tokens' q, k, v
            qkv_b = None
            if a < S:
                # the kept input may be a bf16 copy: cast back one tile at a time, never whole
                x_kept = rec.get(keep["x_b"]).detach()
                chunks = _chunks(S - a, dy.shape[0], lay.chunk_tokens)

                def xb_at(c):
                    return x_kept[:, c].to(ctx.x_dtype)

                with torch.no_grad():
                    qkv_b = _tiled(block.before_attention, chunks, xb_at, lambda c: cos[:, a:][:, c],
                                   lambda c: sin[:, a:][:, c])
            qkv_a = tuple(rec.get(h) for h in keep["qkv_a"]) if a else None
            with torch.no_grad():
                if a and a < S:
                    q, k, v = (torch.cat([p, r], 1) for p, r in zip(qkv_a, qkv_b))
                else:
                    q, k, v = qkv_a if a else qkv_b
                del qkv_b
                if policy.keep_attention:
                    parts = ([rec.get(keep["out_a"])] if a else []) + ([rec.get(keep["out_b"])] if a < S else [])
                    out = torch.cat(parts, 1) if len(parts) > 1 else parts[0]
                    lse = rec.get(keep["lse"])
                else:
                    out, lse = attn_fwd(q, k, v)

            # 2. after attention: the kept graph, and the dropped tokens' work recomputed and
            #    back-propagated chunk by chunk (only one chunk's activations live at a time)
            douts = []
            if a:
                xa, oa, (qa, ka, va), ya = ctx.graphs
                g = _grad([ya], [xa, oa, *params], [dy[:, :a]])
                dx_a, douts = g[0], [g[1]]
                dparams = [_add(p, n) for p, n in zip(dparams, g[2:])]
            if a < S:
                dx_b = torch.empty(x_kept.shape, dtype=ctx.x_dtype, device=x_kept.device)
                dout_b = torch.empty_like(out[:, a:])
                for c in chunks:
                    with torch.enable_grad():
                        xc = xb_at(c).requires_grad_()
                        oc = out[:, a:][:, c].detach().requires_grad_()
                        yc = block.after_attention(xc, oc)
                    g = _grad([yc], [xc, oc, *params], [dy[:, a:][:, c]])
                    dx_b[:, c], dout_b[:, c] = g[0], g[1]
                    dparams = [_add(p, n) for p, n in zip(dparams, g[2:])]
                    del xc, oc, yc, g
                douts.append(dout_b)
            dout = torch.cat(douts, 1) if len(douts) > 1 else douts[0]
            del douts

            # 3. attention backward from the kept (out, lse), then before attention
            dq, dk, dv = attn_bwd(dout, q, k, v, out, lse)
            del dout, q, k, v, out, lse
            if a:
                g = _grad([qa, ka, va], [xa, *params], [t[:, :a] for t in (dq, dk, dv)])
                dx_parts.append(_add(dx_a, g[0]))
                dparams = [_add(p, n) for p, n in zip(dparams, g[1:])]
            if a < S:
                # 4. the dropped tokens' work before attention, chunk by chunk
                for c in chunks:
                    with torch.enable_grad():
                        xc = xb_at(c).requires_grad_()
                        qkv_c = block.before_attention(xc, cos[:, a:][:, c], sin[:, a:][:, c])
                    g = _grad(list(qkv_c), [xc, *params], [t[:, a:][:, c] for t in (dq, dk, dv)])
                    dx_b[:, c] += g[0]
                    dparams = [_add(p, n) for p, n in zip(dparams, g[1:])]
                    del xc, qkv_c, g
                dx_parts.append(dx_b)
        rec.release()
        ctx.graphs = ctx.keep = None
        dx = torch.cat(dx_parts, 1) if len(dx_parts) > 1 else dx_parts[0]
        return (None, dx, None, None, *dparams)


# Keys before a query tile go through attention's backward in blocks of this many tiles, so its
# dK/dV outputs never exceed that many tiles' tokens.
KEY_BLOCK_TILES = 8


def _forward_by_rows(lay: _Layer, attn, xb, cos, sin, a: int, qkv_a, keep_attention: bool):
    """A block's forward where attention is local (sp 1), for the tokens it does not keep (from
    `a` on: `xb`), query tile by query tile from the first: a tile's q, k, v, its rows of
    attention against the keys so far (`attn.forward_rows`) and its work after attention. Of the
    whole local sequence only k, v (kernel dtype), the output and, when kept, the attention
    output and LSE are made, never q (issue 21: forward's whole-sequence transients). The kept
    tokens' rows (the first a, their q, k, v from their graphs) go first, as one tile.
    Returns (kept tokens' attention output, the others', lse, output without the kept tokens')."""
    from ..kernels.attention import autocast_inputs

    block = lay.block
    B = (xb if xb is not None else qkv_a[0]).shape[0]
    S = a + (xb.shape[1] if xb is not None else 0)
    chunks = _chunks(S - a, B, lay.chunk_tokens) if xb is not None else []
    k = v = lse = out_a = out_b = y = None
    with torch.no_grad():
        def place(at, qc, kc, vc):
            nonlocal k, v, lse
            if k is None:
                k, v = lay.buffers([((B, S, *kc.shape[2:]), kc.dtype, kc.device),
                                    ((B, S, *vc.shape[2:]), vc.dtype, vc.device)])
            k[:, at], v[:, at] = kc, vc
            oc, lse_c = attn.forward_rows(qc, k, v, at.start)
            if lse is None and keep_attention:
                lse = torch.empty((B, lse_c.shape[1], S), dtype=lse_c.dtype, device=lse_c.device)
            if keep_attention:
                lse[:, :, at] = lse_c
            return oc

        if a:  # the kept tokens' rows, in tiles as well (their q, k, v come whole from their graphs)
            qa, ka, va = (t.detach() for t in qkv_a)
            for t in _chunks(a, B, lay.chunk_tokens):
                oc = place(t, *autocast_inputs(qa[:, t], ka[:, t], va[:, t]))
                if out_a is None:
                    out_a = torch.empty((B, a, *oc.shape[2:]), dtype=oc.dtype, device=oc.device)
                out_a[:, t] = oc
                del oc
        for c in chunks:
            at = slice(a + c.start, a + c.stop)
            oc = place(at, *autocast_inputs(*block.before_attention(xb[:, c], cos[:, at], sin[:, at])))
            if keep_attention:
                if out_b is None:
                    out_b = torch.empty((B, S - a, *oc.shape[2:]), dtype=oc.dtype, device=oc.device)
                out_b[:, c] = oc
            yc = block.after_attention(xb[:, c], oc)
            if y is None:
                y = torch.empty((B, S, *yc.shape[2:]), dtype=yc.dtype, device=yc.device)
            y[:, at] = yc
            del oc, yc
    return out_a, out_b, lse, y


def _backward_by_rows(ctx, dy, attn, params):
    """A block's backward where attention is local (sp 1): query tiles from the last to the first,
    each one's work after attention, attention's backward (`attn.backward_rows`) and its work
    before attention in turn. Tiles later in the sequence are the only ones that attend to a
    tile's keys, so when a tile is reached its dK, dV are complete and its q, k, v graph can be
    back-propagated at once. Of the whole local sequence only k, v (kernel dtype), their fp32
    gradient accumulators and the residual stream's gradients are live, never q, the attention
    output's gradient or dQ (issue 21: the backward's whole-sequence workspace)."""
    from ..kernels.attention import autocast_inputs

    lay, rec, keep, a, policy = ctx.lay, ctx.rec, ctx.keep, ctx.a, ctx.policy
    block = lay.block
    B, S = dy.shape[0], dy.shape[1]
    cos, sin = ctx.cos, ctx.sin
    dparams = [None] * len(params)
    dx = torch.empty(dy.shape, dtype=ctx.x_dtype, device=dy.device)
    chunks = _chunks(S - a, B, lay.chunk_tokens) if a < S else []
    key_block = max(1, lay.chunk_tokens // max(B, 1)) * KEY_BLOCK_TILES
    if a < S:
        x_kept = rec.get(keep["x_b"]).detach()

        def xb_at(c):  # the kept input may be a bf16 copy: cast back one tile at a time
            return x_kept[:, c].to(ctx.x_dtype)

    def grads_of(outputs, inputs, grads):
        return _grad(outputs, inputs, [g.to(o.dtype) for g, o in zip(grads, outputs)])

    # k, v of the whole local sequence in the kernels' dtype: the kept tokens' from their graphs,
    # the dropped tokens' recomputed tile by tile without a graph
    k = v = None
    with torch.no_grad():
        qkv_a = tuple(rec.get(h) for h in keep["qkv_a"]) if a else None
        pieces = ([(slice(0, a), lambda: autocast_inputs(*qkv_a))] if a else []) + [
            (slice(a + c.start, a + c.stop),
             (lambda c=c: autocast_inputs(*block.before_attention(xb_at(c), cos[:, a:][:, c], sin[:, a:][:, c]))))
            for c in chunks]
        for at, make in pieces:
            _, kc, vc = make()
            if k is None:
                k, v, dk, dv = lay.buffers([((B, S, *kc.shape[2:]), kc.dtype, kc.device),
                                            ((B, S, *vc.shape[2:]), vc.dtype, vc.device),
                                            ((B, S, *kc.shape[2:]), torch.float32, kc.device),
                                            ((B, S, *vc.shape[2:]), torch.float32, vc.device)], zero=(2, 3))
            k[:, at], v[:, at] = kc, vc
            del kc, vc
        out_b = rec.get(keep["out_b"]) if policy.keep_attention and a < S else None
        lse = rec.get(keep["lse"]) if policy.keep_attention else None

    # the dropped tokens' tiles, last first
    for c in reversed(chunks):
        at = slice(a + c.start, a + c.stop)
        with torch.enable_grad():
            xq = xb_at(c).requires_grad_()
            qkv_c = block.before_attention(xq, cos[:, at], sin[:, at])
        q_c = qkv_c[0].detach()
        with torch.no_grad():
            if out_b is not None:
                o_c, lse_c = out_b[:, c], lse[:, :, at]
            else:
                o_c, lse_c = attn.forward_rows(q_c, k, v, at.start)
        with torch.enable_grad():
            xo = xb_at(c).requires_grad_()
            oc = o_c.detach().requires_grad_()
            yc = block.after_attention(xo, oc)
        g = _grad([yc], [xo, oc, *params], [dy[:, at]])
        dx[:, at], dout_c = g[0], g[1]
        dparams = [_add(p, n) for p, n in zip(dparams, g[2:])]
        del xo, oc, yc, g
        with torch.no_grad():
            dq_c = attn.backward_rows(dout_c, q_c, k, v, o_c, lse_c, at.start, dk, dv, key_block)
        del dout_c, o_c, lse_c
        g = grads_of(list(qkv_c), [xq, *params], [dq_c, dk[:, at], dv[:, at]])
        dx[:, at] += g[0]
        dparams = [_add(p, n) for p, n in zip(dparams, g[1:])]
        del xq, qkv_c, q_c, dq_c, g

    # the kept tokens (the first a): their stored graphs, once every later tile has added its dK, dV
    if a:
        xa, oa, (qa, ka, va), ya = ctx.graphs
        g = _grad([ya], [xa, oa, *params], [dy[:, :a]])
        dx_a, dout_a = g[0], g[1]
        dparams = [_add(p, n) for p, n in zip(dparams, g[2:])]
        with torch.no_grad():
            q_a = qkv_a[0]  # the stored copy: the graph's own tensors may have been freed into the host tier
            out_a = rec.get(keep["out_a"]) if policy.keep_attention else None
            dq_a = torch.empty_like(q_a)  # whole, as the graph takes it; filled tile by tile, last first
            for t in reversed(_chunks(a, B, lay.chunk_tokens)):
                if out_a is not None:
                    o_t, lse_t = out_a[:, t], lse[:, :, t]
                else:
                    o_t, lse_t = attn.forward_rows(q_a[:, t], k, v, t.start)
                dq_a[:, t] = attn.backward_rows(dout_a[:, t], q_a[:, t], k, v, o_t, lse_t, t.start, dk, dv, key_block)
                del o_t, lse_t
            del dout_a, out_a
        g = grads_of([qa, ka, va], [xa, *params], [dq_a, dk[:, :a], dv[:, :a]])
        dx[:, :a] = _add(dx_a, g[0])
        dparams = [_add(p, n) for p, n in zip(dparams, g[1:])]
    return dx, dparams


def wrap(block: nn.Module, policy: Callable[[int], LayerPolicy] | LayerPolicy, pool: HostPool | None,
         chunk_tokens: int = DEFAULT_CHUNK_TOKENS, arena=None) -> nn.Module:
    """Wraps `block.forward` in place (parameter names unchanged). `policy` is a LayerPolicy or a
    function of the block's tokens (rows x length) giving one (alpha per bucket); `pool` is the
    host tier, needed when a policy says tier="host"; backward recomputes the dropped tokens'
    per-token work `chunk_tokens` tokens at a time; `arena` (memory/arena.Arena) holds the
    whole-sequence buffers of attention by query tiles (allocator otherwise). Under no_grad (eval, a checkpointed segment's
    first forward) the block runs its MLP in the same tiles, without keeping anything."""
    inner = block.forward
    source = policy if callable(policy) else (lambda tokens: policy)
    lay = _Layer(block, source, pool, chunk_tokens, arena)

    def forward(x, cos, sin):
        if not torch.is_grad_enabled():  # eval, or a checkpointed segment's first forward: the MLP in tiles
            chunks = _chunks(x.shape[1], x.shape[0], chunk_tokens)
            if len(chunks) == 1:
                return inner(x, cos, sin)
            rows = getattr(block.attention_fn, "by_rows", lambda: None)()
            if rows is not None:  # sp 1: attention in query tiles too
                return _forward_by_rows(lay, rows, x, cos, sin, 0, None, False)[3]
            out = block.attention_fn(*block.before_attention(x, cos, sin))
            return _tiled(block.after_attention, chunks, lambda c: x[:, c], lambda c: out[:, c])
        return _MemoBlock.apply(lay, x, cos, sin, *block.parameters())

    forward.memo_layer = lay  # for inspection: the policy source, pool and chunk this block runs with
    block.forward = forward
    return block


# --- segments of blocks ----------------------------------------------------------------------------
def _run_blocks(blocks, x, cos, sin):
    for block in blocks:
        x = block(x, cos, sin)
    return x


def segment(model: nn.Module, layers_per_segment: int) -> None:
    """Recompute whole segments of `layers_per_segment` blocks (Megatron-LM's uniform
    `recompute_num_layers`; Chen et al., arXiv 1604.06174): forward keeps only each segment's
    input; backward reruns the segment's forward, attention included, with its blocks under their
    own policies (so they keep their inputs, or MEMO's share, for that segment only), then
    back-propagates it. The last segment is not recomputed: its backward starts at once. Peak
    block inputs: (segments - 1) + blocks per segment, instead of one per block, for one more
    forward of all but the last segment. Uses torch's reentrant checkpoint (RNG state restored,
    so recomputation is exact); gradients reach parameters through `.backward()`, which every
    trainer path uses (not `torch.autograd.grad`). Replaces `model.run_layers` on the instance."""
    from torch.utils.checkpoint import checkpoint

    if layers_per_segment < 1:
        raise ValueError(f"layers_per_segment={layers_per_segment}: expected a positive number of blocks")
    layers = list(model.model.layers)
    segments = [tuple(layers[i:i + layers_per_segment]) for i in range(0, len(layers), layers_per_segment)]
    if layers_per_segment == 1 or len(segments) < 2:
        return

    def run_layers(x, cos, sin):
        if not torch.is_grad_enabled():
            return _run_blocks(layers, x, cos, sin)
        for blocks in segments[:-1]:
            x = checkpoint(_run_blocks, blocks, x, cos, sin, use_reentrant=True, preserve_rng_state=True)
        return _run_blocks(segments[-1], x, cos, sin)

    model.run_layers = run_layers
