"""Multi-token prediction: the loss against its formula, depth 0 as the model without MTP, what the
inference model leaves out, and the training loss, its scheduled weight and its logs under a real Trainer.

Legend: ``B`` batch, ``S`` sequence (the main model's input), ``N = S + 1`` tokens, ``D`` model width,
``V`` vocabulary.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_moe.balancing import SwitchAuxLoss, ZLoss
from lightning_moe.callbacks import Schedule, ZLossScheduler
from lightning_moe.layers import MoEConfig, MoELayer
from lightning_moe.models import MLAConfig, MoETransformer, mtp_cross_entropies
from lightning_moe.module import MoELanguageModel

VOCAB = 50


def tiny(seed: int = 0, **kwargs) -> MoETransformer:  # noqa: ANN003
    torch.manual_seed(seed)
    args = dict(max_seq_len=16, d_model=16, n_layers=2, n_heads=2, d_ff=32,
                moe=MoEConfig(num_experts=4, expert_d_ff=16, balancers=[SwitchAuxLoss(0.01), ZLoss(0.001)]))
    args.update(kwargs)
    return MoETransformer(VOCAB, **args)


def ids(batch: int = 3, tokens: int = 12, seed: int = 1) -> Tensor:
    return torch.randint(0, VOCAB, (batch, tokens), generator=torch.Generator().manual_seed(seed))


def rms(x: Tensor, weight: Tensor) -> Tensor:
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight


# ---------------------------------------------------------------------------------------------
# The loss against its formula


def test_mtp_cross_entropies_by_hand() -> None:
    # N = 4 tokens; depth 1 predicts t_2, t_3 from positions 0, 1; depth 2 predicts t_3 from position 0.
    ids_BN = torch.tensor([[0, 1, 2, 0]])
    depth1 = torch.tensor([[[0.0, 0.0, 0.0], [math.log(3), 0.0, 0.0]]])  # targets 2 (p=1/3), 0 (p=3/5)
    depth2 = torch.tensor([[[0.0, math.log(2), math.log(2)]]])  # target 0 (p=1/5)
    ce1, ce2 = mtp_cross_entropies([depth1, depth2], ids_BN)
    assert ce1.item() == pytest.approx((math.log(3) + math.log(5 / 3)) / 2)  # = log(5) / 2
    assert ce2.item() == pytest.approx(math.log(5))
    assert mtp_cross_entropies([], ids_BN) == []


@pytest.mark.parametrize("attention", ["mha", "mla"])
def test_forward_with_mtp_is_the_formula_from_the_modules_pieces(attention: str) -> None:
    model = tiny(mtp_depth=2, attention=attention,
                 mla=MLAConfig(q_lora_rank=8, kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8))
    with torch.no_grad():  # norms away from 1, so that each norm's place shows
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    assert isinstance(model.mtp[0].block.ffn, MoELayer)  # the last layer is MoE, so are the MTP blocks
    ids_BN = ids()
    b, n = ids_BN.shape
    s = n - 1
    with torch.no_grad():
        logits, mtp_logits = model.forward_with_mtp(ids_BN)
        losses = mtp_cross_entropies(mtp_logits, ids_BN)

        # By hand: h^0 is the main model's last hidden state (before its final norm), on the first S tokens.
        h_BSD = model.hidden_states(ids_BN[:, :s])
        torch.testing.assert_close(logits, model.lm_head(rms(h_BSD, model.norm.weight)))
        expected = []
        for k in (1, 2):
            module = model.mtp[k - 1]
            m = s - k  # positions i = 0 .. S-k-1
            emb_BMD = model.embed.weight[ids_BN[:, k:k + m]]  # Emb(t_{i+k})
            joined = torch.cat([rms(emb_BMD, module.enorm.weight), rms(h_BSD[:, :m], module.hnorm.weight)], dim=-1)
            h_prime = joined @ module.proj.weight.T  # M_k [enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)]
            h_BSD = module.block(h_prime, ids_BN[:, k:k + m])  # h^k = TRM_k(h'^k)
            logits_BMV = rms(h_BSD, module.norm.weight) @ model.lm_head.weight.T
            torch.testing.assert_close(mtp_logits[k - 1], logits_BMV, rtol=1e-5, atol=1e-5)
            # Cross-entropy against t_{i+k+1}, token by token.
            nll = [-torch.log_softmax(logits_BMV[r, i], -1)[ids_BN[r, i + k + 1]] for r in range(b) for i in range(m)]
            expected.append(torch.stack(nll).mean())
    assert [x.shape for x in mtp_logits] == [(b, s - 1, VOCAB), (b, s - 2, VOCAB)]
    torch.testing.assert_close(torch.stack(losses), torch.stack(expected), rtol=1e-5, atol=1e-6)


def test_forward_with_mtp_needs_enough_tokens() -> None:
    model = tiny(mtp_depth=2)
    model.forward_with_mtp(ids(tokens=4))  # S = 3: depth 2 predicts one token
    with pytest.raises(ValueError, match="A sequence of 3 tokens is too short for mtp_depth=2"):
        model.forward_with_mtp(ids(tokens=3))


# ---------------------------------------------------------------------------------------------
# Depth 0 is the model without MTP; MTP does not change the main model


def test_depth_zero_is_todays_model_and_loss() -> None:
    for kwargs in ({}, {"attention": "mla"}):
        plain, zero = tiny(**kwargs).state_dict(), tiny(mtp_depth=0, **kwargs).state_dict()
        assert list(plain) == list(zero)
        assert all(torch.equal(plain[k], zero[k]) for k in plain)

    batch = {"input_ids": ids(tokens=17)}
    results = []
    for kwargs in ({}, {"mtp_depth": 0}):
        torch.manual_seed(0)
        module = MoELanguageModel(VOCAB, 16, d_model=16, n_layers=2, n_heads=2, d_ff=32,
                                  moe=MoEConfig(num_experts=4, expert_d_ff=16), **kwargs)
        assert "model.mtp" not in str(list(module.state_dict()))
        results.append(module._losses(batch))
        # What _losses computed before MTP: the cross-entropy of the main forward and its aux losses.
        logits_BSV = module.model(batch["input_ids"][:, :-1])
        lm_loss = F.cross_entropy(logits_BSV.flatten(0, 1), batch["input_ids"][:, 1:].flatten())
        assert torch.equal(results[-1][0], lm_loss)
        assert results[-1][1].keys() == module.model.aux_losses().keys() == {"aux_loss", "z_loss"}
        for name, value in module.model.aux_losses().items():
            assert torch.equal(results[-1][1][name], value)
        assert results[-1][2] == []
    (lm0, aux0, _), (lm1, aux1, _) = results
    assert torch.equal(lm0, lm1) and all(torch.equal(aux0[k], aux1[k]) for k in aux0)


@pytest.mark.parametrize("attention", ["mha", "mla"])
def test_mtp_leaves_the_main_models_initial_weights_and_logits(attention: str) -> None:
    without, with_mtp = tiny(attention=attention).eval(), tiny(attention=attention, mtp_depth=1).eval()
    main = without.state_dict()
    extra = with_mtp.state_dict()
    assert set(extra) - set(main) == {k for k in extra if k.startswith("mtp.")} != set()
    assert all(torch.equal(extra[k], main[k]) for k in main)
    with torch.no_grad():
        torch.testing.assert_close(with_mtp(ids()), without(ids()), rtol=0, atol=0)
        logits, _ = with_mtp.forward_with_mtp(ids())
        torch.testing.assert_close(logits, without(ids()[:, :-1]), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# The inference model leaves MTP out


def test_forward_does_not_run_mtp_and_its_aux_losses_are_the_main_models() -> None:
    model = tiny(mtp_depth=2)
    calls = []
    for module in model.mtp:
        module.register_forward_hook(lambda *args: calls.append(1))
    main_layers = [block.ffn for block in model.blocks]
    mtp_layers = [module.block.ffn for module in model.mtp]
    assert model.moe_layers() == main_layers + mtp_layers

    model.forward_with_mtp(ids())
    assert len(calls) == 2
    aux = model.aux_losses()
    every = sum(layer.aux_losses["aux_loss"] for layer in main_layers + mtp_layers)
    torch.testing.assert_close(aux["aux_loss"], every)
    assert all(layer.aux_losses and layer.stats is not None for layer in mtp_layers)

    model(ids()[:, :-1])
    assert len(calls) == 2  # forward ran no MTP module
    assert all(layer.aux_losses == {} and layer.stats is None for layer in mtp_layers)  # their record cleared
    for name in ("aux_loss", "z_loss"):
        torch.testing.assert_close(model.aux_losses()[name], sum(layer.aux_losses[name] for layer in main_layers))

    model.generate(ids(batch=1, tokens=4), max_new_tokens=2)
    assert len(calls) == 2


def test_parameter_counts_keep_mtp_apart_and_drop_mtp_removes_it() -> None:
    without, model = tiny(), tiny(mtp_depth=2)
    counts = model.parameter_counts()
    assert counts["mtp"] == sum(p.numel() for p in model.mtp.parameters()) > 0
    assert without.parameter_counts() == {**counts, "mtp": 0}
    assert {k: counts[k] for k in ("total", "active", "expert")} == {
        k: without.parameter_counts()[k] for k in ("total", "active", "expert")}
    assert counts["total"] + counts["mtp"] == sum(p.numel() for p in model.parameters())
    assert model.flops_per_token() == without.flops_per_token()
    assert [c.name for c in model.scheduled_coefficients()] == ["mtp_loss"]

    model.eval()
    with torch.no_grad():
        before = model(ids())
        model.drop_mtp()
        assert not any(k.startswith("mtp.") for k in model.state_dict())
        assert model.mtp_depth == 0 and model.parameter_counts()["mtp"] == 0
        assert model.parameter_counts() == without.parameter_counts()
        assert model.scheduled_coefficients() == []
        assert len(model.moe_layers()) == 2
        torch.testing.assert_close(model(ids()), before, rtol=0, atol=0)
        _, mtp_logits = model.forward_with_mtp(ids())
        assert mtp_logits == []
    model.drop_mtp()  # again: nothing left to drop


# ---------------------------------------------------------------------------------------------
# Training under a real Trainer: the loss, the scheduled weight, the logs


class LossCheck(L.Callback):
    """Before each step, the expected training loss ``lm + sum(aux) + coeff * mean(CE_k)`` from the same
    weights and batch (the step's own forward then overwrites the routing records); after it, the loss
    the step returned."""

    def __init__(self) -> None:
        self.expected: list[float] = []
        self.mtp_means: list[float] = []
        self.coeffs: list[float] = []
        self.losses: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        model = pl_module.model
        ids_BN = batch["input_ids"]
        with torch.no_grad():
            logits, mtp_logits = model.forward_with_mtp(ids_BN)
            lm = F.cross_entropy(logits.flatten(0, 1), ids_BN[:, 1:].flatten())
            aux = sum(model.aux_losses().values())
            mean = torch.stack(mtp_cross_entropies(mtp_logits, ids_BN)).mean()
        coeff = pl_module.model.mtp_weight.coeff
        self.coeffs.append(coeff)
        self.mtp_means.append(mean.item())
        self.expected.append((lm + aux + coeff * mean).item())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.losses.append(float(outputs["loss"]))


@pytest.mark.usefixtures("one_thread")
def test_training_loss_adds_the_scheduled_mtp_loss_and_logs_it(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lightning_moe.data import TextDataModule

    L.seed_everything(0)
    module = MoELanguageModel(
        max_seq_len=16, d_model=32, n_layers=2, n_heads=2, d_ff=64, attention="mla",
        mla=MLAConfig(q_lora_rank=16, kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8),
        mtp_depth=1, mtp_weight=0.5, moe=MoEConfig(num_experts=4, expert_d_ff=32),
        optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3),
    )
    assert module.hparams["mtp_depth"] == 1 and module.hparams["mla"]["kv_lora_rank"] == 8
    scheduler = ZLossScheduler(schedule=Schedule("linear", value=0.3, start_value=0.0, warmup_steps=4),
                               balancer="mtp_loss")
    check = LossCheck()
    logger = TensorBoardLogger(tmp_path, name="mtp")
    trainer = L.Trainer(max_steps=6, limit_val_batches=0, logger=logger, log_every_n_steps=1, accelerator="cpu",
                        devices=1, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, callbacks=[scheduler, check])
    data = TextDataModule(seq_len=16, batch_size=4)
    trainer.fit(module, data)

    assert check.coeffs == pytest.approx([min(s, 4) / 4 * 0.3 for s in range(6)])
    assert module.model.mtp_weight.coeff == pytest.approx(0.3)
    assert check.losses == pytest.approx(check.expected, rel=1e-5, abs=1e-6)
    assert check.coeffs[0] == 0.0 and all(m > 1 for m in check.mtp_means)  # weight 0: the MTP loss adds nothing

    acc = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train/mtp_loss", "train/mtp_loss_1", "train/loss", "model/params_mtp", "schedule/mtp_loss_coeff",
            "model/kv_cache_per_token"} <= set(tags)
    assert [e.value for e in acc.Scalars("train/mtp_loss")] == pytest.approx(check.mtp_means, rel=1e-5)
    assert [e.value for e in acc.Scalars("train/mtp_loss_1")] == pytest.approx(check.mtp_means, rel=1e-5)
    assert [e.value for e in acc.Scalars("schedule/mtp_loss_coeff")] == pytest.approx(check.coeffs)
    assert acc.Scalars("model/params_mtp")[0].value == module.model.parameter_counts()["mtp"]
    assert acc.Scalars("model/kv_cache_per_token")[0].value == 2 * (8 + 4)

    validator = L.Trainer(limit_val_batches=2, logger=False, accelerator="cpu", devices=1, enable_progress_bar=False,
                          enable_model_summary=False)
    metrics = validator.validate(module, data, verbose=False)[0]
    assert {"val/loss", "val/mtp_loss", "val/mtp_loss_1"} <= set(metrics)
    assert metrics["val/mtp_loss"] == pytest.approx(metrics["val/mtp_loss_1"])


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_training_step_weighs_the_mean_mtp_loss_by_mtp_weight() -> None:
    torch.manual_seed(0)
    module = MoELanguageModel(VOCAB, 16, d_model=16, n_layers=2, n_heads=2, d_ff=32, mtp_depth=2, mtp_weight=0.7,
                              moe=MoEConfig(num_experts=4, expert_d_ff=16))
    assert module.model.mtp_weight.coeff == 0.7 and module.model.mtp_weight.name == "mtp_loss"
    batch = {"input_ids": ids(tokens=17)}
    loss = module.training_step(batch, 0)
    lm, aux, mtp_losses = module._losses(batch)
    assert len(mtp_losses) == 2
    expected = lm + sum(aux.values()) + 0.7 * (mtp_losses[0] + mtp_losses[1]) / 2
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    assert loss.requires_grad


def test_scheduler_names_mtp_loss_only_where_the_model_has_mtp() -> None:
    module = MoELanguageModel(max_seq_len=16, d_model=16, n_layers=1, n_heads=2, d_ff=32,
                              moe=MoEConfig(num_experts=4, expert_d_ff=8))
    trainer = L.Trainer(max_steps=1, logger=False, accelerator="cpu", devices=1, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False,
                        callbacks=[ZLossScheduler(0.1, balancer="mtp_loss")])
    loader = torch.utils.data.DataLoader([{"input_ids": torch.zeros(17, dtype=torch.long)}] * 2, batch_size=2)
    with pytest.raises(ValueError, match=r"balancer='mtp_loss'.*nor such a loss weight.*\['aux_loss', 'z_loss'\]"):
        trainer.fit(module, loader)


def test_upcycling_a_dense_mtp_model_keeps_its_main_and_mtp_logits() -> None:
    # The MTP block's FFN is upcycled like the main blocks' (copy, renormalised top-k gates: the same function).
    from functools import partial

    from lightning_moe.routing import TopKRouter
    from lightning_moe.upcycling import upcycle_state_dict

    dense = tiny(moe_every=0, mtp_depth=1).eval()
    with torch.no_grad():
        dense.embed.weight.normal_(std=0.5)
    moe = tiny(seed=1, mtp_depth=1, moe=MoEConfig(num_experts=4, expert_d_ff=32,
                                                   router=partial(TopKRouter, top_k=2, renormalize=True)))
    assert isinstance(moe.mtp[0].block.ffn, MoELayer)
    upcycle_state_dict(moe, dense.state_dict())
    with torch.no_grad():
        logits, mtp_logits = moe.eval().forward_with_mtp(ids())
        ref_logits, ref_mtp_logits = dense.forward_with_mtp(ids())
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mtp_logits[0], ref_mtp_logits[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("kwargs", "match"), [({"mtp_weight": -1.0}, "`mtp_weight`"),
                                               ({"mtp_depth": -1}, "`mtp_depth`")])
def test_mtp_arguments_are_checked_by_name(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MoETransformer(16, d_model=16, n_layers=1, n_heads=2, d_ff=16, **kwargs)


@pytest.mark.parametrize(("kwargs", "moe"), [({"moe_every": 2}, True), ({"moe_every": 3}, False),
                                             ({"first_dense_layers": 4}, False), ({}, True)])
def test_the_mtp_block_is_of_the_last_layers_kind(kwargs: dict, moe: bool) -> None:
    model = MoETransformer(16, d_model=16, n_layers=4, n_heads=2, d_ff=16, mtp_depth=1,
                           moe=MoEConfig(num_experts=2, expert_d_ff=8), **kwargs)
    assert isinstance(model.blocks[-1].ffn, MoELayer) == moe
    assert isinstance(model.mtp[0].block.ffn, MoELayer) == moe


def test_scheduler_finds_the_mtp_weight_of_a_dense_model() -> None:
    module = MoELanguageModel(vocab_size=16, max_seq_len=8, d_model=16, n_layers=1, n_heads=2, d_ff=16, moe_every=0,
                              mtp_depth=1)
    scheduler = ZLossScheduler(schedule=0.1, balancer="mtp_loss")
    scheduler.setup(None, module, "fit")  # the trainer is not read in setup
    scheduler._apply(0.1)
    assert module.model.mtp_weight.coeff == 0.1
    with pytest.raises(ValueError, match="found no MoE layer"):
        ZLossScheduler(balancer="z_loss").setup(None, module, "fit")
