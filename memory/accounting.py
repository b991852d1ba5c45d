"""Bytes saved for backward, per layer and tier, measured with `saved_tensors_hooks`.

`SavedBytes(layers)` is a context manager around a forward pass. Inside it:
- tensors autograd saves outside a MEMO-wrapped block are counted as tier "device" (they stay
  where they were made: on the accelerator, or in process memory on CPU);
- MEMO-wrapped blocks (memory/offload.py) install their own hooks and report what they keep, per
  tier ("device" or "host"), through `record`.
Storages are counted once (a view of a counted storage adds nothing). Parameters, their
autocast copies and the tensors a block receives besides its input (RoPE cos/sin, shared by all
blocks) are not activations and are not counted. Autocast casts a frozen weight (LoRA's base) anew
at every use, without a graph that leads back to it, and autograd keeps the cast for the input
gradient: such copies are found by value and counted apart, in `weight_copy_bytes`. Layer names come from forward pre-hooks on the
tracked blocks ("layers.3"); anything saved outside them (embedding, final norm, loss) is "other".
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

TIERS = ("device", "host")
_ACTIVE: list[SavedBytes] = []


def storage_key(t: torch.Tensor) -> tuple[str, int]:
    return (t.device.type, t.untyped_storage().data_ptr())


_RESHAPES = {"ToCopyBackward0", "TBackward0", "ViewBackward0", "TransposeBackward0", "PermuteBackward0",
             "ExpandBackward0", "UnsafeViewBackward0"}


def is_weight(t: torch.Tensor, param_keys: set) -> bool:
    """A parameter, or a cast/view of one (autocast's bf16 weight copy, its transpose)."""
    if storage_key(t) in param_keys:
        return True
    fn = t.grad_fn
    while fn is not None and type(fn).__name__ in _RESHAPES and fn.next_functions:
        fn = fn.next_functions[0][0]
    return fn is not None and type(fn).__name__ == "AccumulateGrad" and storage_key(fn.variable) in param_keys


class SavedBytes:
    def __init__(self, model: nn.Module, layers: list[nn.Module]) -> None:
        self.param_keys = set()
        self.frozen: dict[tuple, list[torch.Tensor]] = defaultdict(list)  # 2-D frozen weights by shape
        for p in model.parameters():
            self.param_keys.add(storage_key(p))
            if not p.requires_grad and p.dim() == 2:
                self.frozen[tuple(p.shape)].append(p)
        self.weight_copy_bytes = 0  # saved casts of frozen weights (per layer, not per token)
        self.layers = layers
        self.bytes: dict[tuple[str, str], int] = defaultdict(int)  # (layer, tier) -> bytes
        self.tokens = 0  # tokens through the first tracked layer
        self._seen: set = set()
        self._layer = "other"
        self._shared: set = set()
        self._handles: list = []
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    # --- what wrapped blocks and the hooks report ------------------------------------------------
    def record(self, tier: str, nbytes: int) -> None:
        self.bytes[(self._layer, tier)] += nbytes

    def _pack(self, t: torch.Tensor):
        key = storage_key(t)
        if key not in self._seen and key not in self._shared and not is_weight(t, self.param_keys):
            self._seen.add(key)
            if self._frozen_copy(t):
                self.weight_copy_bytes += t.untyped_storage().nbytes()
            else:
                self.record("device", t.untyped_storage().nbytes())
        return t

    def _frozen_copy(self, t: torch.Tensor) -> bool:
        """t is a cast of a frozen weight (or its transpose): no graph, a frozen weight's shape, its values."""
        if t.grad_fn is not None or t.requires_grad or t.dim() != 2 or not t.is_floating_point():
            return False
        for w in (t, t.t()):
            for p in self.frozen.get(tuple(w.shape), ()):
                if p.dtype != w.dtype and torch.equal(w, p.to(w.dtype)):
                    return True
        return False

    # --- layer attribution -----------------------------------------------------------------------
    def _enter(self, i: int):
        def hook(module, args):
            self._layer = f"layers.{i}"
            self._shared = {storage_key(a) for a in args[1:] if isinstance(a, torch.Tensor)}
            if i == 0:
                self.tokens += args[0].shape[0] * args[0].shape[1]
        return hook

    def _leave(self, module, args, out):
        self._layer, self._shared = "other", set()

    def __enter__(self) -> SavedBytes:
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_pre_hook(self._enter(i)))
            self._handles.append(layer.register_forward_hook(self._leave))
        self._hooks.__enter__()
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.remove(self)
        self._hooks.__exit__(*exc)
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # --- results ---------------------------------------------------------------------------------
    def per_layer(self, tier: str) -> dict[str, int]:
        return {layer: b for (layer, t), b in self.bytes.items() if t == tier}

    def bytes_per_token_layer(self, tier: str) -> float:
        """Mean over the tracked layers of the bytes each saves per token."""
        if not self.tokens or not self.layers:
            return 0.0
        total = sum(b for (layer, t), b in self.bytes.items() if t == tier and layer != "other")
        return total / len(self.layers) / self.tokens

    def summary(self) -> dict:
        return {
            "tokens": self.tokens,
            **{f"{tier}_bytes_per_token_layer": self.bytes_per_token_layer(tier) for tier in TIERS},
            **{f"{tier}_bytes_other": self.bytes.get(("other", tier), 0) for tier in TIERS},
        }


def record(tier: str, nbytes: int) -> None:
    """Called by memory/offload.py for what a wrapped block keeps; a no-op when not measuring."""
    for meter in _ACTIVE:
        meter.record(tier, nbytes)


def pinned_bytes(nbytes: int) -> int:
    """Host bytes a pinned allocation of `nbytes` really takes: PyTorch's CUDA caching host
    allocator rounds every request up to the next power of two (so it can reuse blocks)."""
    return 0 if nbytes <= 0 else 1 << (int(nbytes) - 1).bit_length()


class LiveBytes:
    """The bytes of tensor storages created while it is active that are still alive, after every
    op, and their peak: what the code keeps, tensor by tensor, to hold a memory model against
    (tests/test_memory.py). A storage counts from the op that makes it until the last tensor
    using it is gone (PyTorch keeps a tensor's Python object alive as long as C++ holds the
    tensor, so autograd's saved tensors count). Storages that existed before (parameters,
    inputs) are not counted, nor an op kernel's internal scratch, which never surfaces."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        meter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                meter._seen(out, args, kwargs)
                return out

        self.live = 0
        self.peak = 0
        self._storages: dict[int, list[int]] = {}  # data ptr -> [bytes, tensors alive]
        self._mode = _Mode()

    def _seen(self, out, args, kwargs) -> None:
        import weakref

        leaves = torch.utils._pytree.tree_leaves
        inputs = {t.untyped_storage().data_ptr() for t in leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            ptr, n = st.data_ptr(), st.nbytes()
            entry = self._storages.get(ptr)
            if entry is None:
                if n == 0 or ptr in inputs:  # a view or an in-place result of a storage from before
                    continue
                entry = self._storages[ptr] = [n, 0]
                self.live += n
            entry[1] += 1
            weakref.finalize(t, self._drop, ptr, entry)
        self.peak = max(self.peak, self.live)

    def _drop(self, ptr: int, entry: list[int]) -> None:
        entry[1] -= 1
        if entry[1] == 0 and self._storages.get(ptr) is entry:
            del self._storages[ptr]
            self.live -= entry[0]

    def reset_peak(self) -> None:
        self.peak = self.live

    def __enter__(self) -> LiveBytes:
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)
