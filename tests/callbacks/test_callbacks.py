"""BiasOffsetUpdater, DeadExpertDetector, ZLossScheduler and Schedule on the tiny model under a real Trainer."""

import json
import math
import re
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_moe.balancing import SwitchAuxLoss, ZLoss, bias_update
from lightning_moe.callbacks import BiasOffsetUpdater, DeadExpertDetector, DeadExpertError, Schedule, ZLossScheduler
from lightning_moe.data import TextDataModule
from lightning_moe.layers import MoEConfig
from lightning_moe.module import MoELanguageModel
from lightning_moe.routing import LinearScorer, TopKRouter


def tiny(expert_bias: bool = True, balancers: list | None = None) -> MoELanguageModel:
    torch.manual_seed(0)
    # Uncentred scorers: the bias tests need loads that start unbalanced.
    return MoELanguageModel(
        max_seq_len=32, d_model=32, n_layers=2, n_heads=2, d_ff=64,
        optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3),
        moe=MoEConfig(
            num_experts=4, expert_d_ff=32,
            router=partial(
                TopKRouter, top_k=2, expert_bias=expert_bias, scorer=partial(LinearScorer, center_input=False),
            ),
            balancers=balancers if balancers is not None else [SwitchAuxLoss(0.01), ZLoss(0.001)],
        ),
    )


def fit(model: MoELanguageModel, callbacks: list, max_steps: int, tmp_path: Path | None = None,
        ckpt_path: str | None = None, **trainer_kwargs) -> L.Trainer:  # noqa: ANN003
    L.seed_everything(0)
    if tmp_path is not None:
        callbacks = [*callbacks, ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=1,
                                                 save_top_k=-1)]
    trainer = L.Trainer(
        max_steps=max_steps, limit_val_batches=0, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=tmp_path is not None, callbacks=callbacks,
        accelerator="cpu", devices=1, **trainer_kwargs,
    )
    trainer.fit(model, TextDataModule(seq_len=32, batch_size=4), ckpt_path=ckpt_path)
    return trainer


class LoadRecorder(L.Callback):
    def __init__(self) -> None:
        self.loads: list[list[torch.Tensor]] = []
        self.biases: list[list[torch.Tensor]] = []  # each router's expert bias after each batch (if it has one)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        layers = pl_module.model.moe_layers()
        self.loads.append([m.stats.tokens_per_expert_E.clone() for m in layers])
        self.biases.append([getattr(m.router, "expert_bias_E", torch.zeros(0)).clone() for m in layers])


# ---------------------------------------------------------------- Schedule


def test_schedule_kinds() -> None:
    assert Schedule("constant", value=0.3)(10_000) == 0.3
    warm = Schedule("linear", value=1.0, start_value=0.2, warmup_steps=4)
    assert [warm(s) for s in (0, 2, 4, 100)] == pytest.approx([0.2, 0.6, 1.0, 1.0])
    cos = Schedule("cosine", value=1.0, final_value=0.1, warmup_steps=2, total_steps=12)
    assert cos(1) == pytest.approx(0.5)
    assert cos(2) == pytest.approx(1.0)
    assert cos(7) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 2)))
    assert cos(12) == pytest.approx(0.1) and cos(50) == pytest.approx(0.1)
    step = Schedule("step", value=1.0, step_size=10, gamma=0.5)
    assert [step(s) for s in (0, 9, 10, 25)] == [1.0, 1.0, 0.5, 0.25]


@pytest.mark.parametrize("kwargs, match", [
    ({"kind": "exp"}, r"`kind` must be one of \('constant', 'linear', 'cosine', 'step'\)"),
    ({"value": -1.0}, "`value` must be a number >= 0"),
    ({"kind": "linear", "warmup_steps": 0}, "needs `warmup_steps` >= 1"),
    ({"kind": "cosine"}, "needs `total_steps`"),
    ({"kind": "cosine", "warmup_steps": 5, "total_steps": 5}, r"`total_steps` \(5\) must exceed `warmup_steps` \(5\)"),
    ({"warmup_steps": -2}, "`warmup_steps` must be an integer >= 0"),
    ({"gamma": 0.0}, "`gamma` must be a finite number > 0"),
])
def test_schedule_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Schedule(**kwargs)


# ---------------------------------------------------------------- ZLossScheduler


class CoeffRecorder(L.Callback):
    def __init__(self, balancer: ZLoss) -> None:
        self.balancer = balancer
        self.coeffs: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.coeffs[trainer.global_step - 1] = self.balancer.coeff


def test_zloss_scheduler_sets_the_coefficient_every_step_and_resumes(tmp_path: Path) -> None:
    z = ZLoss(0.5)
    model = tiny(balancers=[SwitchAuxLoss(0.01), z])
    sched = ZLossScheduler(Schedule("linear", value=1e-2, start_value=0.0, warmup_steps=4))
    rec = CoeffRecorder(z)
    fit(model, [sched, rec], max_steps=6, tmp_path=tmp_path)
    assert rec.coeffs == pytest.approx({s: min(s, 4) / 4 * 1e-2 for s in range(6)})
    assert all(m.balancers[1] is z for m in model.model.moe_layers())
    # Resume from step 3: the checkpoint restores the coefficient and the schedule continues.
    z2 = ZLoss(0.5)
    sched2 = ZLossScheduler(Schedule("linear", value=1e-2, start_value=0.0, warmup_steps=4))
    rec2 = CoeffRecorder(z2)
    fit(tiny(balancers=[SwitchAuxLoss(0.01), z2]), [sched2, rec2], max_steps=6,
        ckpt_path=str(tmp_path / "step=3.ckpt"))
    assert sched2.coeff == sched.coeff
    assert rec2.coeffs == pytest.approx({s: rec.coeffs[s] for s in range(3, 6)})


def test_zloss_scheduler_schedules_any_balancer_and_names_missing_ones() -> None:
    aux = SwitchAuxLoss(0.01)
    fit(tiny(balancers=[aux]), [ZLossScheduler(0.2, balancer="aux_loss")], max_steps=1)  # a float: constant
    assert aux.coeff == 0.2
    with pytest.raises(ValueError, match=r"balancer='z_loss'.*there are \['aux_loss'\]"):
        fit(tiny(balancers=[SwitchAuxLoss(0.01)]), [ZLossScheduler()], max_steps=1)
    with pytest.raises(ValueError, match="`balancer` must be a balancer name"):
        ZLossScheduler(balancer="")


def test_zloss_scheduler_default_and_bad_schedules() -> None:
    default = ZLossScheduler().schedule  # a linear warm-up from 0 to 1e-3 over 1000 steps
    assert [default(s) for s in (0, 500, 1000, 5000)] == pytest.approx([0.0, 5e-4, 1e-3, 1e-3])
    # The Schedule's arguments, once ZLossScheduler's own, are refused with the call that replaces them.
    with pytest.raises(TypeError, match=re.escape("pass `schedule=Schedule(kind='linear', warmup_steps=200)`")):
        ZLossScheduler(kind="linear", warmup_steps=200, balancer="aux_loss")
    with pytest.raises(TypeError, match=re.escape("unexpected keyword arguments ['balancr']")):
        ZLossScheduler(balancr="aux_loss")
    with pytest.raises(ValueError, match="`schedule` must be a float >= 0 or a Schedule, got 'linear'"):
        ZLossScheduler("linear")  # the former first positional argument, `kind`
    with pytest.raises(ValueError, match="`schedule` must be a number >= 0"):
        ZLossScheduler(-1.0)


def test_zloss_scheduler_in_yaml_takes_a_nested_schedule() -> None:
    from jsonargparse import ArgumentError, ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--callback", type=L.Callback)
    nested = {"class_path": "lightning_moe.callbacks.ZLossScheduler", "init_args": {
        "balancer": "aux_loss",
        "schedule": {"class_path": "lightning_moe.callbacks.Schedule",
                     "init_args": {"kind": "cosine", "value": 0.1, "total_steps": 10}}}}
    callback = parser.instantiate(parser.parse_args(["--callback", json.dumps(nested)])).callback
    assert callback.balancer == "aux_loss" and callback.schedule(10) == 0.0
    assert repr(callback.schedule) == "Schedule(kind='cosine', value=0.1, start_value=0.0, final_value=0.0, " \
                                      "warmup_steps=0, total_steps=10)"
    # The former flat arguments fail while parsing, naming the first one not accepted.
    flat = {"class_path": "lightning_moe.callbacks.ZLossScheduler", "init_args": {"kind": "linear"}}
    with pytest.raises(ArgumentError, match="'kind'"):
        parser.parse_args(["--callback", json.dumps(flat)])


# ---------------------------------------------------------------- BiasOffsetUpdater


def test_bias_updates_once_per_optimizer_step_from_every_micro_batch() -> None:
    model = tiny()
    updater = BiasOffsetUpdater(rate=0.05)
    rec = LoadRecorder()
    fit(model, [updater, rec], max_steps=2, accumulate_grad_batches=3)
    assert len(rec.loads) == 6 and updater.num_updates == 2
    for layer_idx, layer in enumerate(model.model.moe_layers()):
        expected = torch.zeros(4)
        for last, group in ((2, rec.loads[0:3]), (5, rec.loads[3:6])):
            expected = bias_update(expected, sum(batch[layer_idx] for batch in group), 0.05)
            torch.testing.assert_close(rec.biases[last][layer_idx], expected)  # updated at the optimizer step
        torch.testing.assert_close(layer.router.expert_bias_E, expected)
    # The first update moved the biases (the second may undo it: every +-rate step can flip the choice back).
    assert all(bias.abs().sum() > 0 for bias in rec.biases[2])
    assert all(bias.abs().sum() == 0 for bias in rec.biases[1])  # not before the step


def test_bias_rate_schedule_and_violation() -> None:
    model = tiny()
    updater = BiasOffsetUpdater(rate=Schedule("step", value=0.1, step_size=2, gamma=0.0 + 0.5))
    rec = LoadRecorder()
    fit(model, [updater, rec], max_steps=4)
    layer = model.model.moe_layers()[0]
    expected = torch.zeros(4)
    for step, batch in enumerate(rec.loads):
        expected = bias_update(expected, batch[0], 0.1 * 0.5 ** (step // 2))
    torch.testing.assert_close(layer.router.expert_bias_E, expected)
    last = rec.loads[-1]
    violation = sum(float(x.max() / x.double().mean() - 1) for x in last) / len(last)
    assert updater.last_max_violation == pytest.approx(violation)


def test_bias_updater_needs_a_bias_buffer() -> None:
    with pytest.raises(ValueError, match="none has a bias buffer.*expert_bias=True"):
        fit(tiny(expert_bias=False), [BiasOffsetUpdater()], max_steps=1)
    with pytest.raises(ValueError, match="`rate` must be a number >= 0"):
        BiasOffsetUpdater(rate=-0.1)


def test_a_second_bias_updater_is_refused() -> None:
    # Both would move the same biases; the class-name state key makes Lightning refuse the pair.
    with pytest.raises(RuntimeError, match="more than one stateful callback of type `BiasOffsetUpdater`"):
        L.Trainer(callbacks=[BiasOffsetUpdater(), BiasOffsetUpdater(rate=0.1)], logger=False, accelerator="cpu")


def test_bias_updater_resumes_exactly(tmp_path: Path) -> None:
    full = tiny()
    updater = BiasOffsetUpdater(rate=0.05)
    fit(full, [updater], max_steps=6, tmp_path=tmp_path, accumulate_grad_batches=2)
    resumed = tiny()
    updater2 = BiasOffsetUpdater(rate=0.05)
    fit(resumed, [updater2], max_steps=6, ckpt_path=str(tmp_path / "step=3.ckpt"), accumulate_grad_batches=2)
    assert updater2.num_updates == updater.num_updates == 6
    for a, b in zip(full.model.moe_layers(), resumed.model.moe_layers(), strict=True):
        torch.testing.assert_close(a.router.expert_bias_E, b.router.expert_bias_E)


# ---------------------------------------------------------------- DeadExpertDetector


def starve(model: MoELanguageModel, layer: int, expert: int) -> None:
    """Make ``expert`` of MoE layer ``layer`` unreachable through a large negative selection bias."""
    model.model.moe_layers()[layer].router.expert_bias_E[expert] = -10.0


def test_detector_warns_naming_layer_and_expert() -> None:
    model = tiny()
    starve(model, 1, 2)
    detector = DeadExpertDetector(window=2, action="warn")
    with pytest.warns(UserWarning, match=r"1 dead experts .* model\.blocks\.1\.ffn: experts \[2\]"):
        fit(model, [detector], max_steps=2)
    assert detector.dead_experts == {"model.blocks.1.ffn": [2]}
    assert detector.dead_per_layer == [0, 1]


def test_detector_raises() -> None:
    model = tiny()
    starve(model, 0, 3)
    with pytest.raises(DeadExpertError, match=r"model\.blocks\.0\.ffn: experts \[3\]"):
        fit(model, [DeadExpertDetector(window=3, action="raise")], max_steps=5)


def test_detector_revives_from_a_live_expert_and_resets_optimizer_rows() -> None:
    model = tiny()
    starve(model, 0, 3)
    detector = DeadExpertDetector(window=2, action="revive", noise=0.0)
    rec = LoadRecorder()
    trainer = fit(model, [rec, detector], max_steps=2)
    assert detector.revived == 1
    layer = model.model.moe_layers()[0]
    counts = rec.loads[0][0] + rec.loads[1][0]
    source = int(torch.argmax(counts))
    experts = layer.experts
    for weight in (experts.w_gate_EDF, experts.w_up_EDF, experts.w_out_EFD, layer.router.scorer.weight_ED):
        assert torch.equal(weight[3], weight[source])
    assert layer.router.expert_bias_E[3] == layer.router.expert_bias_E[source]
    state = trainer.optimizers[0].state[experts.w_gate_EDF]
    assert torch.count_nonzero(state["exp_avg"][3]) == 0 and torch.count_nonzero(state["exp_avg_sq"][3]) == 0
    assert torch.count_nonzero(state["exp_avg"][source]) > 0
    # The revived expert receives tokens again.
    model.eval()
    with torch.no_grad():
        model(torch.randint(0, 256, (8, 32)))
    assert layer.stats.tokens_per_expert_E[3] > 0


def test_detector_revival_noise_is_seeded() -> None:
    weights = []
    for _ in range(2):
        model = tiny()
        starve(model, 0, 3)
        fit(model, [DeadExpertDetector(window=2, action="revive", noise=0.1, seed=7)], max_steps=2)
        weights.append(model.model.moe_layers()[0].experts.w_up_EDF[3].clone())
    assert torch.equal(weights[0], weights[1])


def test_detector_window_survives_a_resume(tmp_path: Path) -> None:
    model = tiny()
    starve(model, 1, 0)
    detector = DeadExpertDetector(window=4, action="warn")
    with pytest.warns(UserWarning, match="experts"):
        fit(model, [detector], max_steps=4, tmp_path=tmp_path)
    resumed = DeadExpertDetector(window=4, action="warn")
    model2 = tiny()
    starve(model2, 1, 0)
    with pytest.warns(UserWarning, match=r"model\.blocks\.1\.ffn: experts \[0\]"):
        fit(model2, [resumed], max_steps=4, ckpt_path=str(tmp_path / "step=2.ckpt"))
    assert resumed.dead_experts == detector.dead_experts and resumed.batches_in_window == 0


def test_detector_state_round_trip() -> None:
    detector = DeadExpertDetector(window=5)
    model = tiny()
    fit(model, [detector], max_steps=3)
    other = DeadExpertDetector(window=5)
    other.load_state_dict(detector.state_dict())
    assert other.batches_in_window == 3
    assert torch.equal(other.state_dict()["counts"], detector.state_dict()["counts"])


@pytest.mark.parametrize("kwargs, match", [
    ({"window": 0}, "`window` must be an integer >= 1"),
    ({"threshold": 0.0}, r"`threshold` must be a number in \(0, 1\]"),
    ({"threshold": 1.5}, r"`threshold` must be a number in \(0, 1\]"),
    ({"action": "delete"}, r"`action` must be one of \('warn', 'raise', 'revive'\)"),
    ({"noise": -1.0}, "`noise` must be a number >= 0"),
])
def test_detector_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DeadExpertDetector(**kwargs)


def test_callbacks_refuse_a_model_without_moe_layers() -> None:
    dense = MoELanguageModel(max_seq_len=32, d_model=32, n_layers=2, n_heads=2, d_ff=64, moe_every=0)
    with pytest.raises(ValueError, match="DeadExpertDetector found no MoE layer in MoELanguageModel"):
        fit(dense, [DeadExpertDetector()], max_steps=1)


# ---------------------------------------------------------------- two instances of a callback


class StatesAtStart(L.Callback):
    """The ``state_dict()`` of each of ``callbacks`` when training starts: after a resume, what it restored."""

    def __init__(self, *callbacks: L.Callback) -> None:
        self.callbacks = callbacks
        self.states: list[dict] = []

    def on_train_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        self.states = [c.state_dict() for c in self.callbacks]


def assert_same_detector_state(restored: dict, saved: dict) -> None:
    assert {k: v for k, v in restored.items() if k != "counts"} == {k: v for k, v in saved.items() if k != "counts"}
    torch.testing.assert_close(restored["counts"], saved["counts"])


@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended")
def test_two_instances_keep_separate_states_through_a_resume(tmp_path: Path) -> None:
    # Two detectors with different windows and two schedulers for different balancers: each
    # checkpoint state is keyed by the instance's arguments, so each resumes from its own.
    def callbacks() -> list[L.Callback]:
        return [DeadExpertDetector(window=2), DeadExpertDetector(window=5, threshold=0.2),
                ZLossScheduler(Schedule("linear", value=1e-2, warmup_steps=4)),
                ZLossScheduler(Schedule("step", value=0.1, step_size=2), balancer="aux_loss")]

    def model() -> MoELanguageModel:
        m = tiny()
        starve(m, 1, 0)
        return m

    first = callbacks()
    with pytest.warns(UserWarning, match=r"dead experts .* model\.blocks\.1\.ffn: experts \[0\]"):
        fit(model(), first, max_steps=3, tmp_path=tmp_path)
    assert len({c.state_key for c in first}) == 4
    saved = [c.state_dict() for c in first]
    assert [s["batches_in_window"] for s in saved[:2]] == [1, 3]  # the short window ended at batch 2
    assert saved[0]["dead_experts"] == {"model.blocks.1.ffn": [0]} and saved[1]["dead_experts"] == {}
    assert [s["coeff"] for s in saved[2:]] == pytest.approx([2 / 4 * 1e-2, 0.1 * 0.5])

    resumed = callbacks()
    states = StatesAtStart(*resumed)
    with pytest.warns(UserWarning, match="dead experts"):  # the short window ends again at batch 4
        fit(model(), [*resumed, states], max_steps=4, ckpt_path=str(tmp_path / "step=3.ckpt"))
    for restored, before in zip(states.states[:2], saved[:2], strict=True):
        assert_same_detector_state(restored, before)
    assert states.states[2:] == saved[2:]

    # A checkpoint from before the detector's state key named its arguments (the class name) still restores it.
    checkpoint = torch.load(tmp_path / "step=3.ckpt", weights_only=False)
    checkpoint["callbacks"] = {"DeadExpertDetector": checkpoint["callbacks"][first[0].state_key]}
    torch.save(checkpoint, tmp_path / "former.ckpt")
    former = DeadExpertDetector(window=2)
    states = StatesAtStart(former)
    with pytest.warns(UserWarning, match="dead experts"):
        fit(model(), [former, states], max_steps=4, ckpt_path=str(tmp_path / "former.ckpt"))
    assert_same_detector_state(states.states[0], saved[0])
