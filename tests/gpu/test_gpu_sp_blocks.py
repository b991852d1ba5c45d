"""The sequence-parallel schedules' kernel part on the GPU (one device, no process groups): every
simulated rank's blocks computed with each CUDA kernel and merged as the schedules do
(tests/_sp_blocks.py; the CPU contract is tests/test_sp_blocks.py), against the fp32 reference,
values and gradients, within twice the same kernel's whole-sequence error times sqrt(P/2) plus
two roundings; and the chooser's start-up calibration on CUDA (parallel/topology.py). TF32 off."""

import sys
from pathlib import Path
from types import SimpleNamespace

import _gpu
import pytest
import torch
from longctx.kernels import capability
from longctx.kernels.attention import reference_block_attn, reference_block_attn_bwd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared _sp_blocks helper
import _sp_blocks  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

_FLASH_ATTN_OK, _FLASH_ATTN_WHY = capability.flash_attn_status()
KERNELS = [
    pytest.param("aten_flash", torch.bfloat16, id="aten_flash-bf16"),
    pytest.param("aten_efficient", torch.float32, id="aten_efficient-fp32"),
    pytest.param("aten_efficient", torch.bfloat16, id="aten_efficient-bf16"),
    pytest.param("flash_attn", torch.bfloat16, id="flash_attn-bf16",
                 marks=pytest.mark.skipif(not _FLASH_ATTN_OK, reason=f"flash_attn unavailable: {_FLASH_ATTN_WHY}")),
]


@pytest.mark.parametrize("P", [3, 4])
@pytest.mark.parametrize("name", _sp_blocks.SCHEDULES)
@pytest.mark.parametrize("kernel,dtype", KERNELS)
def test_schedule_blocks_with_cuda_kernels(kernel, dtype, name, P):
    g = torch.Generator().manual_seed(0)
    B, S, Hq, Hkv, D = 2, 1000, 8, 2, 64  # GQA, two rows (strided local slices), a length that is no multiple of 2P
    q, dout = (torch.randn(B, S, Hq, D, generator=g) for _ in range(2))
    k, v = (torch.randn(B, S, Hkv, D, generator=g) for _ in range(2))
    with _gpu.ieee_fp32():
        out, lse = reference_block_attn(*(t.cuda() for t in (q, k, v)), True)
        want = (out, *reference_block_attn_bwd(dout.cuda(), q.cuda(), k.cuda(), v.cuda(), out, lse, True))
        lowp = [t.to(device="cuda", dtype=dtype) for t in (q, k, v, dout)]
        got = _sp_blocks.emulate(name, *lowp, P, kernel)
        base = _sp_blocks.whole(*lowp, kernel)
    problems = _sp_blocks.errors(got, [w.float() for w in want], base, dtype, P)
    assert not problems, f"{name} P={P} {kernel} {dtype}: " + "; ".join(problems)
    _gpu.release_cuda_memory()


def test_calibration_on_cuda_measures_a_plausible_machine():
    from longctx.parallel import topology

    recipe = SimpleNamespace(link="auto", inter_node_gbps=400.0, attention_tflops="auto", attention_kernel="auto")
    machine = topology.machine_for_run(recipe, torch.device("cuda"), torch.bfloat16)
    assert 1e12 < machine.flops < 5e15, machine  # between a small GPU and beyond any H200
    assert 1e11 < machine.memory_bandwidth < 2e13, machine
    assert topology.detect_intra_link(torch.device("cuda")) == machine.intra.name  # nvidia-smi read on this machine
