"""Discovery of Hugging Face MoE blocks: tiny random-initialised models, no hub."""

from __future__ import annotations

import copy
import gc
import math
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_moe.discovery import find_moe_layers

transformers = pytest.importorskip("transformers", reason="install the `hf` extra: pip install -e '.[hf]'")

from hf_models import BATCH, FAMILIES, SEQ, build, ids  # noqa: E402

from lightning_moe.integrations.hf import DeepseekV3View, HFMoEView  # noqa: E402


def reference(family: str, block: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(chosen experts (T, K), normalised scores (T, E))`` by the family's rule, written out here."""
    gate = block.gate
    x_TD = x.reshape(-1, x.shape[-1])
    logits = F.linear(x_TD.float(), gate.weight.float())
    top_k = gate.top_k
    if family != "deepseek_v3":
        probs = torch.softmax(logits, dim=-1)
        return probs.topk(top_k, dim=-1).indices, probs
    sig = logits.sigmoid()
    choice = sig + gate.e_score_correction_bias
    T, E = choice.shape
    groups, keep = gate.num_group, gate.topk_group
    group_score = choice.view(T, groups, E // groups).topk(2, dim=-1).values.sum(-1)
    kept = group_score.topk(keep, dim=-1).indices
    allowed = torch.zeros(T, groups, dtype=torch.bool).scatter_(1, kept, True)
    allowed = allowed.repeat_interleave(E // groups, dim=1)
    chosen = choice.masked_fill(~allowed, -math.inf).topk(top_k, dim=-1).indices
    return chosen, sig / sig.sum(-1, keepdim=True)


def capture_inputs(blocks: list[nn.Module]) -> tuple[list[Tensor], list]:
    inputs: list[Tensor] = []
    handles = [b.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach().clone())) for b in blocks]
    return inputs, handles


@pytest.mark.parametrize("family", list(FAMILIES))
def test_finds_blocks_and_stats_match_the_family_rule(family: str) -> None:
    _, names, E, K = FAMILIES[family]
    model = build(family)
    views = find_moe_layers(model)
    assert [v.name for v in views] == names
    assert all(v.family == family and v.num_experts == E and isinstance(v, HFMoEView) for v in views)
    assert all(v.stats is None for v in views)
    blocks = [v.module for v in views]
    assert all(b is model.get_submodule(n) for b, n in zip(blocks, names, strict=True))
    if family == "deepseek_v3":  # a non-zero bias offset, so the reference's use of it matters
        with torch.no_grad():
            for block in blocks:
                block.gate.e_score_correction_bias.copy_(torch.linspace(-0.02, 0.02, E))

    inputs, handles = capture_inputs(blocks)
    with torch.no_grad():
        model(input_ids=ids())
    for h in handles:
        h.remove()

    T = BATCH * SEQ
    first = []
    for view, block, x in zip(views, blocks, inputs, strict=True):
        stats = view.stats
        chosen, scores = reference(family, block, x)
        assert stats.num_tokens == T and int(stats.num_dropped) == 0
        assert int(stats.tokens_per_expert_E.sum()) == T * K
        assert torch.equal(stats.tokens_per_expert_E, torch.bincount(chosen.flatten(), minlength=E))
        if family == "deepseek_v3":  # the group limit and the bias change some tokens' choices
            plain = F.linear(x.reshape(T, -1), block.gate.weight).sigmoid().topk(K, dim=-1).indices
            assert (chosen.sort(-1).values != plain.sort(-1).values).any()
        torch.testing.assert_close(stats.mean_score_E, scores.mean(0), atol=1e-5, rtol=0)
        entropy = -(scores * scores.log()).sum(-1).mean()
        torch.testing.assert_close(stats.entropy, entropy, atol=1e-5, rtol=0)
        assert not stats.mean_score_E.requires_grad and not stats.entropy.requires_grad
        first.append(stats)

    # A second search returns the same objects and registers no second hook.
    again = find_moe_layers(model)
    assert all(a is b for a, b in zip(again, views, strict=True)) and len(again) == len(views)
    assert all(len(b.gate._forward_hooks) == 1 for b in blocks)
    with torch.no_grad():
        model(input_ids=ids())
    for view, stats in zip(again, first, strict=True):
        assert torch.equal(view.stats.tokens_per_expert_E, stats.tokens_per_expert_E)
        assert torch.equal(view.stats.mean_score_E, stats.mean_score_E)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_hooks_do_not_change_outputs_or_gradients(family: str) -> None:
    model = build(family)
    batch = ids()
    plain = model(input_ids=batch, labels=batch)
    plain.loss.backward()
    plain_grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)

    assert find_moe_layers(model)
    hooked = model(input_ids=batch, labels=batch)
    hooked.loss.backward()
    assert torch.equal(plain.logits, hooked.logits)
    hooked_grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(plain_grads) == len(hooked_grads)
    assert all(torch.equal(a, b) for a, b in zip(plain_grads, hooked_grads, strict=True))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_revive_copies_source_expert_and_router_row(family: str) -> None:
    model = build(family)
    view = find_moe_layers(model)[0]
    block = view.module
    tensors = view.expert_tensors()
    rows = view.router_rows()
    assert len(rows) == 1 and rows[0] is block.gate.weight
    assert len(tensors) == 2
    assert tensors[0] is block.experts.gate_up_proj and tensors[1] is block.experts.down_proj
    before = [t.detach().clone() for t in (*tensors, *rows)]
    dst, src = 1, 3

    changed = view.revive([dst], [src], noise=0.0)
    for tensor in (*tensors, *rows):
        assert any(tensor is c and changed_rows == [dst] for c, changed_rows in changed)
    for tensor, old in zip((*tensors, *rows), before, strict=True):
        assert torch.equal(tensor[dst], tensor[src])
        others = [e for e in range(view.num_experts) if e != dst]
        assert torch.equal(tensor[others], old[others])
    bias = view.expert_bias
    assert (bias is not None) == (family == "deepseek_v3")
    if bias is not None:
        assert any(bias is c for c, _ in changed)

    dst = 0
    view.revive([dst], [src], noise=0.01, generator=torch.Generator().manual_seed(0))
    for tensor in (*tensors, *rows):
        diff = (tensor[dst] - tensor[src]).abs().max()
        assert 0 < diff < 0.1 * tensor[src].std()


def test_deepseek_bias_is_the_buffer_and_steers_routing() -> None:
    model = build("deepseek_v3")
    views = find_moe_layers(model)
    assert all(isinstance(v, DeepseekV3View) for v in views)
    for view in views:
        buffer = view.module.gate.e_score_correction_bias
        assert view.expert_bias is buffer and view.expert_bias.data_ptr() == buffer.data_ptr()
    with torch.no_grad():
        views[0].expert_bias[5] += 100.0
        model(input_ids=ids())
    counts = views[0].stats.tokens_per_expert_E
    assert int(counts[5]) == BATCH * SEQ and int(counts.sum()) == BATCH * SEQ * 2
    assert int(views[1].stats.tokens_per_expert_E.max()) < BATCH * SEQ


def test_deepseek_rule_in_the_view_matches_the_router() -> None:
    """The view's own group-limited rule (used when a gate returns no indices) agrees with the gate."""
    model = build("deepseek_v3")
    view = find_moe_layers(model)[0]
    gate = view.module.gate
    with torch.no_grad():
        gate.e_score_correction_bias.copy_(torch.linspace(-0.05, 0.05, 8))
        x = torch.randn(40, 32)
        logits, weights, indices = gate(x)
        mine, my_weights = view.select_experts(logits.float())
    assert torch.equal(mine.sort(-1).values, indices.sort(-1).values)
    order_gate, order_mine = indices.argsort(-1), mine.argsort(-1)
    torch.testing.assert_close(my_weights.gather(1, order_mine), weights.gather(1, order_gate))


# A block in the transformers 4.x layout: nn.Linear gate returning logits, ModuleList of expert MLPs.
class _Expert(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1, self.w3 = nn.Linear(8, 16, bias=False), nn.Linear(8, 16, bias=False)
        self.w2 = nn.Linear(16, 8, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MixtralSparseMoeBlock(nn.Module):  # the 4.x class name; matched by name, not by import
    def __init__(self) -> None:
        super().__init__()
        self.top_k = 2
        self.gate = nn.Linear(8, 4, bias=False)
        self.experts = nn.ModuleList(_Expert() for _ in range(4))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.reshape(-1, 8)
        logits = self.gate(x)
        weights, chosen = torch.topk(F.softmax(logits, dim=1, dtype=torch.float), self.top_k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for k in range(self.top_k):
            for e, expert in enumerate(self.experts):
                mask = chosen[:, k] == e
                out[mask] += weights[mask, k, None] * expert(x[mask])
        return out, logits


def test_legacy_per_expert_layout() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(MixtralSparseMoeBlock(), nn.Identity())
    (view,) = find_moe_layers(model)
    assert view.name == "0" and view.family == "mixtral" and view.expert_tensors() == []
    x = torch.randn(30, 8)
    with torch.no_grad():
        model[0](x)
    probs = torch.softmax(model[0].gate(x), -1)
    expected = torch.bincount(probs.topk(2, -1).indices.flatten(), minlength=4)
    assert torch.equal(view.stats.tokens_per_expert_E, expected)
    torch.testing.assert_close(view.stats.mean_score_E, probs.mean(0).detach(), atol=1e-5, rtol=0)

    experts = model[0].experts
    changed = view.revive([2], [0], noise=0.0)
    for p_dst, p_src in zip(experts[2].parameters(), experts[0].parameters(), strict=True):
        assert torch.equal(p_dst, p_src) and any(p_dst is c and rows is None for c, rows in changed)
    assert torch.equal(model[0].gate.weight[2], model[0].gate.weight[0])
    assert any(model[0].gate.weight is c and rows == [2] for c, rows in changed)


def test_module_without_moe_gives_nothing() -> None:
    assert find_moe_layers(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))) == []


def test_deep_copy_gets_its_own_views_and_views_do_not_keep_models_alive() -> None:
    model = build("olmoe")
    views = find_moe_layers(model)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin(input_ids=ids())
    twin_views = find_moe_layers(twin)
    assert [v.name for v in twin_views] == [v.name for v in views]
    for view, twin_view in zip(views, twin_views, strict=True):
        assert twin_view is not view and twin_view.module is twin.get_submodule(view.name)
        assert len(twin_view.module.gate._forward_hooks) == 1
        assert twin_view.stats is not None and view.stats is None

    ref = weakref.ref(model)
    del model, views
    gc.collect()
    assert ref() is None
