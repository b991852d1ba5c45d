"""The schedules' block compositions in one process (tests/_sp_blocks.py) with the CPU kernel:
the contract that tests/gpu/test_gpu_sp_blocks.py holds the CUDA kernels to, values and
gradients, fp32 and bf16, GQA, odd lengths, 3 and 4 simulated ranks."""

import _sp_blocks
import pytest
import torch
from longctx.kernels.attention import reference_block_attn, reference_block_attn_bwd


def _case(B, S, Hq, Hkv, D, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q, dout = (torch.randn(B, S, Hq, D, generator=g) for _ in range(2))
    k, v = (torch.randn(B, S, Hkv, D, generator=g) for _ in range(2))
    lowp = [t.to(device=device, dtype=dtype) for t in (q, k, v, dout)]
    out, lse = reference_block_attn(q.double(), k.double(), v.double(), True)
    want = (out, *reference_block_attn_bwd(dout.double(), q.double(), k.double(), v.double(), out, lse, True))
    return lowp, [w.float().to(device) for w in want]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("P", [3, 4])
@pytest.mark.parametrize("name", _sp_blocks.SCHEDULES)
def test_block_composition_matches_whole_sequence(name, P, dtype):
    (q, k, v, dout), want = _case(2, 77, 6, 2, 32, dtype)
    got = _sp_blocks.emulate(name, q, k, v, dout, P, "auto")
    base = _sp_blocks.whole(q, k, v, dout, "auto")
    problems = _sp_blocks.errors(got, want, base, dtype, P)
    assert not problems, f"{name} P={P} {dtype}: " + "; ".join(problems)


def test_block_composition_catches_a_wrong_merge(monkeypatch):
    """The check can fail: a merge that drops the partial's rows is caught."""
    from longctx.parallel import blocks

    monkeypatch.setattr(blocks, "merge_into", lambda *a: None)
    (q, k, v, dout), want = _case(1, 48, 4, 4, 16, torch.float32)
    got = _sp_blocks.emulate("ring", q, k, v, dout, 3, "auto")
    assert _sp_blocks.errors(got, want, _sp_blocks.whole(q, k, v, dout, "auto"), torch.float32, 3)


def test_merge_into_row_views_and_empty_rows():
    """merge_into updates row views of the accumulators in place, equals merge, and a partial
    whose rows saw no key (lse +inf from some kernels, or -inf) leaves those rows as they were."""
    from longctx.kernels.attention import merge, merge_into

    g = torch.Generator().manual_seed(0)
    out, part = torch.randn(2, 10, 3, 8, generator=g), torch.randn(2, 5, 3, 8, generator=g)
    lse, part_lse = torch.randn(2, 3, 10, generator=g), torch.randn(2, 3, 5, generator=g)
    part_lse[:, :, 0], part_lse[:, :, 1] = float("inf"), float("-inf")  # rows with no visible key
    want_out, want_lse = merge(out[:, 5:].clone(), lse[:, :, 5:].clone(), part, part_lse)
    before = out.clone(), lse.clone()
    merge_into(out[:, 5:], lse[:, :, 5:], part, part_lse)
    torch.testing.assert_close(out[:, 5:], want_out)
    torch.testing.assert_close(lse[:, :, 5:], want_lse)
    torch.testing.assert_close(out[:, :5], before[0][:, :5])  # other rows untouched
    torch.testing.assert_close(out[:, 5:7], before[0][:, 5:7])  # the empty partial rows change nothing
    torch.testing.assert_close(lse[:, :, 5:7], before[1][:, :, 5:7])
