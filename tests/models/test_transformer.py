import pytest
import torch

from lightning_moe.balancing import SwitchAuxLoss, ZLoss
from lightning_moe.experts import SwiGLU
from lightning_moe.layers import MoEConfig, MoELayer
from lightning_moe.models import MoETransformer
from lightning_moe.models.transformer import MOVED_TO_MOE
from lightning_moe.routing import TopKRouter


def small(**kwargs) -> MoETransformer:
    args = dict(vocab_size=50, max_seq_len=16, d_model=32, n_layers=4, n_heads=4, d_ff=64, num_experts=4,
                expert_d_ff=32, balancers=[SwitchAuxLoss(), ZLoss()])
    args.update(kwargs)
    moe = MoEConfig(**{name: args.pop(name) for name in list(args) if name in MOVED_TO_MOE})
    return MoETransformer(**args, moe=moe)


def test_forward_shape_and_aux_losses() -> None:
    torch.manual_seed(0)
    model = small()
    logits = model(torch.randint(0, 50, (3, 16)))
    assert logits.shape == (3, 16, 50)
    aux = model.aux_losses()
    assert set(aux) == {"aux_loss", "z_loss"}
    expected = sum(layer.aux_losses["aux_loss"] for layer in model.moe_layers())
    torch.testing.assert_close(aux["aux_loss"], expected)


def test_first_loss_is_near_log_vocab() -> None:
    torch.manual_seed(0)
    model = small(vocab_size=256)
    ids = torch.randint(0, 256, (4, 16))
    loss = torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
    assert abs(loss.item() - torch.log(torch.tensor(256.0)).item()) < 0.5


def test_causal() -> None:
    torch.manual_seed(0)
    model = small().eval()
    ids = torch.randint(0, 50, (1, 12))
    changed = ids.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 50
    torch.testing.assert_close(model(ids)[:, :8], model(changed)[:, :8])
    assert not torch.allclose(model(ids)[:, 8:], model(changed)[:, 8:])


@pytest.mark.parametrize("moe_every, moe_layers", [(1, [0, 1, 2, 3]), (2, [1, 3]), (4, [3]), (0, [])])
def test_moe_every(moe_every: int, moe_layers: list[int]) -> None:
    model = small(moe_every=moe_every)
    kinds = [type(block.ffn) for block in model.blocks]
    assert [i for i, kind in enumerate(kinds) if kind is MoELayer] == moe_layers
    assert all(kind in (MoELayer, SwiGLU) for kind in kinds)


def test_router_factory_gets_model_widths() -> None:
    calls = []

    def factory(d_model: int, num_experts: int) -> TopKRouter:
        calls.append((d_model, num_experts))
        return TopKRouter(d_model, num_experts, top_k=1, renormalize=False)

    model = small(router=factory, moe_every=2)
    assert calls == [(32, 4), (32, 4)]
    assert all(layer.router.top_k == 1 for layer in model.moe_layers())


def test_dense_baseline_has_the_same_active_parameters() -> None:
    moe = small(num_experts=8, expert_d_ff=32, router=lambda d, e: TopKRouter(d, e, top_k=2))
    dense = small(moe_every=0, d_ff=64, balancers=[])
    moe_counts, dense_counts = moe.parameter_counts(), dense.parameter_counts()
    router_params = 4 * 8 * 32
    assert moe_counts["active"] == dense_counts["active"] + router_params
    assert dense_counts["total"] == dense_counts["active"]
    assert moe_counts["total"] - moe_counts["active"] == 4 * 6 * 3 * 32 * 32  # 6 idle experts per layer
    assert dense.aux_losses() == {} and dense.moe_layers() == []


def test_generate() -> None:
    torch.manual_seed(0)
    out = small().generate(torch.randint(0, 50, (2, 3)), max_new_tokens=20, top_k=5)
    assert out.shape == (2, 23) and out.max() < 50


@pytest.mark.parametrize("kwargs, match", [
    ({"d_model": 0}, "`d_model` must be an integer >= 1"),
    ({"expert_d_ff": 0}, "`expert_d_ff` must be an integer >= 1"),
    ({"n_layers": -1}, "`n_layers` must be an integer >= 1"),
    ({"moe_every": 5}, r"`moe_every` must be an integer in \[0, 4\]"),
    ({"d_model": 30}, "split into `n_heads`"),
    ({"dispatcher": "nope", "moe_every": 0}, "Unknown `dispatcher` 'nope'"),
])
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        small(**kwargs)


def test_sequence_too_long() -> None:
    with pytest.raises(ValueError, match="exceeds `max_seq_len`=16"):
        small()(torch.zeros(1, 17, dtype=torch.long))
