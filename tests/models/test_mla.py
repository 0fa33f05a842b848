"""Multi-head latent attention against a reference written from DeepSeek-V2's equations (section 2.1),
its reduction to multi-head attention, causality, the KV cache size, training and upcycling.

Legend: ``B`` batch, ``S`` sequence, ``D`` model width, ``H`` heads, ``N``/``R`` non-rotary and rotary
query/key head widths, ``Dv`` value head width, ``C`` key-value latent width, ``V`` vocabulary.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_moe.balancing import SwitchAuxLoss, ZLoss
from lightning_moe.layers import MoEConfig, MoELayer
from lightning_moe.models import MLAConfig, MoETransformer, MultiHeadLatentAttention
from lightning_moe.models.attention import Rotary
from lightning_moe.routing import TopKRouter
from lightning_moe.upcycling import upcycle, upcycle_state_dict

D, H, BASE = 12, 3, 10000.0

# ---------------------------------------------------------------------------------------------
# The reference, from the paper's equations: explicit per-head loops, its own RoPE and RMSNorm.


def ref_rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def ref_rope(x_SR: Tensor, base: float = BASE) -> Tensor:
    """Rotate each pair ``(j, j + R/2)`` of position ``p``'s vector by the angle ``p * base^(-2j/R)``."""
    seq_len, r = x_SR.shape
    out = []
    for p in range(seq_len):
        first, second = [], []
        for j in range(r // 2):
            angle = torch.tensor(p * base ** (-2 * j / r), dtype=x_SR.dtype)
            a, b = x_SR[p, j], x_SR[p, j + r // 2]
            first.append(a * torch.cos(angle) - b * torch.sin(angle))
            second.append(a * torch.sin(angle) + b * torch.cos(angle))
        out.append(torch.stack(first + second))
    return torch.stack(out)


def ref_mla(attn: MultiHeadLatentAttention, h_BSD: Tensor) -> Tensor:
    cfg = attn.config
    n, r, dv, c = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    heads = attn.n_heads
    if cfg.q_lora_rank is None:
        q_BSX = h_BSD @ attn.q_proj.weight.T  # W_Q h
    else:
        c_q = ref_rms_norm(h_BSD @ attn.q_down.weight.T, attn.q_norm.weight)  # RMSNorm(W_DQ h)
        q_BSX = c_q @ attn.q_up.weight.T  # W_UQ c_q
    down_BSX = h_BSD @ attn.kv_down.weight.T  # [c_kv; k_rope'] = W_DKV h
    c_kv = ref_rms_norm(down_BSX[..., :c], attn.kv_norm.weight)
    kv_BSX = c_kv @ attn.kv_up.weight.T  # W_UKV c_kv: per head [k_nope; v]
    outputs = []
    for b in range(h_BSD.shape[0]):
        seq_len = h_BSD.shape[1]
        k_rope_SR = ref_rope(down_BSX[b, :, c:]) if r else None  # one rotary key, shared by all heads
        heads_out = []
        for i in range(heads):
            q_SQ = q_BSX[b, :, i * (n + r):(i + 1) * (n + r)]
            q_nope, q_rope = q_SQ[:, :n], q_SQ[:, n:]
            kv_SK = kv_BSX[b, :, i * (n + dv):(i + 1) * (n + dv)]
            k_nope, v_SDv = kv_SK[:, :n], kv_SK[:, n:]
            scores_SS = q_nope @ k_nope.T
            if r:
                scores_SS = scores_SS + ref_rope(q_rope) @ k_rope_SR.T
            scores_SS = scores_SS / math.sqrt(n + r)
            future = torch.ones(seq_len, seq_len, dtype=torch.bool).triu(1)
            weights_SS = torch.softmax(scores_SS.masked_fill(future, float("-inf")), dim=-1)
            heads_out.append(weights_SS @ v_SDv)
        outputs.append(torch.cat(heads_out, dim=-1) @ attn.proj.weight.T)  # W_O [o_1; ...; o_H]
    return torch.stack(outputs)


def random_mla(config: MLAConfig, seed: int = 0, dtype: torch.dtype = torch.float64) -> MultiHeadLatentAttention:
    """An MLA of D=12, H=3 with every weight random (the norms' too), in ``dtype``."""
    torch.manual_seed(seed)
    rotary = Rotary(config.qk_rope_head_dim, 32, BASE) if config.qk_rope_head_dim else None
    attn = MultiHeadLatentAttention(D, H, config, rotary).to(dtype)
    with torch.no_grad():
        for name, param in attn.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(std=0.4)
    return attn


CASES = {
    "q-lora": (MLAConfig(q_lora_rank=8, kv_lora_rank=6, qk_rope_head_dim=4, qk_nope_head_dim=6, v_head_dim=5), 7),
    "no-q-lora": (MLAConfig(q_lora_rank=None, kv_lora_rank=6, qk_rope_head_dim=4, qk_nope_head_dim=6,
                            v_head_dim=5), 5),
    "no-rope": (MLAConfig(q_lora_rank=8, kv_lora_rank=6, qk_rope_head_dim=0, qk_nope_head_dim=6, v_head_dim=5), 9),
    "no-nope": (MLAConfig(q_lora_rank=None, kv_lora_rank=6, qk_rope_head_dim=6, qk_nope_head_dim=0,
                          v_head_dim=4), 11),
    "one-token": (MLAConfig(q_lora_rank=8, kv_lora_rank=6, qk_rope_head_dim=2, qk_nope_head_dim=3, v_head_dim=5), 1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_mla_matches_the_paper_equations_in_outputs_and_gradients(case: str) -> None:
    config, seq_len = CASES[case]
    attn = random_mla(config)
    x_BSD = torch.randn(2, seq_len, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    w_BSD = torch.randn(2, seq_len, D, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    params = dict(attn.named_parameters())
    expected_names = {"kv_down.weight", "kv_norm.weight", "kv_up.weight", "proj.weight"} | (
        {"q_proj.weight"} if config.q_lora_rank is None else {"q_down.weight", "q_norm.weight", "q_up.weight"})
    assert set(params) == expected_names

    results = []
    for forward in (attn, functools.partial(ref_mla, attn)):
        x = x_BSD.clone().requires_grad_(True)
        y_BSD = forward(x)
        grads = torch.autograd.grad((y_BSD * w_BSD).sum(), [x, *params.values()])
        results.append((y_BSD.detach(), grads))
    (y, grads), (ref_y, ref_grads) = results
    assert y.dtype == torch.float64 and ref_y.abs().max() > 0.1
    # The module's RMSNorm and rotary tables compute in float32, so agreement is to float32 rounding.
    torch.testing.assert_close(y, ref_y, rtol=1e-5, atol=1e-6 * ref_y.abs().max().item())
    for name, grad, ref in zip(["input", *params], grads, ref_grads, strict=True):
        # One token attends to itself only (weight 1): the queries do not matter.
        assert (ref.abs().max() > 0) == (seq_len > 1 or not name.startswith("q_")), name
        torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-6 * max(ref.abs().max().item(), 1.0), msg=name)


def test_reference_rope_is_the_rotary_module() -> None:
    x_SR = torch.randn(9, 6, dtype=torch.float64)
    torch.testing.assert_close(Rotary(6, 16, BASE).to(torch.float64)(x_SR[None, None])[0, 0], ref_rope(x_SR),
                               rtol=1e-6, atol=1e-6)
    # Position 0 is not rotated, and every rotation keeps the pairs' lengths.
    torch.testing.assert_close(ref_rope(x_SR)[0], x_SR[0])
    pair_norms = (x_SR[:, :3] ** 2 + x_SR[:, 3:] ** 2).sqrt()
    rotated = ref_rope(x_SR)
    torch.testing.assert_close((rotated[:, :3] ** 2 + rotated[:, 3:] ** 2).sqrt(), pair_norms)


# ---------------------------------------------------------------------------------------------
# Reduction to multi-head attention


def test_without_rope_and_low_rank_mla_is_multi_head_attention_on_unit_rms_inputs() -> None:
    n = dv = D // H
    config = MLAConfig(q_lora_rank=None, kv_lora_rank=D, qk_rope_head_dim=0, qk_nope_head_dim=n, v_head_dim=dv)
    torch.manual_seed(0)
    attn = MultiHeadLatentAttention(D, H, config, rotary=None).double()
    with torch.no_grad():
        attn.kv_down.weight.copy_(torch.eye(D))
    assert torch.equal(attn.kv_norm.weight, torch.ones(D))
    # W_K and W_V: the rows of W_UKV, head by head [k_nope (N); v (Dv)].
    w_up = attn.kv_up.weight.view(H, n + dv, D)
    w_k, w_v = w_up[:, :n].reshape(D, D), w_up[:, n:].reshape(D, D)
    mha = torch.nn.MultiheadAttention(D, H, bias=False, batch_first=True).double()
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([attn.q_proj.weight, w_k, w_v]))
        mha.out_proj.weight.copy_(attn.proj.weight)

    x_BSD = torch.randn(2, 9, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x_BSD = x_BSD / x_BSD.pow(2).mean(-1, keepdim=True).sqrt()  # unit RMS, as after the block's pre-norm
    causal = torch.ones(9, 9, dtype=torch.bool).triu(1)
    with torch.no_grad():
        expected, _ = mha(x_BSD, x_BSD, x_BSD, attn_mask=causal, need_weights=False)
        torch.testing.assert_close(attn(x_BSD), expected, rtol=1e-5, atol=1e-6)
        # The condition matters: off unit RMS the latent's RMSNorm rescales keys and values.
        scaled, _ = mha(3 * x_BSD, 3 * x_BSD, 3 * x_BSD, attn_mask=causal, need_weights=False)
        assert (attn(3 * x_BSD) - scaled).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------------
# Causality


@pytest.mark.parametrize("case", ["q-lora", "no-rope", "no-nope"])
def test_mla_is_causal(case: str) -> None:
    attn = random_mla(CASES[case][0])
    x_BSD = torch.randn(2, 11, D, dtype=torch.float64)
    for t in (0, 4, 10):
        changed = x_BSD.clone()
        changed[:, t] += torch.randn(2, D, dtype=torch.float64)
        with torch.no_grad():
            y, y_changed = attn(x_BSD), attn(changed)
        torch.testing.assert_close(y_changed[:, :t], y[:, :t], rtol=0, atol=1e-12)
        assert (y_changed[:, t] - y[:, t]).abs().max() > 1e-3


def mla_model(**kwargs) -> MoETransformer:  # noqa: ANN003
    args = dict(vocab_size=50, max_seq_len=16, d_model=32, n_layers=2, n_heads=4, d_ff=64, attention="mla",
                mla=MLAConfig(q_lora_rank=16, kv_lora_rank=12, qk_rope_head_dim=4, qk_nope_head_dim=6, v_head_dim=8),
                moe=MoEConfig(num_experts=4, expert_d_ff=32, balancers=[SwitchAuxLoss(), ZLoss()]))
    args.update(kwargs)
    return MoETransformer(**args)


def test_mla_transformer_is_causal() -> None:
    torch.manual_seed(0)
    model = mla_model().eval()
    assert all(isinstance(block.attn, MultiHeadLatentAttention) for block in model.blocks)
    ids = torch.randint(0, 50, (2, 13))
    for t in (0, 6, 12):
        changed = ids.clone()
        changed[:, t] = (changed[:, t] + 1) % 50
        with torch.no_grad():
            logits, logits_changed = model(ids), model(changed)
        torch.testing.assert_close(logits_changed[:, :t], logits[:, :t], rtol=0, atol=1e-6)
        assert not torch.allclose(logits_changed[:, t], logits[:, t])


# ---------------------------------------------------------------------------------------------
# KV cache size and validation


def test_kv_cache_per_token_for_mla_and_mha() -> None:
    mla = mla_model(n_layers=3)
    assert mla.kv_cache_per_token() == 3 * (12 + 4)
    assert mla_model(n_layers=3, mla=MLAConfig(kv_lora_rank=10, qk_rope_head_dim=0)).kv_cache_per_token() == 3 * 10
    assert mla_model(n_layers=3, attention="mha").kv_cache_per_token() == 3 * 2 * 32
    # DeepSeek-V3's sizes: 512 + 64 = 576 per layer, against 2 * 128 * 128 for MHA of the same width.
    v3 = MLAConfig(q_lora_rank=1536, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128)
    assert v3.kv_lora_rank + v3.qk_rope_head_dim == 576


@pytest.mark.parametrize("kwargs, match", [
    ({"qk_rope_head_dim": 3}, r"`qk_rope_head_dim` must be even \(RoPE rotates pairs\), got 3"),
    ({"qk_rope_head_dim": -2}, r"`qk_rope_head_dim` must be an integer >= 0, got -2"),
    ({"q_lora_rank": 0}, r"`q_lora_rank` must be an integer >= 1, got 0"),
    ({"kv_lora_rank": 0}, r"`kv_lora_rank` must be an integer >= 1, got 0"),
    ({"v_head_dim": 0}, r"`v_head_dim` must be an integer >= 1, got 0"),
    ({"qk_nope_head_dim": -1}, r"`qk_nope_head_dim` must be an integer >= 0, got -1"),
    ({"qk_rope_head_dim": 0, "qk_nope_head_dim": 0}, r"`qk_rope_head_dim \+ qk_nope_head_dim`"),
])
def test_mla_config_errors_name_the_parameter(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MLAConfig(**kwargs)


def test_mla_with_rope_needs_a_rotary() -> None:
    with pytest.raises(ValueError, match="qk_rope_head_dim > 0 needs a Rotary"):
        MultiHeadLatentAttention(D, H, MLAConfig(qk_rope_head_dim=4), rotary=None)


# ---------------------------------------------------------------------------------------------
# Training


@pytest.mark.usefixtures("one_thread")
def test_mla_moe_transformer_trains_and_every_parameter_gets_a_gradient() -> None:
    torch.manual_seed(0)
    model = mla_model(moe=MoEConfig(num_experts=4, expert_d_ff=32, balancers=[SwitchAuxLoss(0.01)],
                                    router=functools.partial(TopKRouter, top_k=2)))
    assert len(model.moe_layers()) == 2
    ids_BS = torch.randint(0, 50, (4, 17), generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(8):
        logits_BSV = model(ids_BS[:, :-1])
        loss = F.cross_entropy(logits_BSV.flatten(0, 1), ids_BS[:, 1:].flatten())
        (loss + sum(model.aux_losses().values())).backward()
        if step == 0:
            missing = [name for name, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
            assert missing == []
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses


# ---------------------------------------------------------------------------------------------
# Upcycling a dense MLA model


def test_upcycled_mla_model_keeps_the_dense_function() -> None:
    mla = MLAConfig(q_lora_rank=16, kv_lora_rank=12, qk_rope_head_dim=4, qk_nope_head_dim=6, v_head_dim=8)
    dims = dict(vocab_size=64, max_seq_len=32, d_model=32, n_layers=3, n_heads=4, d_ff=48, attention="mla", mla=mla)
    torch.manual_seed(0)
    dense = MoETransformer(**dims, moe_every=0)
    with torch.no_grad():  # every weight random (norms too; a larger embedding, so logits are O(1))
        dense.embed.weight.normal_(std=0.5)
        for name, param in dense.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    dense.eval()
    moe = MoETransformer(**dims, moe=MoEConfig(num_experts=4, expert_d_ff=48,
                                               router=functools.partial(TopKRouter, top_k=2, renormalize=True)))
    upcycle_state_dict(moe, dense.state_dict(), method="copy", noise=0.0)
    moe.eval()
    assert all(isinstance(block.ffn, MoELayer) for block in moe.blocks)
    dense_attn, moe_attn = dense.state_dict(), moe.state_dict()
    for name in (k for k in dense_attn if ".attn." in k):
        assert torch.equal(moe_attn[name], dense_attn[name]), name
    ids_BS = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref_BSV = dense(ids_BS)
        assert ref_BSV.abs().max() > 1
        torch.testing.assert_close(moe(ids_BS), ref_BSV, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs", [
    {"attention": "mla", "mla": MLAConfig(q_lora_rank=16, kv_lora_rank=12, qk_rope_head_dim=4, qk_nope_head_dim=6,
                                          v_head_dim=8)},
    {"tie_embeddings": False},
    {"rope_base": 100.0},
], ids=["mla", "untied", "rope-base"])
def test_upcycle_keeps_the_dense_models_attention_and_embeddings(kwargs: dict) -> None:
    # upcycle() builds the MoE model itself: it must take every architectural argument from the dense model.
    torch.manual_seed(0)
    dense = MoETransformer(64, max_seq_len=32, d_model=32, n_layers=2, n_heads=4, d_ff=48, moe_every=0, **kwargs)
    with torch.no_grad():
        dense.embed.weight.normal_(std=0.5)
        if not dense.tie_embeddings:
            dense.lm_head.weight.normal_(std=0.5)
    moe = upcycle(dense.eval(), num_experts=4, router=functools.partial(TopKRouter, top_k=2, renormalize=True))
    assert (moe.attention, moe.mla, moe.tie_embeddings) == (dense.attention, dense.mla, dense.tie_embeddings)
    ids_BS = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(moe.eval()(ids_BS), dense(ids_BS), atol=1e-5, rtol=1e-5)


def test_upcycling_an_untied_dense_model_into_a_tied_one_is_refused() -> None:
    from lightning_moe.upcycling import upcycle_state_dict

    dense = MoETransformer(32, d_model=16, n_layers=1, n_heads=2, d_ff=16, moe_every=0, tie_embeddings=False)
    moe = MoETransformer(32, d_model=16, n_layers=1, n_heads=2, moe=MoEConfig(num_experts=2, expert_d_ff=16))
    with pytest.raises(ValueError, match="tie_embeddings=False"):
        upcycle_state_dict(moe, dense.state_dict(), "copy")
