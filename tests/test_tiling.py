"""Sequence tiling in forward (issue 21, item 2): a wrapped block's work that runs without a graph
(the tokens MEMO recomputes, all of them under full recomputation) goes through the MLP in tiles
of `chunk_tokens` tokens, as its backward already does, so no [tokens, intermediate] transient of
the whole local sequence exists. Exact against the unwrapped model (fp32, values and gradients),
alone, with MEMO's host tier, and with the Cut Cross-Entropy loss."""

import copy

import pytest
import torch
from longctx.kernels.loss import linear_cross_entropy
from longctx.memory.offload import FULL_RECOMPUTE, LayerPolicy
from test_memory import assert_same, batch, run, tiny, wrapped
from torch.utils._python_dispatch import TorchDispatchMode

CHUNK = 17  # tokens per tile: divides nothing here (2 rows x 48 positions)


class _Widest(TorchDispatchMode):
    """The largest number of elements of any activation ([rows, tokens, ...]) an op outputs whose
    last dimension is `width`."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width, self.largest = width, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dim() >= 3 and t.shape[-1] == self.width:  # activations, not weights
                self.largest = max(self.largest, t.numel())
        return out


def _forward_widest(model, ids, labels) -> int:
    widest = _Widest(model.config.intermediate_size)
    with widest:
        loss = model(ids, labels=labels)
    loss.backward()
    return widest.largest


@pytest.mark.parametrize("policy", [FULL_RECOMPUTE, LayerPolicy(alpha=0.25, tier="host")], ids=["full", "memo-0.25"])
def test_forward_mlp_runs_in_tiles_and_stays_exact(policy):
    model = tiny()
    ids, labels = batch()
    B, S = ids.shape
    inter = model.config.intermediate_size
    want = run(model, ids, labels, steps=2)
    m, _ = wrapped(model, [policy] * model.config.num_layers, chunk_tokens=CHUNK)
    assert_same(want, run(m, ids, labels, steps=2))
    kept = round(policy.alpha * S)  # the kept tokens' graph is built whole: its tensors are saved anyway
    tile = max(1, CHUNK // B) * B  # _chunks: positions per tile x rows
    bound = max(kept * B, tile) * inter
    widest = _forward_widest(m, ids, labels)
    assert widest <= bound, f"a forward tensor of {widest} elements of width {inter}: tiles hold {bound}"
    assert _forward_widest(model, ids, labels) == B * S * inter  # the unwrapped model: whole sequence


def test_tiled_forward_with_cce_loss_matches():
    """The same with the loss the trainer uses (the chunked CCE path on CPU), summed."""
    def cce(h, w, y):
        return linear_cross_entropy(h, w, y, reduction="sum", impl="cce_torch")

    model = tiny()
    model.loss_fn = cce
    ids, labels = batch()
    want = run(model, ids, labels, steps=1)
    m, _ = wrapped(model, [LayerPolicy(alpha=0.5, tier="host")] * model.config.num_layers, chunk_tokens=CHUNK)
    assert_same(want, run(m, ids, labels, steps=1), tol=2e-6)


# --- block inputs kept in the compute dtype under autocast (issue 21, item 2) --------------------
def _grads(model, ids, labels, autocast):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(ids, labels=labels)
    loss.backward()
    return loss.detach().float(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("policy", [FULL_RECOMPUTE, LayerPolicy(alpha=0.5, tier="host")], ids=["full", "memo-0.5"])
def test_recomputed_tokens_inputs_kept_in_bf16_under_autocast(policy):
    """Under bf16 autocast over fp32 weights the residual stream is fp32; the block input kept for
    recomputation is stored in bf16 (`input_dtype`), half the bytes. The projections see bf16
    casts of the normalised input anyway, so the gradients stay within twice the unwrapped autocast
    model's own error against fp32 (per tensor, relative Frobenius norm), and the kept bytes halve."""
    import dataclasses

    from longctx.memory.offload import HostPool

    model = tiny()
    ids, labels = batch()
    _, exact = _grads(model, ids, labels, autocast=False)
    plain_loss, plain = _grads(model, ids, labels, autocast=True)
    kept = {}
    for dtype in (None, torch.bfloat16):
        pool = HostPool("cpu")
        m, _ = wrapped(model, [dataclasses.replace(policy, input_dtype=dtype)] * model.config.num_layers, pool=pool,
                       chunk_tokens=CHUNK)
        loss, got = _grads(m, ids, labels, autocast=True)
        kept[dtype] = pool.last_step_bytes if policy.tier == "host" else None
    for name, g in got.items():
        ref = exact[name]
        err = ((g - ref).norm() / ref.norm()).item()
        plain_err = ((plain[name] - ref).norm() / ref.norm()).item()
        assert err <= 2 * plain_err + 1e-6, f"{name}: relative error {err:.3g}, unwrapped autocast {plain_err:.3g}"
    assert abs(loss.item() - plain_loss.item()) <= 1e-2
    if policy.tier == "host":  # x_b is half of what a dropped token keeps beside attention's output
        assert kept[torch.bfloat16] < kept[None], kept


def test_layer_policy_input_dtype_defaults_to_as_is():
    assert LayerPolicy().input_dtype is None and FULL_RECOMPUTE.input_dtype is None


def test_no_grad_forward_of_wrapped_blocks_runs_in_tiles():
    """Eval and a checkpointed segment's first forward run wrapped blocks under no_grad: their MLP
    goes through the same tiles (no whole-sequence [tokens, intermediate] transient), equal to the
    unwrapped forward within fp32 rounding."""
    model = tiny()
    ids, _ = batch()
    B, S = ids.shape
    m, _ = wrapped(model, [FULL_RECOMPUTE] * model.config.num_layers, chunk_tokens=CHUNK)
    widest = _Widest(model.config.intermediate_size)
    with torch.no_grad(), widest:
        got = m(ids)
    assert widest.largest <= max(1, CHUNK // B) * B * model.config.intermediate_size, widest.largest
    with torch.no_grad():
        want = model(ids)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * want.abs().max().item())


def test_kept_inputs_are_cast_back_one_tile_at_a_time():
    """Backward casts the bf16 copy of a recomputed token's input back to fp32 one tile at a time:
    no fp32 tensor of the whole recomputed length is made in backward (it would be a transient
    the memory model does not count)."""
    import dataclasses

    model = tiny()
    ids, labels = batch()
    B, S = ids.shape
    hidden = model.config.hidden_size
    policy = dataclasses.replace(FULL_RECOMPUTE, input_dtype=torch.bfloat16)
    m, _ = wrapped(model, [policy] * model.config.num_layers, chunk_tokens=CHUNK)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = m(ids, labels=labels)
    casts = []

    class _Casts(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten._to_copy.default and args[0].dtype == torch.bfloat16 \
                    and out.dtype == torch.float32 and out.dim() == 3 and out.shape[-1] == hidden:
                casts.append(out.shape[1])
            return out

    with _Casts():
        loss.backward()
    tile = max(1, CHUNK // B)
    assert casts and max(casts) <= tile, f"bf16 -> fp32 casts of {sorted(set(casts))} positions; tiles hold {tile}"


@pytest.mark.parametrize("dtype,policy", [("bf16", "full"), ("bf16", "memo"), ("fp32", "full"), ("fp32", "memo")])
def test_trainer_keeps_recomputed_inputs_in_bf16_only_under_autocast(dtype, policy):
    """train/build.py apply_memory: a bf16 run (autocast over fp32 weights) wraps every block, MEMO's
    swapped and resident ones and full recomputation's, with input_dtype bf16; an fp32 run with None."""
    from longctx.parallel.mesh import Mesh
    from longctx.recipes import schema
    from longctx.train.build import apply_memory

    recipe = schema.load(None, [f"run.dtype={dtype}", f"memory.policy={policy}", "memory.resident_layers=1"])
    model = tiny()
    apply_memory(model, recipe, Mesh(0, 1, 0, 1, None, torch.device("cpu")), None)
    want = torch.bfloat16 if dtype == "bf16" else None
    for i, layer in enumerate(model.model.layers):
        lay = layer.forward.memo_layer
        assert lay.policy(96).input_dtype is want, (i, lay.policy(96))


# --- attention's backward in query tiles (issue 21: the backward's whole-sequence workspace) ------
class _WidestNew(TorchDispatchMode):
    """The largest tensor of shape [..., heads, head_dim] an op creates (views of its inputs and
    outputs sharing their storage are not new memory)."""

    def __init__(self, heads: int, head_dim: int) -> None:
        super().__init__()
        self.tail, self.largest = (heads, head_dim), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dim() >= 3 and tuple(t.shape[-2:]) == self.tail \
                    and t.untyped_storage().data_ptr() not in seen:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("policy", [FULL_RECOMPUTE, LayerPolicy(alpha=0.25, tier="host"),
                                    LayerPolicy(alpha=0.0, tier="device")], ids=["full", "memo-0.25", "memo-0"])
def test_backward_runs_attention_in_query_tiles_and_stays_exact(policy):
    """At sp 1 a wrapped block's backward goes query tile by query tile, last first: no tensor of
    the whole local sequence's query width (q, the attention output's gradient, dQ) is made, only
    one tile's (or the kept tokens', whose graphs are whole); values and gradients equal the
    unwrapped model (fp32)."""
    model = tiny()
    ids, labels = batch()
    B, S = ids.shape
    cfg = model.config
    want = run(model, ids, labels, steps=2)
    m, _ = wrapped(model, [policy] * cfg.num_layers, chunk_tokens=CHUNK)
    assert_same(want, run(m, ids, labels, steps=2))
    loss = m(ids, labels=labels)
    widest = _WidestNew(cfg.num_heads, cfg.head_dim)
    with widest:
        loss.backward()
    kept = round(policy.alpha * S)
    tile = max(1, CHUNK // B) * B
    bound = max(kept * B, tile) * cfg.num_heads * cfg.head_dim
    assert widest.largest <= bound, f"a backward tensor of {widest.largest} query-width elements: tiles hold {bound}"


def test_backward_by_query_tiles_under_bf16_autocast_matches_unwrapped():
    """The same under bf16 autocast (the trainer's regime, kept inputs in bf16): gradients within
    2x the unwrapped autocast model's error against fp32."""
    import dataclasses

    model = tiny()
    ids, labels = batch()
    _, ref = _grads(model, ids, labels, autocast=False)
    _, plain = _grads(model, ids, labels, autocast=True)
    policy = dataclasses.replace(LayerPolicy(alpha=0.25, tier="host"), input_dtype=torch.bfloat16)
    m, _ = wrapped(model, [policy] * model.config.num_layers, chunk_tokens=CHUNK)
    _, got = _grads(m, ids, labels, autocast=True)
    for name in ref:
        err_plain = (plain[name] - ref[name]).abs().max().item()
        err_got = (got[name] - ref[name]).abs().max().item()
        assert err_got <= 2 * err_plain + 1e-6, (name, err_got, err_plain)


# --- the final norm and the loss in tiles (issue 21: the loss head tiled) --------------------------
def _kept_bytes(fn):
    """Bytes of the distinct storages autograd still keeps once fn() returns (a graph's tensors
    freed inside it, e.g. a tile's, do not count); parameters aside."""
    import weakref

    seen = []

    def pack(t):
        seen.append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    params = {p.untyped_storage().data_ptr() for p in fn.model.parameters()}
    alive = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for r in seen if (t := r()) is not None}
    return out, sum(n for ptr, n in alive.items() if ptr not in params)


def _head_bytes(model, ids, labels):
    """What the final norm + loss keep for backward: the whole forward's kept bytes less the blocks'."""
    def whole():
        return model(ids, labels=labels)

    def blocks():
        return model.residual_stream(ids)

    whole.model = blocks.model = model
    return _kept_bytes(whole)[1] - _kept_bytes(blocks)[1]


@pytest.mark.parametrize("impl", ["reference", "cce_torch"])
@pytest.mark.parametrize("tile", [CHUNK, 4096])
def test_tiled_head_matches_and_keeps_only_the_residual_gradient(impl, tile):
    """model.loss_tile_tokens: the final norm + loss run over token tiles with their gradients
    computed in forward; loss and every gradient equal the untiled head (fp32, 1e-6, two steps so
    in-place scaling cannot leak into the next), with ignored labels in the batch; and of the
    head only the residual stream's gradient stays for backward: [tokens, hidden] fp32, not the
    norm's input, statistics and output."""
    def loss(h, w, y):
        return linear_cross_entropy(h, w, y, reduction="sum", impl=impl)

    model = tiny()
    model.loss_fn = loss
    ids, labels = batch()
    labels = labels.clone()
    labels[0, :5] = -100
    want = run(model, ids, labels, steps=2)
    tiled = copy.deepcopy(model)
    tiled.loss_tile_tokens = tile
    assert_same(want, run(tiled, ids, labels, steps=2))
    N, h, V = ids.numel(), model.config.hidden_size, model.config.vocab_size
    # the residual stream's gradient and the two weights' gradients, nothing else
    assert _head_bytes(tiled, ids, labels) == 4 * (N * h + h + V * h)
    assert _head_bytes(model, ids, labels) >= 4 * 2 * N * h  # the norm's input and output, at least


def test_tiled_head_under_bf16_autocast_and_frozen_weights():
    """Under bf16 autocast, within 2x the untiled head's error against fp32; with the output weight
    frozen (no gradient asked) the tiled head returns none for it, like the untiled one."""
    model = tiny()
    ids, labels = batch()
    _, ref = _grads(model, ids, labels, autocast=False)
    _, plain = _grads(model, ids, labels, autocast=True)
    tiled = copy.deepcopy(model)
    tiled.loss_tile_tokens = CHUNK
    _, got = _grads(tiled, ids, labels, autocast=True)
    for name in ref:
        err_plain = (plain[name] - ref[name]).abs().max().item()
        assert (got[name] - ref[name]).abs().max().item() <= 2 * err_plain + 1e-6, name
    tiled.lm_head.weight.requires_grad_(False)
    tiled.zero_grad(set_to_none=True)
    tiled(ids, labels=labels).backward()
    assert tiled.lm_head.weight.grad is None and tiled.model.norm.weight.grad is not None


def test_trainer_tiles_the_head_under_recompute():
    from longctx.parallel.mesh import Mesh
    from longctx.recipes import schema
    from longctx.train.build import apply_memory

    for policy, want in (("none", None), ("full", 333), ("memo", 333)):
        recipe = schema.load(None, [f"memory.policy={policy}", "memory.recompute_chunk_tokens=333"])
        model = tiny()
        apply_memory(model, recipe, Mesh(0, 1, 0, 1, None, torch.device("cpu")), None)
        assert model.loss_tile_tokens == want, policy


# --- planned buffers (issue 21: the arena) ----------------------------------------------------------
@pytest.mark.parametrize("policy", [FULL_RECOMPUTE, LayerPolicy(alpha=0.25, tier="host")], ids=["full", "memo-0.25"])
@pytest.mark.parametrize("per_segment", [1, 2])
def test_arena_buffers_are_reused_by_every_block_and_exact(policy, per_segment):
    """memory.arena: attention's whole-sequence buffers by query tiles come from one buffer, laid out
    once per shape and reused by every block's forward and backward (and a recomputed segment's);
    values and gradients are bitwise those of the allocator's buffers, over two steps."""
    from longctx.memory import offload
    from longctx.memory.arena import Arena

    model = tiny()
    ids, labels = batch()
    plain, _ = wrapped(model, [policy] * model.config.num_layers, chunk_tokens=CHUNK)
    offload.segment(plain, per_segment)
    arena = Arena("cpu")
    m = copy.deepcopy(model)
    pool = offload.HostPool("cpu")
    for layer in m.model.layers:
        offload.wrap(layer, policy, pool, CHUNK, arena)
    offload.segment(m, per_segment)
    want, got = run(plain, ids, labels, steps=1), run(m, ids, labels, steps=1)
    grows = arena.grows
    assert grows == 2 and arena.nbytes > 0  # forward's k, v, then backward's k, v, dk, dv: once per length
    want += run(plain, ids, labels, steps=1)
    got += run(m, ids, labels, steps=1)
    for (l0, g0), (l1, g1) in zip(want, got):
        assert torch.equal(l0, l1)
        for name in g0:
            assert torch.equal(g0[name], g1[name]), name
    assert arena.grows == grows  # the second step reuses it
    assert arena.requests >= 2 * 2 * model.config.num_layers  # forward and backward of every block, two steps
    assert arena.layouts and all(peak <= arena.nbytes for _, peak in arena.layouts.values())


def test_arena_rejects_another_device_and_lays_out_without_overlap():
    from longctx.memory.arena import Arena
    from longctx.memory.plan import check_layout

    arena = Arena("cpu")
    with pytest.raises(ValueError, match="arena on cpu"):
        arena.views([((2, 3), torch.float32, torch.device("meta"))])
    a, b = arena.views([((5, 7), torch.float32, torch.device("cpu")), ((3,), torch.bfloat16, torch.device("cpu"))])
    a.fill_(1.0)
    b.fill_(2.0)
    assert a.sum().item() == 35 and b.float().sum().item() == 6  # disjoint bytes
    offsets, peak = next(iter(arena.layouts.values()))
    check_layout([5 * 7 * 4, 3 * 2], [(0, 1), (0, 1)], offsets)


def test_trainer_wires_the_arena_and_expandable_segments(monkeypatch):
    from longctx.parallel.mesh import Mesh
    from longctx.recipes import schema
    from longctx.train.build import allocator_settings, apply_memory

    recipe = schema.load(None, ["memory.policy=full", "memory.arena=true"])
    model = tiny()
    apply_memory(model, recipe, Mesh(0, 1, 0, 1, None, torch.device("cpu")), None)
    arenas = {id(layer.forward.memo_layer.arena) for layer in model.model.layers}
    assert len(arenas) == 1 and model.model.layers[0].forward.memo_layer.arena is not None
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    assert allocator_settings(recipe) == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")  # the user's own: kept
    assert allocator_settings(recipe) == "max_split_size_mb:128"
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    assert allocator_settings(schema.load(None, ["memory.expandable_segments=false"])) is None


def test_tiled_head_sums_weight_gradients_in_fp32_for_bf16_weights():
    """With bf16 weights (FSDP2's bf16 unsharded copies), the head's weight gradients are summed over
    the tiles in fp32 and cast once: within 2x the untiled head's error against fp64, however many
    tiles (seen failing when summed in bf16: 6-11x at 256 tiles)."""
    torch.manual_seed(0)
    N, h, V, tile = 16384, 64, 256, 64
    x = torch.randn(N, h, dtype=torch.float64)
    labels = torch.randint(0, V, (N,))
    norm64 = (1 + 0.1 * torch.randn(h, dtype=torch.float64)).requires_grad_()
    w64 = (0.1 * torch.randn(V, h, dtype=torch.float64)).requires_grad_()

    def loss_fn(hid, w, y):
        return linear_cross_entropy(hid, w, y, reduction="sum", impl="reference")

    from longctx.models.llama import _TiledHead, rms_norm

    loss_fn(rms_norm(x, norm64, 1e-5), w64, labels).backward()
    want = (norm64.grad, w64.grad)

    def grads(tiled):
        nw = norm64.detach().bfloat16().requires_grad_()
        w = w64.detach().bfloat16().requires_grad_()
        xb = x.bfloat16()
        if tiled:
            loss = _TiledHead.apply(xb, nw, w, labels, 1e-5, loss_fn, tile)
        else:
            loss = loss_fn(rms_norm(xb, nw, 1e-5), w, labels)
        loss.backward()
        assert nw.grad.dtype == w.grad.dtype == torch.bfloat16
        return nw.grad.double(), w.grad.double()

    plain, tiled = grads(False), grads(True)
    for name, p, t, r in zip(("norm", "output"), plain, tiled, want):
        err_plain, err_tiled = (p - r).abs().max().item(), (t - r).abs().max().item()
        assert err_tiled <= 2 * err_plain, (name, err_tiled, err_plain)


@pytest.mark.parametrize("policy", [FULL_RECOMPUTE, LayerPolicy(alpha=0.25, tier="host")], ids=["full", "memo-0.25"])
def test_wrapped_blocks_with_frozen_weights(policy):
    """A wrapped block whose weights are partly frozen (LoRA's base, an embedding-only run):
    backward returns no gradient for them and equal ones for the rest (it used to raise)."""
    model = tiny()
    for name, p in model.named_parameters():
        if "q_proj" in name or "gate_proj" in name:
            p.requires_grad_(False)
    ids, labels = batch()

    def step(mod):
        mod.zero_grad(set_to_none=True)
        loss = mod(ids, labels=labels)
        loss.backward()
        assert all(p.grad is None for p in mod.parameters() if not p.requires_grad)
        return [(loss.detach(), {n: p.grad.clone() for n, p in mod.named_parameters() if p.requires_grad})]

    want = step(model)
    m, _ = wrapped(model, [policy] * model.config.num_layers, chunk_tokens=CHUNK)
    assert_same(want, step(m), tol=2e-6)


def test_arena_without_recompute_is_refused():
    from longctx.recipes import schema

    with pytest.raises(schema.RecipeError, match="memory.arena=true: has no effect with memory.policy=none"):
        schema.load(None, ["memory.arena=true"])


def test_kept_tokens_go_through_attention_in_query_tiles(monkeypatch):
    """MEMO's kept tokens (alpha x length, more than a tile here) go through forward_rows and
    backward_rows one tile at a time as well, never as one tile of all of them."""
    from longctx.kernels.attention import LocalAttention

    seen = []
    fwd, bwd = LocalAttention.forward_rows, LocalAttention.backward_rows

    def forward_rows(self, q, k, v, start):
        seen.append(q.shape[1])
        return fwd(self, q, k, v, start)

    def backward_rows(self, dout, q, *args):
        seen.append(q.shape[1])
        return bwd(self, dout, q, *args)

    monkeypatch.setattr(LocalAttention, "forward_rows", forward_rows)
    monkeypatch.setattr(LocalAttention, "backward_rows", backward_rows)
    model = tiny()
    ids, labels = batch()
    B, S = ids.shape
    policy = LayerPolicy(alpha=0.75, tier="host")
    assert round(policy.alpha * S) > max(1, CHUNK // B)
    m, _ = wrapped(model, [policy] * model.config.num_layers, chunk_tokens=CHUNK)
    assert_same(run(model, ids, labels), run(m, ids, labels), tol=2e-6)
    assert seen and max(seen) <= max(1, CHUNK // B), sorted(set(seen))
