"""RoutingDriftMonitor on the tiny model and on a tiny Qwen2-MoE under a real Trainer (CPU).

Zero drift when nothing trains, drift that rises when routers train on shifted data, thresholds
that fire once per layer, raise and freeze, checkpoint round trips, TensorBoard output, the probe.
"""

import warnings
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, Dataset

from lightning_moe.callbacks.heatmap import heatmap_size_px
from lightning_moe.callbacks.routing_drift import (
    DRIFT_METRICS,
    RoutingDriftError,
    RoutingDriftMonitor,
    RoutingDriftWarning,
    drift_heatmap,
)
from lightning_moe.data import TextDataModule
from lightning_moe.discovery import find_moe_layers
from lightning_moe.layers import MoEConfig, MoELayer
from lightning_moe.module import MoELanguageModel
from lightning_moe.routing import ExpertChoiceRouter, LinearScorer, TopKRouter

SEQ_LEN, BATCH, EXPERTS, TOP_K = 16, 4, 4, 2
LINEAR = partial(LinearScorer, center_input=False)
PROBE_BS = torch.randint(97, 123, (4, SEQ_LEN), generator=torch.Generator().manual_seed(5))  # lower-case letters


class RandomIds(Dataset):
    """Sequences of ``SEQ_LEN + 1`` random ids in ``[low, high)`` (``{"input_ids": ...}`` items)."""

    def __init__(self, n: int = 64, low: int = 0, high: int = 256, seed: int = 1) -> None:
        self.ids = torch.randint(low, high, (n, SEQ_LEN + 1), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i]}


def tiny(router=None, lr: float = 3e-3, weight_decay: float = 0.0) -> MoELanguageModel:  # noqa: ANN001
    """Routers without input centring unless ``router`` says otherwise: a centring scorer's running mean (which
    the probe's eval-mode forward reads) moves at every training batch even when no parameter does."""
    torch.manual_seed(0)
    return MoELanguageModel(
        max_seq_len=SEQ_LEN, d_model=32, n_layers=2, n_heads=2, d_ff=64,
        optimizer=partial(torch.optim.AdamW, lr=lr, weight_decay=weight_decay),
        moe=MoEConfig(num_experts=EXPERTS, expert_d_ff=32,
                      router=router or partial(TopKRouter, top_k=TOP_K, scorer=LINEAR)),
    )


def fit(model: L.LightningModule, callbacks: list, max_steps: int, data: object = None, logger=False,  # noqa: ANN001
        ckpt_path: str | None = None, **trainer_kwargs) -> L.Trainer:  # noqa: ANN003
    L.seed_everything(0)
    trainer_kwargs.setdefault("limit_val_batches", 0)
    trainer_kwargs.setdefault("enable_checkpointing", False)
    trainer = L.Trainer(max_steps=max_steps, logger=logger, log_every_n_steps=1, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=callbacks, accelerator="cpu", devices=1,
                        **trainer_kwargs)
    if data is None:
        data = DataLoader(RandomIds(), batch_size=BATCH)
    if isinstance(data, L.LightningDataModule):
        trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    else:
        trainer.fit(model, data, ckpt_path=ckpt_path)
    return trainer


def drift_warnings(records: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in records if issubclass(w.category, RoutingDriftWarning)]


def router_params(model: L.LightningModule) -> list[torch.Tensor]:
    return [p for view in find_moe_layers(model) for p in view.router_parameters()]


# ---------------------------------------------------------------- the expert sets in RoutingStats


def test_routing_stats_give_each_tokens_expert_set() -> None:
    torch.manual_seed(0)
    x_TD = torch.randn(24, 16)
    for router, per_token in ((TopKRouter(16, EXPERTS, top_k=TOP_K), TOP_K), (ExpertChoiceRouter(16, EXPERTS), None)):
        layer = MoELayer(16, 8, EXPERTS, router=router)
        layer(x_TD)
        stats = layer.stats
        mask_TE = stats.expert_mask_TE()
        assert mask_TE.shape == (24, EXPERTS) and mask_TE.dtype == torch.bool
        assert torch.equal(mask_TE.sum(dim=0), stats.tokens_per_expert_E)  # every kept assignment, once
        assert all(bool(mask_TE[t, e]) for t, e in zip(stats.token_A.tolist(), stats.expert_A.tolist(), strict=True))
        if per_token is not None:
            assert bool((mask_TE.sum(dim=1) == per_token).all())


def test_stats_without_assignments_have_no_expert_set() -> None:
    from lightning_moe.layers import RoutingStats

    stats = RoutingStats(torch.tensor([3, 1]), torch.zeros(2), torch.tensor(0.5), torch.tensor(0), 2)
    assert stats.token_A is None and stats.expert_mask_TE() is None


# ---------------------------------------------------------------- drift


@pytest.mark.parametrize("router", [partial(TopKRouter, top_k=TOP_K, scorer=LINEAR),
                                    partial(ExpertChoiceRouter, scorer=LINEAR)], ids=["topk", "expert_choice"])
def test_drift_is_exactly_zero_when_nothing_trains(router, one_thread: None) -> None:  # noqa: ANN001
    monitor = RoutingDriftMonitor(every_n_steps=1, probe_ids=PROBE_BS, changed_share_threshold=0.0,
                                  load_kl_threshold=0.0, entropy_change_threshold=0.0)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        fit(tiny(router, lr=0.0), [monitor], max_steps=4)
    assert monitor.measurement_steps == [1, 2, 3]
    history = monitor.drift_history
    assert history.shape == (3, 2, len(DRIFT_METRICS))
    assert torch.equal(history, torch.zeros_like(history))  # exactly: thresholds of 0 are not crossed
    assert drift_warnings(records) == [] and monitor.warned_at == {}


def test_a_centring_router_drifts_with_its_running_mean(one_thread: None) -> None:
    # No parameter moves (lr 0), but the eval-mode probe reads the running mean the training batches update.
    model = tiny(partial(TopKRouter, top_k=TOP_K), lr=0.0)
    weights = [p.detach().clone() for p in model.parameters()]
    monitor = RoutingDriftMonitor(every_n_steps=1, probe_ids=PROBE_BS, changed_share_threshold=None,
                                  load_kl_threshold=None, entropy_change_threshold=None)
    fit(model, [monitor], max_steps=3)
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))
    assert float(monitor.drift_history[:, :, 0].min()) > 0


def test_drift_rises_when_routers_train_on_shifted_data(one_thread: None) -> None:
    model = tiny(lr=3e-3)
    model.requires_grad_(False)
    for param in router_params(model):
        param.requires_grad_(True)
    others = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    monitor = RoutingDriftMonitor(every_n_steps=2, probe_ids=PROBE_BS, changed_share_threshold=None,
                                  load_kl_threshold=None, entropy_change_threshold=None)  # the probe: letters
    digits = DataLoader(RandomIds(low=48, high=58), batch_size=BATCH)  # the routers train on digits
    fit(model, [monitor], max_steps=17, data=digits)
    assert monitor.measurement_steps == [2, 4, 6, 8, 10, 12, 14, 16]
    changed_ML, kl_ML = monitor.drift_history[:, :, 0], monitor.drift_history[:, :, 1]
    # The levels depend on the initial weights: 0.36 and 0.16 of the probe's tokens changed (from 0.05), the
    # load's KL 5.0 and 4.6 times its first value, with the per-expert initialisation of issue 18.
    assert bool((changed_ML[-1] > 1.5 * changed_ML[0]).all()) and float(changed_ML[-1].max()) > 0.3
    assert bool((kl_ML[-1] > 3 * kl_ML[0]).all())  # the load moves away too
    assert all(torch.equal(p, others[name]) for name, p in model.named_parameters() if name in others)


@pytest.mark.parametrize("thresholds, reason", [
    ({"changed_share_threshold": 0.0, "load_kl_threshold": None, "entropy_change_threshold": None}, "changed_share"),
    ({"changed_share_threshold": None, "load_kl_threshold": 0.0, "entropy_change_threshold": None}, "load_kl"),
    ({"changed_share_threshold": None, "load_kl_threshold": None, "entropy_change_threshold": 0.0}, "|entropy_change|"),
])
def test_thresholds_fire_once_per_layer(thresholds: dict, reason: str, one_thread: None) -> None:
    monitor = RoutingDriftMonitor(every_n_steps=1, probe_ids=PROBE_BS, **thresholds)
    with pytest.warns(RoutingDriftWarning) as records:
        trainer = fit(tiny(lr=1e-2), [monitor], max_steps=5)
    messages = drift_warnings(records)
    assert len(messages) == 2, messages  # once per layer over 4 measurements
    assert "MoE layer 0 (model.blocks.0.ffn) at global step 1" in messages[0]
    assert "MoE layer 1 (model.blocks.1.ffn) at global step 1" in messages[1]
    assert all(f"{reason} " in m for m in messages)
    assert monitor.warned_at == {0: 1, 1: 1} and monitor.frozen_layers == set()
    assert float(trainer.callback_metrics["drift/drifted_layers"]) == 2.0


def test_quiet_below_the_thresholds(one_thread: None) -> None:
    monitor = RoutingDriftMonitor(every_n_steps=1, probe_ids=PROBE_BS, changed_share_threshold=0.99,
                                  load_kl_threshold=None, entropy_change_threshold=None)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        fit(tiny(lr=1e-3), [monitor], max_steps=3)
    assert drift_warnings(records) == [] and monitor.drifted_layers == []
    assert float(monitor.drift_history[-1, :, 0].max()) > 0  # it measured some drift all the same


def test_raise_stops_training(one_thread: None) -> None:
    monitor = RoutingDriftMonitor(every_n_steps=2, probe_ids=PROBE_BS, changed_share_threshold=0.0, action="raise")
    model = tiny(lr=1e-2)
    with pytest.raises(RoutingDriftError, match=r"MoE layer 0 .*at global step 2.* MoE layer 1 "):
        fit(model, [monitor], max_steps=6)
    assert model.trainer.global_step == 2 and monitor.warned_at == {0: 2, 1: 2}


class Snapshot(L.Callback):
    """Router and expert weights when the monitor first freezes (put it after the monitor)."""

    def __init__(self, monitor: RoutingDriftMonitor) -> None:
        self.monitor = monitor
        self.routers: list[torch.Tensor] | None = None
        self.experts: torch.Tensor | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        if self.routers is None and self.monitor.frozen_layers:
            self.routers = [p.detach().clone() for p in router_params(pl_module)]
            self.experts = find_moe_layers(pl_module)[0].expert_tensors()[0].detach().clone()


def test_freeze_stops_the_routers_while_the_rest_trains(one_thread: None) -> None:
    # Weight decay would still move a parameter whose gradient is zero rather than None.
    model = tiny(lr=1e-2, weight_decay=0.1)
    monitor = RoutingDriftMonitor(every_n_steps=2, probe_ids=PROBE_BS, changed_share_threshold=0.0, action="freeze")
    snapshot = Snapshot(monitor)
    with pytest.warns(RoutingDriftWarning, match=r"Froze its router \(1 parameter tensor\)"):
        trainer = fit(model, [monitor, snapshot], max_steps=6)
    assert monitor.frozen_layers == {0, 1} and monitor.measurement_steps == [2, 4]
    params = router_params(model)
    assert params and all(torch.equal(p, before) for p, before in zip(params, snapshot.routers, strict=True))
    assert not torch.equal(find_moe_layers(model)[0].expert_tensors()[0], snapshot.experts)
    assert float(trainer.callback_metrics["drift/frozen_layers"]) == 2.0


# ---------------------------------------------------------------- checkpoints


@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended")
def test_state_survives_a_checkpoint_round_trip(tmp_path: Path, one_thread: None) -> None:
    def monitor() -> RoutingDriftMonitor:
        return RoutingDriftMonitor(every_n_steps=2, probe_size=2, changed_share_threshold=0.0, action="freeze")

    def data() -> TextDataModule:
        return TextDataModule(corpus="pydoc", seq_len=SEQ_LEN, batch_size=BATCH)

    full, full_monitor = tiny(lr=1e-2), monitor()
    checkpoints = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=1, save_top_k=-1)
    with pytest.warns(RoutingDriftWarning):
        fit(full, [full_monitor, checkpoints], max_steps=6, data=data(), enable_checkpointing=True)
    resumed, resumed_monitor = tiny(lr=1e-2), monitor()
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        fit(resumed, [resumed_monitor], max_steps=6, data=data(), ckpt_path=str(tmp_path / "step=3.ckpt"))
    assert drift_warnings(records) == []  # the layers were reported before the checkpoint
    # The original probe and reference, not ones re-recorded when the resumed run started.
    saved, loaded = full_monitor.state_dict(), resumed_monitor.state_dict()
    assert saved["probe_ids"].shape == (2, SEQ_LEN) and torch.equal(saved["probe_ids"], loaded["probe_ids"])
    for a, b in zip(saved["reference"], loaded["reference"], strict=True):
        assert all(torch.equal(a[key], b[key]) for key in a)
    assert resumed_monitor.reference_step == 0 and resumed_monitor.measurement_steps == [2, 4]
    torch.testing.assert_close(resumed_monitor.drift_history, full_monitor.drift_history)
    # Frozen again after the resume: the routers are the checkpoint's, and the full run's.
    assert resumed_monitor.frozen_layers == {0, 1} and resumed_monitor.warned_at == {0: 2, 1: 2}
    state = torch.load(tmp_path / "step=3.ckpt", weights_only=False)["state_dict"]
    names = [f"model.blocks.{i}.ffn.router.scorer.weight_ED" for i in range(2)]
    for name, param, other in zip(names, router_params(resumed), router_params(full), strict=True):
        assert torch.equal(param, state[name]) and torch.equal(param, other)


def test_state_dict_round_trip(one_thread: None) -> None:
    monitor = RoutingDriftMonitor(every_n_steps=1, probe_ids=PROBE_BS, changed_share_threshold=0.0)
    with pytest.warns(RoutingDriftWarning):
        fit(tiny(), [monitor], max_steps=3)
    copy = RoutingDriftMonitor()
    copy.load_state_dict(monitor.state_dict())
    a, b = monitor.state_dict(), copy.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        if key == "reference":
            assert all(torch.equal(x[k], y[k]) for x, y in zip(a[key], b[key], strict=True) for k in x)
        elif isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key])
        else:
            assert a[key] == b[key], key
    assert copy.latest() == [] or copy.latest()[0].changed_share == monitor.latest()[0].changed_share


# ---------------------------------------------------------------- probe, logging, measure()


def test_probe_from_the_datamodule_validation_data(one_thread: None) -> None:
    data = TextDataModule(corpus="pydoc", seq_len=SEQ_LEN, batch_size=BATCH)
    monitor = RoutingDriftMonitor(every_n_steps=1, probe_size=3)
    fit(tiny(), [monitor], max_steps=2, data=data)
    first = next(iter(data.val_dataloader()))["input_ids"]
    assert torch.equal(monitor.probe_ids, first[:3, :-1])  # the model's inputs: the last position dropped


def test_probe_from_the_validation_loaders_given_to_fit(one_thread: None) -> None:
    monitor = RoutingDriftMonitor(every_n_steps=1)
    model = tiny()
    L.seed_everything(0)
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[monitor], accelerator="cpu", limit_val_batches=1,
                        num_sanity_val_steps=0)
    val = RandomIds(n=8, seed=7)
    trainer.fit(model, DataLoader(RandomIds(), batch_size=BATCH), DataLoader(val, batch_size=BATCH))
    assert torch.equal(monitor.probe_ids, val.ids[:BATCH, :-1])


def test_no_validation_data_and_no_probe_is_a_clear_error(one_thread: None) -> None:
    with pytest.raises(ValueError, match="needs a probe batch: pass `probe_ids`"):
        fit(tiny(), [RoutingDriftMonitor()], max_steps=1)


def test_measure_after_fit_and_before(one_thread: None) -> None:
    monitor = RoutingDriftMonitor(every_n_steps=2, probe_ids=PROBE_BS.tolist())  # a nested list works too
    with pytest.raises(RuntimeError, match="needs the reference"):
        monitor.measure(tiny())
    model = tiny(lr=0.0)
    fit(model, [monitor], max_steps=3)
    layers = monitor.measure(model)
    assert [layer.index for layer in layers] == [0, 1]
    assert all(layer.changed_share == layer.load_kl == layer.entropy_change == 0.0 for layer in layers)
    assert model.training  # the modes are restored


def test_tensorboard_scalars_and_heatmap(tmp_path: Path, one_thread: None) -> None:
    logger = TensorBoardLogger(tmp_path, name="drift")
    monitor = RoutingDriftMonitor(every_n_steps=2, probe_ids=PROBE_BS, changed_share_threshold=None,
                                  load_kl_threshold=None, entropy_change_threshold=None)
    fit(tiny(lr=1e-2), [monitor], max_steps=6, logger=logger)
    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "images": 0}).Reload()
    scalars = set(events.Tags()["scalars"])
    for i in range(2):
        assert {f"drift/layer{i}/{name}" for name in DRIFT_METRICS} <= scalars
    assert {"drift/max_changed_share", "drift/mean_load_kl", "drift/max_abs_entropy_change",
            "drift/drifted_layers", "drift/frozen_layers"} <= scalars
    # Every batch from the first measurement logs the last measurement.
    series = {s.step: s.value for s in events.Scalars("drift/layer1/changed_share")}
    history = monitor.drift_history
    assert sorted(series) == [2, 3, 4, 5]
    assert series[3] == pytest.approx(float(history[0, 1, 0])) and series[5] == pytest.approx(float(history[1, 1, 0]))
    images = events.Images("drift/changed_share_heatmap")
    assert [image.step for image in images] == [2, 4] and monitor.images_logged == 2


def test_drift_heatmap_rows_are_layers_and_columns_measurements() -> None:
    changed_LM = np.array([[0.0, 0.5, 1.0], [np.nan, 0.2, 0.9]])
    image_HW3 = drift_heatmap(changed_LM, [10, 20, 30])
    assert image_HW3.dtype == np.uint8 and image_HW3.shape == (*heatmap_size_px(2, 3), 3)
    with pytest.raises(ValueError, match="one step per column"):
        drift_heatmap(changed_LM, [10, 20])


@pytest.mark.parametrize("kwargs, match", [
    ({"every_n_steps": 0}, "`every_n_steps` must be an integer >= 1"),
    ({"probe_size": 0}, "`probe_size` must be an integer >= 1"),
    ({"probe_ids": torch.zeros(4)}, r"`probe_ids` must be a non-empty \(B, S\)"),
    ({"probe_ids": torch.zeros(2, 3)}, r"`probe_ids` must be .* token ids"),
    ({"probe_ids": [[1, -2]]}, "token ids >= 0"),
    ({"changed_share_threshold": 1.0}, r"`changed_share_threshold` must be a number in \[0, 1\) or None"),
    ({"load_kl_threshold": -0.1}, "`load_kl_threshold` must be a finite number >= 0 or None"),
    ({"entropy_change_threshold": float("inf")}, "`entropy_change_threshold` must be a finite number >= 0"),
    ({"action": "revive"}, r"`action` must be one of \('warn', 'raise', 'freeze'\)"),
    ({"prefix": "/drift"}, "`prefix` must be a non-empty string"),
    ({"per_layer": 1}, "`per_layer` must be a bool"),
    ({"image_every_n_measurements": -1}, "`image_every_n_measurements` must be an integer >= 0"),
    ({"forward_fn": "forward"}, "`forward_fn` must be a callable"),
])
def test_bad_arguments_name_the_parameter(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RoutingDriftMonitor(**kwargs)


# ---------------------------------------------------------------- Hugging Face Qwen2-MoE


QWEN2_MOE = dict(
    model_type="qwen2_moe", vocab_size=256, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
    shared_expert_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    num_experts=EXPERTS, num_experts_per_tok=TOP_K, norm_topk_prob=False, max_position_embeddings=SEQ_LEN,
)


def qwen2_moe(swapped: bool, lr: float = 3e-2):  # noqa: ANN201
    pytest.importorskip("transformers", reason="install the `hf` extra: pip install -e '.[hf]'")
    from lightning_moe.hf_module import HFMoEFineTune

    torch.manual_seed(0)
    moe = None
    if swapped:  # started from the gates: the same routing
        router = partial(TopKRouter, top_k=TOP_K, renormalize=False, scorer=partial(LinearScorer, center_input=False))
        moe = MoEConfig(router=router, balancers=[])
    return HFMoEFineTune(config=QWEN2_MOE, moe=moe, init_from_gate=swapped, train="routers",
                         optimizer=partial(torch.optim.AdamW, lr=lr, weight_decay=0.1))


@pytest.mark.parametrize("swapped", [False, True], ids=["native_gates", "swapped_routers"])
def test_qwen2_moe_drift_and_freeze(swapped: bool, one_thread: None) -> None:
    module = qwen2_moe(swapped)
    views = find_moe_layers(module)
    assert len(views) == 2 and all((type(v).__name__ == "SwappedRouterView") == swapped for v in views)
    monitor = RoutingDriftMonitor(every_n_steps=2, probe_ids=PROBE_BS, changed_share_threshold=0.0,
                                  load_kl_threshold=None, entropy_change_threshold=None, action="freeze")
    snapshot = Snapshot(monitor)
    digits = DataLoader(RandomIds(low=48, high=58), batch_size=BATCH)
    with pytest.warns(RoutingDriftWarning, match="Froze its router"):
        fit(module, [monitor, snapshot], max_steps=6, data=digits)
    reference = monitor.state_dict()["reference"]
    assert all(bool((ref["mask_TE"].sum(dim=1) == TOP_K).all()) for ref in reference)  # K experts per token
    assert monitor.frozen_layers == {0, 1} and float(monitor.drift_history[0, :, 0].min()) > 0
    # The routers were all that trained: frozen, nothing moves (and the loss still back-propagates).
    params = router_params(module)
    assert params and all(torch.equal(p, before) for p, before in zip(params, snapshot.routers, strict=True))


def test_swapped_routers_start_from_the_native_reference(one_thread: None) -> None:
    references = []
    for swapped in (False, True):
        monitor = RoutingDriftMonitor(every_n_steps=1, probe_ids=PROBE_BS)
        fit(qwen2_moe(swapped, lr=0.0), [monitor], max_steps=2)
        references.append(monitor.state_dict()["reference"])
        assert torch.equal(monitor.drift_history, torch.zeros_like(monitor.drift_history))
    for native, swapped in zip(*references, strict=True):
        assert torch.equal(native["mask_TE"], swapped["mask_TE"])
        assert torch.equal(native["counts_E"], swapped["counts_E"])
        torch.testing.assert_close(native["entropy"], swapped["entropy"])
