"""The cost model behind `parallel.attention: auto` (parallel/choose.py) and the machine it
prices schedules on (parallel/topology.py)."""

import json
import math
from types import SimpleNamespace

import _dist
import pytest
import torch
from longctx.parallel import topology
from longctx.parallel.choose import OUTER, SCHEDULES, Shape, bytes_moved, choose, estimate
from longctx.parallel.topology import LINKS, LinkClass, Machine, make_machine, transfer_seconds

# S=64 tokens over P=4 ranks (n=16), Hq=4, Hkv=2, d=8, bf16: per rank
#   q = 16*4*8*2 = 1024, kv = 2*16*2*8*2 = 1024 (K and V), lse = 16*4*4 = 256,
#   dq32 = 16*4*8*4 = 2048, dkv32 = 2*16*2*8*4 = 2048
SMALL = Shape(64, 4, 2, 8, 4, 2)


def test_bytes_moved_by_hand():
    expect = {
        # fwd: 3 K/V hops; bwd: 3 K/V hops + 4 hops of the fp32 dK/dV accumulator
        "ring": ({"kv": 3 * 1024}, {"kv": 3 * 1024, "dkv_fp32": 4 * 2048}),
        # the same K/V, and 3 partial fp32 dK/dV sent straight home
        "bidir_kv": ({"kv": 3 * 1024}, {"kv": 3 * 1024, "dkv_fp32": 3 * 2048}),
        # 3 hops at 0.75 of a full block: Q, then O + LSE back; bwd Q + dO + D + LSE, then fp32 dQ back
        "token_ring": ({"q": 2.25 * 1024, "out_lse": 2.25 * (1024 + 256)},
                       {"q_dout_scale_lse": 2.25 * (2 * 1024 + 2 * 256), "dq_fp32": 2.25 * 2048}),
        "allgather_kv": ({"all_gather_kv": 3 * 1024}, {"all_gather_kv": 3 * 1024, "reduce_scatter_dkv_fp32": 3 * 2048}),
        # Hkv=2 does not split 4 ways: K/V repeated to 4 heads (2048 bytes); 3/4 of each tensor leaves
        "ulysses": ({"a2a_qkv": 0.75 * (1024 + 2048), "a2a_out": 0.75 * 1024},
                    {"a2a_dout": 0.75 * 1024, "a2a_dqkv": 0.75 * (1024 + 2048)}),
    }
    for name, (fwd, bwd) in expect.items():
        got = bytes_moved(name, SMALL)
        assert got["fwd"] == pytest.approx(fwd) and got["bwd"] == pytest.approx(bwd), name
        assert got["total"] == pytest.approx(sum(fwd.values()) + sum(bwd.values()))
    # hybrid u=2 x ring 2: all-to-alls over 2 ranks (half of each tensor leaves; Hkv=2 splits), then a
    # ring of 2 on 32 tokens per rank, 2 query heads and 1 K/V head: kv = 2*32*1*8*2 = 1024, dkv32 = 2048
    got = bytes_moved("hybrid", SMALL, sp_inner=2, outer="ring")
    assert got["fwd"] == pytest.approx({"inner_a2a_qkv": 0.5 * (1024 + 1024), "inner_a2a_out": 0.5 * 1024,
                                        "outer_kv": 1024})
    assert got["bwd"] == pytest.approx({"inner_a2a_dout": 0.5 * 1024, "inner_a2a_dqkv": 0.5 * (1024 + 1024),
                                        "outer_kv": 1024, "outer_dkv_fp32": 2 * 2048})
    with pytest.raises(ValueError, match="Hq 9 % sp 4"):
        bytes_moved("ulysses", Shape(64, 9, 3, 8, 4))
    # memory.policy keeping (out, lse): Ulysses' own backward scatters q, k, v, out and dO again
    # (the runtime count of that path is tests/test_sp_comm.py's hand count)
    memo = bytes_moved("ulysses", Shape(64, 4, 2, 8, 4, 2, memo=True))
    assert memo["bwd"] == pytest.approx({"a2a_qkv_out_dout": 0.75 * (3 * 1024 + 2048), "a2a_dqkv": 0.75 * (1024 + 2048)})
    assert bytes_moved("ring", Shape(64, 4, 2, 8, 4, 2, memo=True)) == bytes_moved("ring", SMALL)  # one path only


@pytest.mark.parametrize("P", [2, 3, 4, 8])
def test_token_ring_zigzag_average_is_three_quarters(P):
    """Walk TokenRing's zigzag rule rank by rank (parallel/token_ring.py): the block held at step t
    belongs to owner (r+t) mod P and goes to r-1 whole if the owner's index is above r-1's, else its
    late half; the partial of step t goes home whole if r is below the owner. Half the (rank, step)
    pairs are whole, so the mean over ranks is 0.75 of a whole block per hop."""
    n, q_row, ret_row = 16, 4 * 8 * 2, 4 * 8 * 2 + 4 * 4
    sent = [0.0] * P
    for r in range(P):
        for t in range(P - 1):
            sent[r] += q_row * (n if (r + t) % P > (r - 1) % P else n // 2)
            sent[r] += ret_row * (n if r < (r + t + 1) % P else n // 2)
    shape = Shape(n * P, 4, 2, 8, P, 2)
    assert sum(sent) / P == pytest.approx(bytes_moved("token_ring", shape)["fwd"]["q"]
                                          + bytes_moved("token_ring", shape)["fwd"]["out_lse"])
    if P > 2:
        assert max(sent) > sum(sent) / P  # ranks differ; the mean is what the formula gives


@pytest.mark.parametrize("shape", [SMALL, Shape(96, 6, 2, 8, 3, 4), Shape(4096, 32, 8, 16, 8, 2, batch=3)])
def test_modelled_steps_send_what_the_formulas_say(shape):
    """estimate() walks the schedules step by step; over the sp group its bytes equal bytes_moved's."""
    m = make_machine("nvswitch", 4)
    for name in SCHEDULES:
        kw = {"sp_inner": 2, "outer": "token_ring"} if name == "hybrid" else {}
        e = estimate(name, shape, m, **kw)
        if not math.isfinite(e["seconds"]):
            assert name in ("ulysses", "hybrid") and e["why"]
            continue
        assert e["bytes_per_rank"] == pytest.approx(bytes_moved(name, shape, **kw)["total"]), name


def test_transfer_time_per_link_class():
    shared = LinkClass("switch", 100.0, 100.0, 0.0, pairwise=False)
    pairs = LinkClass("mesh", 100.0, 100.0, 0.0, pairwise=True)
    nic = LinkClass("nic", 10.0, 10.0, 1.0, pairwise=False)
    both_ways = [(1, 2, 500), (1, 0, 500), (2, 1, 500), (0, 1, 500)]  # rank 1 sends to and hears from two peers

    def on(intra, rpn=4):
        return Machine(rpn, intra, nic, 1.0, 0.0, 1.0, "test")

    assert transfer_seconds(both_ways, on(shared))[0] == pytest.approx(10.0)  # 1000 B through one port
    assert transfer_seconds(both_ways, on(pairs))[0] == pytest.approx(5.0)  # 500 B on each private link
    # ranks 0-1 on node 0, 2-3 on node 1: 1<->2 crosses on the NIC (500/10 + 1 s latency)
    seconds, sent = transfer_seconds(both_ways, on(shared, rpn=2))
    assert seconds == pytest.approx(51.0)
    assert sent == {(1, "inter"): 500, (1, "intra"): 500, (2, "inter"): 500, (0, "intra"): 500}
    # a hop of a ring all-gather runs at the link's all-gather efficiency (gloo: about half)
    slow_gather = LinkClass("gloo", 100.0, 100.0, 0.0, pairwise=False, all_gather_efficiency=0.5)
    assert transfer_seconds([(0, 1, 500)], on(slow_gather), all_gather=True)[0] == pytest.approx(10.0)
    assert transfer_seconds([(0, 1, 500)], on(slow_gather))[0] == pytest.approx(5.0)
    # ingress counts too: three ranks into one port
    assert transfer_seconds([(0, 3, 100), (1, 3, 100), (2, 3, 100)], on(shared))[0] == pytest.approx(3.0)


def test_gqa_on_nvswitch_at_128k_does_not_pick_token_ring():
    """Llama-3-8B heads: queries outweigh K/V 4:1, so TokenRing moves ~3x the bytes of a K/V ring;
    at 128K on one NVSwitch node every schedule is compute-bound and TokenRing is not picked."""
    m = make_machine("nvswitch", 8)
    s = Shape(131072, 32, 8, 128, 8)
    token, ring = estimate("token_ring", s, m), estimate("ring", s, m)
    assert token["bytes_intra"] > 2.5 * ring["bytes_intra"] and token["bytes_inter"] == 0
    assert ring["bound"] == "compute-bound"
    assert choose(s, m).name != "token_ring"
    kv_only = choose(s, m, candidates=OUTER)
    assert kv_only.name in ("ring", "bidir_kv", "allgather_kv")
    assert "sp 8 on 1 node (nvswitch" in kv_only.why and f"picked {kv_only.name}" in kv_only.why


def test_mha_on_pairwise_pcie_with_small_chunks_prefers_two_directions():
    """TokenRing's own setting (MHA 32x128, 24K tokens on 4 PCIe GPUs): the K/V ring is link-bound,
    and using both directions of the private links (TokenRing, bidir_kv) wins."""
    m = make_machine("pcie", 4)
    s = Shape(24576, 32, 32, 128, 4)
    ring = estimate("ring", s, m)
    assert "waiting on links" in ring["bound"]
    c = choose(s, m, candidates=("ring", "token_ring", "bidir_kv"))
    assert c.name in ("token_ring", "bidir_kv")
    assert c.table[c.name]["seconds"] < 0.8 * ring["seconds"]


def test_hybrid_beats_a_flat_ring_across_nodes():
    """4 nodes x 8 GPUs: a flat ring over 32 ranks waits on its node-boundary NIC hop every step;
    Ulysses inside the node x a ring of 4 across nodes crosses the NIC 8x less often."""
    m = make_machine("nvswitch", 8, inter_gbps=400)
    s = Shape(131072, 32, 8, 128, 32)
    flat, hybrid = estimate("ring", s, m), estimate("hybrid", s, m, sp_inner=8, outer="ring")
    assert flat["bytes_inter"] > 0 and hybrid["bytes_inter"] < flat["bytes_inter"] / 4
    assert hybrid["seconds"] < flat["seconds"]
    c = choose(s, m, sp_inner=8)
    assert c.name == "hybrid" and c.sp_inner == 8 and c.outer in OUTER
    assert f"hybrid (ulysses 8 x {c.outer})" in c.why and "sp 32 on 4 nodes" in c.why
    # one node: the same group never touches the NIC
    assert estimate("ring", Shape(131072, 32, 8, 128, 8), m)["bytes_inter"] == 0
    # hybrid is left out where its inner degree would be 1 or the whole group
    assert "hybrid" not in choose(Shape(131072, 32, 8, 128, 8), m).table


def test_batch_scales_bytes_and_time():
    m = make_machine("nvswitch", 8)
    for name in ("ring", "token_ring", "ulysses"):
        one, two = (estimate(name, Shape(65536, 32, 8, 128, 8, batch=b), m) for b in (1, 2))
        assert two["bytes_intra"] == pytest.approx(2 * one["bytes_intra"])
        assert 1.9 * one["seconds"] < two["seconds"] <= 2 * one["seconds"]


def test_impossible_schedules_are_explained_not_picked():
    m = make_machine("cpu_gloo", 4)
    s = Shape(4096, 9, 3, 64, 4, 4)
    assert estimate("ulysses", s, m) == {"seconds": math.inf, "bytes_intra": 0.0, "bytes_inter": 0.0,
                                         "why": "Hq 9 % sp 4"}
    c = choose(s, m)
    assert c.name != "ulysses" and "ulysses n/a (Hq 9 % sp 4)" in c.why
    with pytest.raises(ValueError, match="no schedule"):
        choose(s, m, candidates=("ulysses",))


def test_topology_from_nvidia_smi_and_hostnames():
    nvswitch = """\tGPU0\tGPU1\tGPU2\tNIC0\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID
GPU0\t X \tNV18\tNV18\tPXB\t0-55\t0\t\tN/A
GPU1\tNV18\t X \tNV18\tPXB\t0-55\t0\t\tN/A
GPU2\tNV18\tNV18\t X \tSYS\t56-111\t1\t\tN/A
NIC0\tPXB\tPXB\tSYS\t X

Legend:
  X    = Self
  NV#  = Connection traversing a bonded set of # NVLinks
"""
    assert topology.intra_link_from_topo(nvswitch) == "nvswitch"
    assert topology.intra_link_from_topo(nvswitch.replace("NV18\t X \tNV18\tPXB", "PIX\t X \tNV18\tPXB")) == "pcie"
    assert topology.intra_link_from_topo("No devices were found") is None
    # as printed: the header underlined with terminal codes; GPU0 NVLinked to all, GPU1-GPU2 over PCIe
    raw = ("\x1b[4m\tGPU0\tGPU1\tGPU2\tCPU Affinity\tNUMA Affinity\x1b[0m\n"
           "GPU0\t X \tNV4\tNV4\t0-55\t0\nGPU1\tNV4\t X \tPIX\t0-55\t0\nGPU2\tNV4\tPIX\t X \t0-55\t0\n")
    assert topology.intra_link_from_topo(raw) == "pcie"
    assert topology.intra_link_from_topo(raw.replace("PIX", "NV4")) == "nvswitch"
    assert topology.ranks_per_node_from_hosts(["a"] * 8 + ["b"] * 8) == 8
    assert topology.ranks_per_node_from_hosts(["a"] * 4) == 4
    assert topology.ranks_per_node_from_hosts(["a"] * 6 + ["b"] * 4) == 2  # uneven: blocks that stay on a node


def _calibrate(rank, world):
    """A rank-dependent fake timing; every rank must still end with the same machine."""
    topology.measure_attention_flops = lambda *a, **k: 1e10 * (rank + 1)
    topology.measure_memory_bandwidth = lambda *a, **k: 1e9 * (rank + 1)
    recipe = SimpleNamespace(link="auto", inter_node_gbps=200.0, attention_tflops="auto")
    m = topology.machine_for_run(recipe, torch.device("cpu"), torch.float32)
    fixed = topology.machine_for_run(SimpleNamespace(link="pcie", attention_tflops=5.0), "cpu")
    return m, fixed


def test_calibration_gives_every_rank_the_same_machine():
    (m0, fixed0), (m1, fixed1) = _dist.run(_calibrate, 2)
    assert m0 == m1 and fixed0 == fixed1
    assert m0.flops == pytest.approx(1.5e10) and m0.memory_bandwidth == pytest.approx(1.5e9)  # the mean
    assert m0.ranks_per_node == 2 and m0.intra.name == "cpu_gloo" and m0.overlap == 0.5
    # the measured ring exchange and all-gather
    assert m0.intra.out_bytes_per_s > 1e7 and 0 < m0.intra.latency < 1.0 and 0 < m0.intra.all_gather_efficiency <= 1
    assert m0.inter.name == "ib200"
    assert fixed0.intra == LINKS["pcie"] and fixed0.flops == 5e12  # given values: nothing measured


def test_measured_attention_flops_is_quick_and_positive():
    import time

    start = time.perf_counter()
    flops = topology.measure_attention_flops(torch.device("cpu"), torch.float32, reps=1)
    assert flops > 1e8 and time.perf_counter() - start < 5


def test_plan_prints_the_schedule_table(capsys):
    from longctx.cli import main

    recipe = "recipes/llama3-8b-128k.yaml"
    assert main(["plan", recipe, "--link", "nvswitch", "--tflops", "400"]) == 0
    text = capsys.readouterr().out
    assert "attention, modelled (not measured): sp 8 on 1 node (8/node nvswitch" in text
    for name in ("token_ring", "ring", "bidir_kv", "allgather_kv", "ulysses"):
        assert f"\n  {name} " in text
    assert "\npicked " in text
    assert main(["plan", recipe, "parallel.sp_degree=32", "--gpus", "32", "--gpus-per-node", "8",
                 "--inter-gbps", "400", "--json"]) == 0
    a = json.loads(capsys.readouterr().out)["attention"]
    assert a["sp"] == 32 and a["machine"]["inter"] == "ib400" and a["machine"]["ranks_per_node"] == 8
    assert set(a["schedules"]) == set(SCHEDULES) and a["picked"] in SCHEDULES
    assert a["schedules"]["ring"]["bytes_inter"] > 0 and a["schedules"]["hybrid"]["sp_inner"] == 8
    assert a["reason"].startswith("picked ")
    # a schedule that cannot run has null times (JSON has no infinity) and says why
    assert main(["plan", recipe, "parallel.sp_degree=3", "--gpus", "3", "--json"]) == 0
    out = capsys.readouterr().out
    assert "Infinity" not in out
    ulysses = json.loads(out)["attention"]["schedules"]["ulysses"]
    assert ulysses["layer_seconds"] is None and ulysses["why"] == "Hq 32 % sp 3"
    assert main(["plan", recipe, "--inter-gbps", "0"]) == 2 and "--inter-gbps=0" in capsys.readouterr().err


def test_causal_tile_prices_the_diagonal_tiles():
    """A causal block of L rows runs at L/(L+T) of the unmasked rate, so a rank loses about L T of
    work per diagonal block: the ring's one n x n block, allgather_kv's two n/2 blocks and Ulysses'
    S x S block on Hq/P heads all lose n T Hq (by hand below), and with T = 0 nothing."""
    from dataclasses import replace

    from longctx.parallel import choose as choose_mod

    s = Shape(4096, 8, 8, 64, 4, 4)
    m0 = replace(make_machine("cpu_gloo", 4, tflops=0.05), causal_tile=0.0)
    m = replace(m0, causal_tile=512.0)
    n = 1024
    assert choose_mod._causal_waste("ring", s, m, None, None) == pytest.approx(2 * n * n * 8 * 64 * 3.5 * 512 / n / 5e10)
    extra = {name: estimate(name, s, m)["compute_seconds"] - estimate(name, s, m0)["compute_seconds"]
             for name in ("ring", "allgather_kv", "ulysses")}
    ring = 2 * n * 8 * 64 * 3.5 * 512 * n / n / 5e10  # 2 n^2 Hq d (1 + 2.5) T / n / flops
    assert extra["ring"] == pytest.approx(ring) and extra["allgather_kv"] == pytest.approx(ring)
    # Ulysses: one causal S x S block on Hq/P = 2 heads: 2 S^2 2 d (1 + 2.5) T / S
    assert extra["ulysses"] == pytest.approx(2 * 4096 * 2 * 64 * 3.5 * 512 / 5e10) == pytest.approx(ring)
