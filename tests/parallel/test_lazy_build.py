"""Build only what a rank keeps: expert-parallel layers create their routed experts without storage,
and sharding gives each rank its ``E / P`` experts, initialised from their global indices.

The distributed tests run ``lazy_build_worker.py`` under torchrun (2 and 4 processes, P = world) and
compare with the P = 1 model built whole in the same process; the others run in this process.
"""

import functools
from pathlib import Path

import pytest
import torch
from ddp_launch import run_torchrun
from torch import nn

from lightning_moe.experts import MLPExperts, SwiGLUExperts
from lightning_moe.experts.protocol import LazyExperts
from lightning_moe.layers import MoEConfig, MoELayer
from lightning_moe.models import MoETransformer
from lightning_moe.parallel import ExpertParallelGroups, shard_experts
from lightning_moe.upcycling import upcycle_swiglu


def run_workers(world: int, out: Path) -> list[dict]:
    return run_torchrun("lazy_build_worker.py", world, out)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return run_workers(2, tmp_path_factory.mktemp("lazy2"))


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return run_workers(4, tmp_path_factory.mktemp("lazy4"))


def fake_groups(size: int, rank: int) -> ExpertParallelGroups:
    """This rank's groups without a process group: sharding needs no communication."""
    return ExpertParallelGroups(size, rank, size, None, None, f"ep_size_{size}")


# ---------------------------------------------------------------------------------------------
# Across processes


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 4])
def test_every_expert_parallel_size_builds_the_same_model_and_first_steps(world: int, two_ranks: list[dict],
                                                                          four_ranks: list[dict]) -> None:
    ranks = two_ranks if world == 2 else four_ranks
    for rank, result in enumerate(ranks):
        case = result["same_model"]
        assert case["lazy_before_sharding"]
        assert case["rows"] == (rank * 8 // world, (rank + 1) * 8 // world)
        assert case["mismatched"] == []  # every tensor, experts (this rank's rows) and dense alike, bit-exact
        assert case["losses"] == pytest.approx(case["reference_losses"], rel=1e-5, abs=1e-5)
        assert case["losses"][1] < case["losses"][0]


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 4])
def test_upcycling_after_sharding_writes_the_rows_of_one_process(world: int, two_ranks: list[dict],
                                                                 four_ranks: list[dict]) -> None:
    for result in two_ranks if world == 2 else four_ranks:
        case = result["upcycled"]
        assert case["mismatched"] == []
        assert case["expert_shapes"]["blocks.0.ffn.experts.w_gate_EDF"] == (8 // world, 16, 8)


@pytest.mark.distributed
def test_no_rank_holds_the_whole_experts_and_a_step_runs(two_ranks: list[dict]) -> None:
    for result in two_ranks:
        case = result["memory"]
        whole, local = case["whole_bytes"], case["local_bytes"]
        assert case["lazy_before_sharding"] and case["expert_shape"] == (16, 512, 2048)
        assert local == whole // 2
        print(f"peak RSS increase: build {case['build'] / 2**20:.0f} MiB, build+shard "
              f"{case['build_and_shard'] / 2**20:.0f} MiB, with one step {case['with_step'] / 2**20:.0f} MiB; "
              f"whole experts {whole / 2**20:.0f} MiB, this rank's {local / 2**20:.0f} MiB")
        assert case["build"] < 0.1 * whole  # the dense part only
        assert local <= case["build_and_shard"] < 0.75 * whole
        assert torch.isfinite(torch.tensor(case["loss"]))


# ---------------------------------------------------------------------------------------------
# In one process


def test_an_expert_parallel_layer_allocates_no_expert_storage_before_sharding() -> None:
    # 3 * 2048 * 1024 * 4096 float32 = 100 GB if it were allocated.
    layer = MoELayer(1024, 4096, 2048, expert_parallel_size=2)
    assert layer.experts_lazy and all(p.is_meta for p in layer.experts.parameters())
    assert not any(p.is_meta for name, p in layer.named_parameters() if not name.startswith("experts."))
    layer.to(torch.float64)  # moving it allocates nothing either; the dtype is kept for later
    assert layer.experts_lazy and layer.experts.w_gate_EDF.dtype == torch.float64
    model = MoETransformer(64, max_seq_len=8, d_model=16, n_layers=2, n_heads=2, d_ff=32,
                           moe=MoEConfig(num_experts=4, expert_d_ff=8, expert_parallel_size=2))
    whole = MoETransformer(64, max_seq_len=8, d_model=16, n_layers=2, n_heads=2, d_ff=32,
                           moe=MoEConfig(num_experts=4, expert_d_ff=8))
    assert model.parameter_counts() == whole.parameter_counts()
    assert model.flops_per_token() == whole.flops_per_token()


@pytest.mark.parametrize("experts", [SwiGLUExperts, functools.partial(MLPExperts, bias=True)], ids=["swiglu", "mlp"])
def test_each_expert_starts_from_its_seed_and_global_index_alone(experts) -> None:
    torch.manual_seed(0)
    four = experts(8, 6, 4)
    torch.manual_seed(0)
    again = experts(8, 6, 4)
    eight = experts(8, 6, 8)
    eight.init_seed = four.init_seed
    eight.reset_parameters()
    for name, param in four.named_parameters():
        torch.testing.assert_close(param, dict(again.named_parameters())[name], rtol=0, atol=0)
        torch.testing.assert_close(param, dict(eight.named_parameters())[name][:4], rtol=0, atol=0)
    assert not torch.equal(four.w_out_EFD[0], four.w_out_EFD[1])
    bound = 1 / 6 ** 0.5  # nn.Linear's scale for the F -> D projection
    assert four.w_out_EFD.abs().max() <= bound and four.w_out_EFD.abs().max() > 0.9 * bound

    with torch.device("meta"):
        lazy = experts(8, 6, 8)
    assert isinstance(lazy, LazyExperts) and lazy.is_lazy
    lazy.init_seed = four.init_seed
    lazy.materialize(slice(2, 4))
    assert lazy.num_experts == 2 and lazy.first_expert == 2
    for name, param in lazy.named_parameters():
        torch.testing.assert_close(param, dict(four.named_parameters())[name][2:4], rtol=0, atol=0)
    with torch.no_grad():
        for param in lazy.parameters():
            param.zero_()
    lazy.reset_parameters()  # re-initialising a shard keeps its global indices
    for name, param in lazy.named_parameters():
        torch.testing.assert_close(param, dict(four.named_parameters())[name][2:4], rtol=0, atol=0)


def test_materialize_refuses_experts_with_storage_and_rows_outside_them() -> None:
    with pytest.raises(RuntimeError, match="already has storage for experts 0..3"):
        SwiGLUExperts(8, 6, 4).materialize(slice(0, 2))
    with torch.device("meta"):
        lazy = SwiGLUExperts(8, 6, 4)
    with pytest.raises(ValueError, match=r"`rows` must be a slice of consecutive experts within \[0, 4\)"):
        lazy.materialize(slice(2, 6))


def layers(**kwargs: object) -> tuple[MoELayer, MoELayer]:
    """The same layer at P = 1 and P = 2, with a shared expert built after the routed ones."""
    torch.manual_seed(0)
    whole = MoELayer(12, 10, 6, shared_d_ff=8, **kwargs)
    torch.manual_seed(0)
    lazy = MoELayer(12, 10, 6, shared_d_ff=8, expert_parallel_size=2, **kwargs)
    return whole, lazy


def test_weights_built_after_lazy_experts_are_those_of_one_process() -> None:
    whole, lazy = layers()
    assert lazy.experts_lazy
    torch.testing.assert_close(lazy.shared_expert.up.weight, whole.shared_expert.up.weight, rtol=0, atol=0)
    states = []
    for size in (1, 2, 3):
        torch.manual_seed(0)
        MoELayer(12, 10, 6, expert_parallel_size=size)
        states.append(torch.random.get_rng_state())
    assert torch.equal(states[0], states[1]) and torch.equal(states[0], states[2])


def test_a_factory_without_lazy_support_is_built_whole_with_the_same_random_numbers() -> None:
    class PlainExperts(nn.Module):
        def __init__(self, d_model: int, d_ff: int, num_experts: int) -> None:
            super().__init__()
            self.num_experts = num_experts
            self.w_EDF = nn.Parameter(torch.randn(num_experts, d_model, d_ff))

        def expert_forward(self, expert: int, x_ND: torch.Tensor) -> torch.Tensor:
            return (x_ND @ self.w_EDF[expert]) @ self.w_EDF[expert].T

        def grouped_forward(self, x_AD: torch.Tensor, counts: list[int]) -> torch.Tensor:
            return torch.cat([self.expert_forward(e, x) for e, x in enumerate(x_AD.split(counts))])

    whole, plain = layers(experts=PlainExperts)
    assert not plain.experts_lazy
    torch.testing.assert_close(plain.experts.w_EDF, whole.experts.w_EDF, rtol=0, atol=0)
    torch.testing.assert_close(plain.shared_expert.gate.weight, whole.shared_expert.gate.weight, rtol=0, atol=0)
    shard_experts(plain, fake_groups(2, 1))  # today's path: sliced
    torch.testing.assert_close(plain.experts.w_EDF, whole.experts.w_EDF[3:], rtol=0, atol=0)


def test_sharding_gives_a_lazy_layer_its_own_rows_only() -> None:
    whole, lazy = layers()
    shard_experts(lazy, fake_groups(2, 1))
    assert not lazy.experts_lazy and lazy.experts.first_expert == 3 and lazy.experts.num_experts == 3
    for name, param in lazy.experts.named_parameters():
        torch.testing.assert_close(param, dict(whole.experts.named_parameters())[name][3:], rtol=0, atol=0)
        assert param.allreduce is False and param.group_name == "ep_size_2"


def test_used_before_sharding_a_lazy_layer_gets_all_its_experts() -> None:
    x = torch.randn(2, 7, 12)
    # forward
    whole, lazy = layers()
    torch.testing.assert_close(lazy(x), whole(x))
    assert not lazy.experts_lazy and lazy.experts.w_gate_EDF.shape[0] == 6
    # state_dict: values, never meta placeholders
    whole, lazy = layers()
    state = lazy.state_dict()
    assert not lazy.experts_lazy
    torch.testing.assert_close(state["experts.w_up_EDF"], whole.experts.w_up_EDF, rtol=0, atol=0)
    # load_state_dict of whole tensors loads them (into meta tensors it would do nothing)
    whole, lazy = layers()
    with torch.no_grad():
        whole.experts.w_out_EFD.mul_(3)
    lazy.load_state_dict(whole.state_dict())
    torch.testing.assert_close(lazy.experts.w_out_EFD, whole.experts.w_out_EFD, rtol=0, atol=0)
    # an optimizer built before holds the same parameter objects, which now have storage
    whole, lazy = layers()
    before = lazy.experts.w_gate_EDF
    optimizer = torch.optim.SGD(lazy.parameters(), lr=0.1)
    lazy(x).sum().backward()
    optimizer.step()
    assert lazy.experts.w_gate_EDF is before and not before.is_meta
    assert not torch.equal(before, whole.experts.w_gate_EDF)
    # a dtype change while lazy keeps the parameter objects too (and the optimizer's hold on them)
    whole, lazy = layers()
    before = lazy.experts.w_gate_EDF
    optimizer = torch.optim.SGD(lazy.parameters(), lr=0.1)
    lazy.double()
    assert lazy.experts.w_gate_EDF is before and before.dtype == torch.float64 and lazy.experts_lazy
    lazy(x.double()).sum().backward()
    optimizer.step()
    assert not torch.equal(before, whole.experts.w_gate_EDF.double())
    # a layer wholly on the meta device stays there (nothing to give storage on)
    with torch.device("meta"):
        meta = MoELayer(12, 10, 6, expert_parallel_size=2)
    assert meta.state_dict()["experts.w_up_EDF"].is_meta and meta.experts_lazy


def test_upcycling_some_experts_gives_their_rows_of_all() -> None:
    dense = [torch.randn(16, 8), torch.randn(16, 8), torch.randn(8, 16)]
    whole = upcycle_swiglu(*dense, 8, method="split", granularity=4, noise=0.1, seed=3, layer=1)
    some = upcycle_swiglu(*dense, 8, method="split", granularity=4, noise=0.1, seed=3, layer=1, experts=[2, 3])
    other_layer = upcycle_swiglu(*dense, 8, method="split", granularity=4, noise=0.1, seed=3, layer=2)
    for all_rows, rows, other in zip(whole, some, other_layer, strict=True):
        torch.testing.assert_close(rows, all_rows[2:4], rtol=0, atol=0)
        assert not torch.equal(other, all_rows)
    with pytest.raises(ValueError, match=r"`experts` must be global expert indices in \[0, 8\)"):
        upcycle_swiglu(*dense, 8, method="split", granularity=4, experts=[8])
