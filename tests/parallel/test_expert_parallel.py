"""Expert parallelism against the whole layer: real processes, gloo, dropless all-to-all.

The distributed tests run ``ep_dispatch_worker.py`` under torchrun (2 and 4 processes) and compare
each rank's outputs and gradients with the same layer, unsharded, in one process.
"""

from pathlib import Path

import pytest
import torch
from ddp_launch import run_torchrun

from lightning_moe.layers import MoEConfig, MoELayer
from lightning_moe.models import MoETransformer
from lightning_moe.parallel import ExpertParallelGroups, check_expert_parallel_size, moe_param_groups
from lightning_moe.parallel.expert_parallel import expert_parameters


def run_workers(world: int, out: Path) -> list[list[dict]]:
    return run_torchrun("ep_dispatch_worker.py", world, out)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[list[dict]]:
    return run_workers(2, tmp_path_factory.mktemp("ep2"))


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[list[dict]]:
    return run_workers(4, tmp_path_factory.mktemp("ep4"))


def check_case(case: dict) -> None:
    scale = case["ref_y"].abs().max().item()
    torch.testing.assert_close(case["y"], case["ref_y"], rtol=0, atol=1e-5 * scale, msg=case["name"])
    torch.testing.assert_close(case["dx"], case["ref_dx"], rtol=0, atol=1e-5 * case["ref_dx"].abs().max().item())
    assert set(case["grads"]) == set(case["ref_grads"])
    for name, grad in case["grads"].items():
        ref = case["ref_grads"][name]
        assert grad.shape == ref.shape, name
        torch.testing.assert_close(grad, ref, rtol=0, atol=1e-5 * max(ref.abs().max().item(), 1e-3),
                                   msg=f"{case['name']}: {name}")


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["topk-grouped", "topk-loop", "expert-choice", "one-sided"])
def test_ep2_on_two_processes_matches_the_whole_layer(two_ranks: list[list[dict]], name: str) -> None:
    for rank in two_ranks:
        check_case(next(c for c in rank if c["name"] == name))


@pytest.mark.distributed
def test_the_exchange_is_dropless_and_uneven(two_ranks: list[list[dict]]) -> None:
    for case_name in ("topk-grouped", "expert-choice", "one-sided"):
        cases = [next(c for c in rank if c["name"] == case_name) for rank in two_ranks]
        sent = torch.tensor([c["exchange"]["sent_rows"] for c in cases])  # [source, destination]
        received = torch.tensor([c["exchange"]["received_rows"] for c in cases])  # [destination, source]
        assert torch.equal(sent, received.T), case_name
    topk = [next(c for c in rank if c["name"] == "topk-grouped") for rank in two_ranks]
    for c in topk:  # T * K assignments, none dropped; a token goes to a rank once (rows <= assignments)
        ex = c["exchange"]
        assert sum(ex["sent_assignments"]) + sum(ex["local_assignments"]) == 13 * 2
        assert sum(ex["sent_rows"]) + sum(ex["local_rows"]) <= 13 * 2
    one_sided = [next(c for c in rank if c["name"] == "one-sided") for rank in two_ranks]
    # Both experts of every token on rank 0: rank 1's 13 tokens go there once each, rank 0's stay.
    assert [c["exchange"]["received_rows"] for c in one_sided] == [[0, 13], [0, 0]]
    assert [c["exchange"]["received_assignments"] for c in one_sided] == [[0, 26], [0, 0]]
    assert [c["exchange"]["local_rows"] for c in one_sided] == [[13, 0], [0, 0]]


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["topk-grouped", "expert-choice", "topk-ep4"])
def test_four_processes_reduce_experts_over_the_expert_data_parallel_group(four_ranks: list[list[dict]],
                                                                         name: str) -> None:
    # World 4 with EP=2: two ranks hold each expert and their gradients must be summed; EP=4 too.
    for rank in four_ranks:
        check_case(next(c for c in rank if c["name"] == name))


def test_a_layer_not_yet_sharded_computes_locally() -> None:
    torch.manual_seed(0)
    layer = MoELayer(12, 10, 6, expert_parallel_size=3)
    reference = MoELayer(12, 10, 6)
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(2, 7, 12)
    torch.testing.assert_close(layer(x), reference(x))
    assert layer.expert_parallel is None and layer.experts.w_gate_EDF.shape[0] == 6


def test_bad_expert_parallel_sizes_are_refused_with_the_valid_values() -> None:
    with pytest.raises(ValueError, match=r"`expert_parallel_size`=4 must divide `num_experts`=6; valid values are "
                                         r"\[1, 2, 3, 6\]"):
        MoELayer(8, 16, 6, expert_parallel_size=4)
    with pytest.raises(ValueError, match=r"`expert_parallel_size`=3 must divide the routed experts per layer, "
                                         r"num_experts \* granularity = 8; valid values are \[1, 2, 4, 8\]"):
        MoEConfig(num_experts=4, expert_d_ff=8, granularity=2, expert_parallel_size=3)
    with pytest.raises(ValueError, match=r"must be an integer >= 1, got 0"):
        MoELayer(8, 16, 4, expert_parallel_size=0)
    with pytest.raises(ValueError, match=r"must divide the number of processes \(3\); valid values for 3 processes "
                                         r"are \[1, 3\]"):
        check_expert_parallel_size(2, 3)


def test_expert_parallel_needs_a_process_group() -> None:
    from lightning_moe.parallel import setup_expert_parallel

    with pytest.raises(RuntimeError, match="needs torch.distributed to be initialised"):
        setup_expert_parallel(MoELayer(8, 16, 4, expert_parallel_size=2))


def test_param_groups_are_the_same_at_every_expert_parallel_size() -> None:
    def groups(size: int) -> list[dict]:
        torch.manual_seed(0)
        model = MoETransformer(
            64, max_seq_len=16, d_model=16, n_layers=2, n_heads=2, d_ff=32,
            moe=MoEConfig(num_experts=4, expert_d_ff=8, expert_parallel_size=size),
        )
        return model, moe_param_groups(model, lr=0.1)

    model1, g1 = groups(1)
    model2, g2 = groups(2)
    assert [len(g["params"]) for g in g1] == [len(g["params"]) for g in g2]
    assert g1[1]["name"] == "experts" and "moe" not in g1[1]
    assert g2[1]["moe"] is True and g2[1]["name"] == "ep_size_2" and g2[0]["lr"] == 0.1
    experts = {id(p) for layer in model2.moe_layers() for _, p in expert_parameters(layer)}
    assert {id(p) for p in g2[1]["params"]} == experts
    assert sum(p.numel() for g in g2 for p in g["params"]) == sum(p.numel() for p in model2.parameters())


def test_loading_whole_expert_tensors_into_a_shard_keeps_this_ranks_rows() -> None:
    # The load hook needs no communication: fake this rank's groups (rank 1 of 2).
    torch.manual_seed(0)
    whole = MoELayer(8, 6, 4)
    layer = MoELayer(8, 6, 4, expert_parallel_size=2)
    from lightning_moe.parallel import shard_experts

    shard_experts(layer, ExpertParallelGroups(2, 1, 2, None, None, "ep_size_2"))
    assert layer.experts.num_experts == 2 and layer.experts.w_up_EDF.shape == (2, 8, 6)
    assert layer.experts.w_up_EDF.allreduce is False and layer.experts.w_up_EDF.group_name == "ep_size_2"
    layer.load_state_dict(whole.state_dict())
    torch.testing.assert_close(layer.experts.w_up_EDF, whole.experts.w_up_EDF[2:])
    torch.testing.assert_close(layer.router.scorer.weight_ED, whole.router.scorer.weight_ED)
    with pytest.raises(RuntimeError, match="already sharded"):
        shard_experts(layer, ExpertParallelGroups(2, 0, 2, None, None, "ep_size_2"))
