"""DDP, FSDP2 and pipeline stages on 2 gloo ranks (CPU): a small GPT trained 2 steps with
ckptfx planning the compiled graphs trains like single-process eager, every rank takes the
same decisions, and no collective is recomputed."""

from __future__ import annotations

import functools
import json
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import dist_scenarios as scenarios  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed missing")
RTOL = 1e-5


def ckptfx_budget(value):
    from ckptfx.config import parse_budget

    return parse_budget(value)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(tmp_path, name: str, **kwargs) -> list[dict]:
    mp.start_processes(scenarios.worker,
                       args=(2, _free_port(), str(tmp_path), name, kwargs), nprocs=2,
                       join=True, start_method="spawn")
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


@functools.lru_cache(maxsize=1)
def reference() -> dict:
    return scenarios.eager_reference()


def assert_trains_like_eager(result: dict, rtol: float = RTOL) -> None:
    """Losses and gathered gradients equal to single-process eager (``rtol`` relative; an
    absolute 1e-6 for gradients near zero); Inductor's kernels pass at 1e-5 too."""
    ref = reference()
    torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(ref["losses"]),
                               rtol=rtol, atol=1e-6)
    assert set(result["grads"]) == set(ref["grads"])
    for name, got in result["grads"].items():
        torch.testing.assert_close(torch.tensor(got), ref["grads"][name], rtol=rtol, atol=1e-6,
                                   msg=name)


def assert_same_plans_no_collective(ranks: list[dict]) -> None:
    assert ranks[0]["plans"] and ranks[0]["plans"] == ranks[1]["plans"]
    # verify_ranks compared every graph's plan fingerprint across the group
    assert len(ranks[0]["fingerprints"]) >= len(ranks[0]["plans"])
    assert all(ranks[0]["fingerprints"]) and ranks[0]["fingerprints"] == ranks[1]["fingerprints"]
    assert not any(fallback for *_, fallback in ranks[0]["plans"])
    for r in ranks:
        assert not [op for op in r["recomputed_ops"]
                    if any(k in op for k in scenarios.COLLECTIVES)]


@pytest.mark.parametrize("wrap", ["inside", "outside"])
def test_ddp_bucketed_graphs_are_planned_and_train_like_eager(tmp_path, wrap):
    """DDP(torch.compile(model)) and torch.compile(DDP(model)) of a model whose forward is
    user code: Dynamo's DDP optimizer splits the graph per gradient bucket (64 KiB), ckptfx
    plans every bucket's graph."""
    ranks = run(tmp_path, "ddp", options={"inner": "eager", "memory_budget": 0.5,
                                          "budget_kind": "saved", "verify_ranks": True},
                wrap=wrap)
    assert len(ranks[0]["plans"]) > 1  # one graph per gradient bucket
    assert_same_plans_no_collective(ranks)
    for r in ranks:
        assert_trains_like_eager(r)
        assert not any("compiled no graph" in w for w in r["warnings"])
        # each step keeps what the bucket graphs' reports say together (saved-tensor hooks
        # over the whole forward, unique storages, parameters excluded)
        reported = sum(r["reported"])
        assert r["measured"] and all(abs(reported - m) <= 0.05 * m for m in r["measured"]), (
            r["measured"], r["reported"])


def test_compiled_ddp_that_makes_no_graph_warns_once_with_the_recipe(tmp_path):
    ranks = run(tmp_path, "ddp_of_sequential", options={"inner": "eager"})
    for r in ranks:
        warned = [w for w in r["warnings"] if "compiled no graph" in w]
        assert len(warned) == 1 and 'DDP(torch.compile(model, backend="ckpt"))' in warned[0]
        assert r["plans"] == []
        for name, got in r["grads"].items():
            torch.testing.assert_close(torch.tensor(got), torch.tensor(r["ref_grads"][name]))


@pytest.mark.parametrize("compile, inner", [
    ("block", "eager"), ("whole", "eager"),
    pytest.param("block", "inductor", marks=pytest.mark.inductor)])
def test_fsdp2_trains_like_eager_and_never_recomputes_a_collective(tmp_path, compile, inner,
                                                                   monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")  # a cache hit skips planning
    ranks = run(tmp_path, "fsdp", options={"inner": inner, "memory_budget": 0.5,
                                           "verify_ranks": True, "regather_params": True},
                compile=compile)
    assert_same_plans_no_collective(ranks)
    for r in ranks:
        assert_trains_like_eager(r)
        # FSDP2's all-gathers run in its hooks, outside every graph (Note [Re-gathering
        # parameters]): regather_params finds nothing to re-gather and says so
        assert r["notes"] and all(any("all-gathers no parameter shard" in n for n in notes)
                                  for notes in r["notes"])
        assert not any("has no hint" in w for w in r["warnings"])
        coll = r["collectives"]
        ops = " ".join(coll["collective_ops"])
        for op in ("all_gather_into_tensor", "reduce_scatter_tensor", "all_reduce",
                   "wait_tensor"):
            assert op in ops, coll["collective_ops"]
        assert "recompute" not in coll["collective_actions"]
        assert not [op for op in coll["recomputed_ops"]
                    if any(k in op for k in scenarios.COLLECTIVES)]
        assert coll["fallback"] == [""]
    for r in ranks:  # each block call keeps what its graph's report says (the blocks share
        # their code: one graph, or one per recompile)
        assert len(r["measured"]) == 2 * 2 and r["reported"]  # 2 blocks, 2 steps
        for m in r["measured"]:
            assert any(abs(b - m) <= 0.05 * m for b in r["reported"]), (m, r["reported"])


def test_verify_ranks_names_the_first_decision_that_differs(tmp_path):
    ranks = run(tmp_path, "mismatch")
    for r in ranks:  # every rank raises, none hangs
        assert r["error"] == "RankMismatchError", r
        node, on0, on1 = r["differences"][0]
        assert f"{node!r} is {on0} on rank 0 and {on1} on rank 1" in r["message"]
        assert ["option memory_budget", "None", repr(ckptfx_budget(0.0))] in r["differences"]
        assert "the options differ: memory_budget=None on rank 0" in r["message"]


def test_two_stage_1f1b_pipeline_keeps_its_in_flight_budget_and_trains_like_eager(tmp_path):
    ranks = run(tmp_path, "pipeline")
    assert [r["in_flight"] for r in ranks] == [2, 1]  # 1F1B: stages - stage index
    for r in ranks:
        assert_trains_like_eager(r)
        assert r["most_microbatches"] == r["in_flight"]
        (saved,) = r["saved_bytes"]
        # measured while the schedule runs: the microbatches in flight fit the budget
        assert r["measured_most"] <= r["budget"]
        assert all(abs(m - saved) <= 0.05 * saved for m in r["measured_per_microbatch"])
        assert any(n.startswith(f"microbatches in flight: {r['in_flight']}") for n in r["notes"]) \
            or r["in_flight"] == 1
    stage0 = ranks[0]
    # planned without the option (what one microbatch keeps with this budget alone), the
    # stage's microbatches in flight would exceed it
    assert stage0["most_microbatches"] * stage0["saved_without_option"] > stage0["budget"]


def test_simple_fsdp_regather_frees_the_unsharded_weight_on_every_rank(tmp_path):
    import dist_regather

    ranks = run(tmp_path, "simple_fsdp")
    reference = dist_regather.reference()
    for rank, r in enumerate(ranks):
        off, on = r["off"], r["on"]
        for run_ in (off, on):  # the same gradients as single-process eager either way
            torch.testing.assert_close(torch.tensor(run_["grad"]), reference[rank],
                                       rtol=RTOL, atol=1e-6)
            assert run_["fallback"] == [""]
            assert not [op for op in run_["recomputed_ops"]
                        if "reduce_scatter" in op or "all_reduce" in op]
        assert not [op for op in off["recomputed_ops"] if "c10d" in op or "all_gather" in op
                    or "wait_tensor" in op]
        assert {"all_gather_into_tensor.default", "wait_tensor.default"} <= set(
            on["recomputed_ops"])
        # measured over the storages autograd keeps: the unsharded weight, no longer
        assert off["measured"] - on["measured"] == r["unsharded_bytes"]
        assert off["reported"][0] - on["reported"][0] == r["unsharded_bytes"]
        assert any(n.startswith("regather_params: 1 of 1 all-gathers") for n in on["notes"])
    for key in ("off", "on"):
        assert ranks[0][key]["fingerprints"] == ranks[1][key]["fingerprints"]


def test_two_stage_1f1b_stage_peak_measured_within_its_in_flight_budget(tmp_path):
    """Each stage gets a memory figure for its activations; planned with
    ``pipeline_stage_options`` (a peak budget with its microbatches in flight, less what the
    schedule holds) the stage's measured peak during a step stays within it, and the first
    stage planned without the in-flight option exceeds it (Note [What the schedule holds])."""
    ranks = run(tmp_path, "measured_pipeline")
    for rank, r in enumerate(ranks):
        fit, alone = r["in_flight"], r["alone"]
        assert fit["options"]["microbatches_in_flight"] == 2 - rank
        # the second step: compiled, gradients and receive buffers allocated before it
        assert fit["peaks"][1] <= fit["memory"], (rank, fit)
        if rank == 0:  # two microbatches in flight: the plan saves less
            assert fit["saved"] < alone["saved"]
            assert alone["peaks"][1] > alone["memory"], alone
            note = [n for n in fit["notes"] if n.startswith("microbatches in flight: 2")]
            assert note and f"of memory_budget={fit['options']['memory_budget']} B" in note[0]
