"""Hash routing: parameter-free, deterministic across runs and processes, balanced id tables."""

import subprocess
import sys

import pytest
import torch

from lightning_moe.layers import MoEConfig, MoELayer
from lightning_moe.models import MoETransformer
from lightning_moe.routing import HashRouter

PROBE = """
import torch
from lightning_moe.routing import HashRouter
torch.manual_seed({torch_seed})  # the global seed must not matter
router = HashRouter(16, 8, top_k=2, vocab_size=300, seed=7)
x = torch.linspace(-3, 3, 40 * 16).reshape(40, 16).sin()
ids = torch.arange(0, 280, 7)
print(router(x).expert_A.tolist())
print(router(x[:ids.numel()], ids).expert_A.tolist())
"""


def test_no_parameters() -> None:
    assert not list(HashRouter(16, 8, vocab_size=10).parameters())


def test_deterministic_across_runs_and_processes() -> None:
    outputs = [
        subprocess.run([sys.executable, "-c", PROBE.format(torch_seed=seed)], capture_output=True, text=True,
                       check=True).stdout
        for seed in (0, 1)
    ]
    assert outputs[0] == outputs[1]
    torch.manual_seed(123)
    router = HashRouter(16, 8, top_k=2, vocab_size=300, seed=7)
    x = torch.linspace(-3, 3, 40 * 16).reshape(40, 16).sin()
    ids = torch.arange(0, 280, 7)
    here = f"{router(x).expert_A.tolist()}\n{router(x[:ids.numel()], ids).expert_A.tolist()}\n"
    assert outputs[0] == here
    assert HashRouter(16, 8, top_k=2, vocab_size=300, seed=8)(x[:ids.numel()], ids).expert_A.tolist() != \
        router(x[:ids.numel()], ids).expert_A.tolist()


def test_id_table_gives_every_expert_the_same_number_of_ids() -> None:
    router = HashRouter(16, 8, vocab_size=256)
    ids = torch.arange(256)
    r = router(torch.randn(256, 16), ids)
    assert torch.equal(r.tokens_per_expert(), torch.full((8,), 32))
    # Same id, same expert, whatever the hidden state.
    again = router(torch.randn(256, 16), ids)
    assert torch.equal(r.expert_A, again.expert_A)


def test_top_k_by_id_reaches_consecutive_distinct_experts() -> None:
    router = HashRouter(16, 5, top_k=3, vocab_size=50)
    r = router(torch.randn(50, 16), torch.arange(50))
    experts_TK = r.expert_A.view(50, 3)
    assert torch.equal(experts_TK, (experts_TK[:, :1] + torch.arange(3)) % 5)
    torch.testing.assert_close(r.weight_A, torch.full((150,), 1 / 3))


def test_balance_by_frequency_equalises_token_loads() -> None:
    torch.manual_seed(0)
    vocab = 256
    counts = (1000 / torch.arange(1, vocab + 1)).round()  # Zipf-like: a few ids dominate
    router = HashRouter(16, 8, vocab_size=vocab)
    def token_loads() -> torch.Tensor:
        return torch.zeros(8).index_add_(0, router.expert_of_id_V, counts)
    before = token_loads()
    router.balance_by_frequency(counts)
    after = token_loads()
    assert (after.max() - after.min()) < 0.5 * (before.max() - before.min())
    # The most frequent id alone (1000 tokens) exceeds the mean load (765); every other expert is within 2%.
    assert after.max() == counts.max()
    rest = after.sort().values[:-1]
    assert (rest / rest.mean() - 1).abs().max() < 0.02
    with pytest.raises(ValueError, match="counts_V"):
        router.balance_by_frequency(counts[:10])
    with pytest.raises(ValueError, match="vocab_size"):
        HashRouter(16, 8).balance_by_frequency(counts)


def test_ids_outside_the_vocabulary_are_refused() -> None:
    router = HashRouter(16, 4, vocab_size=10)
    with pytest.raises(ValueError, match="vocab_size"):
        router(torch.randn(2, 16), torch.tensor([3, 10]))
    with pytest.raises(ValueError, match="token ids"):
        router(torch.randn(2, 16), torch.tensor([3]))


def test_lsh_routes_similar_states_together_and_spreads_isotropic_ones() -> None:
    torch.manual_seed(0)
    router = HashRouter(32, 8)
    x = torch.randn(8000, 32)
    r = router(x)
    loads = r.tokens_per_expert().float()
    assert (loads / loads.mean() - 1).abs().max() < 0.15
    nearby = router(x + 1e-4 * torch.randn_like(x))
    assert (nearby.expert_A == r.expert_A).float().mean() > 0.99
    assert torch.equal(router(2.0 * x).expert_A, r.expert_A)  # a direction hash: scale does not matter


def test_model_passes_token_ids_down_to_the_router() -> None:
    torch.manual_seed(0)
    model = MoETransformer(
        vocab_size=64, max_seq_len=16, d_model=32, n_layers=2, n_heads=2, d_ff=64,
        moe=MoEConfig(num_experts=4, expert_d_ff=16, router=lambda d, e: HashRouter(d, e, vocab_size=64)),
    )
    ids = torch.randint(0, 64, (3, 16))
    model(ids)
    layer: MoELayer = model.moe_layers()[0]
    expected = layer.router.expert_of_id_V[ids.reshape(-1)]
    # Each token's expert is its id's, so the per-expert counts follow the ids.
    assert torch.equal(layer.stats.tokens_per_expert_E, torch.bincount(expected, minlength=4))
