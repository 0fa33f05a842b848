"""RoutingMonitor (formerly RoutingEntropyLogger) on the tiny model under a real Trainer.

Scalars, histograms, heatmaps, collapse alerts and checkpoint state.
"""

import csv
import io
import math
import re
import warnings
from functools import partial
from pathlib import Path

import lightning as L
import matplotlib.image
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, Dataset

from lightning_moe.callbacks.heatmap import HeatmapRender, heatmap_size_px, load_heatmap, render_load_heatmap
from lightning_moe.callbacks.routing_entropy_logger import ROUTING_VALUES, RoutingCollapseWarning, RoutingMonitor
from lightning_moe.layers import MoEConfig, MoELayer
from lightning_moe.metrics import load_summary
from lightning_moe.module import MoELanguageModel
from lightning_moe.routing import ExpertCapacity, HashRouter, TopKRouter

SEQ_LEN, BATCH, TOP_K, EXPERTS, LAYERS = 16, 4, 2, 4, 2
TOKENS = SEQ_LEN * BATCH


class RandomIds(Dataset):
    def __init__(self, n: int = 64) -> None:
        self.ids = torch.randint(0, 256, (n, SEQ_LEN + 1), generator=torch.Generator().manual_seed(1))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i]}


def tiny(capacity: ExpertCapacity | None = None, moe_every: int = 1, router=None) -> MoELanguageModel:  # noqa: ANN001
    torch.manual_seed(0)
    return MoELanguageModel(
        max_seq_len=SEQ_LEN, d_model=32, n_layers=LAYERS, n_heads=2, d_ff=64, moe_every=moe_every,
        optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3),
        moe=MoEConfig(
            num_experts=EXPERTS, expert_d_ff=32, router=router or partial(TopKRouter, top_k=TOP_K), capacity=capacity,
        ),
    )


def fit(model: MoELanguageModel, callbacks: list, max_steps: int, logger, ckpt_path: str | None = None,  # noqa: ANN001
        **trainer_kwargs) -> L.Trainer:  # noqa: ANN003
    L.seed_everything(0)
    trainer_kwargs.setdefault("limit_val_batches", 0)
    trainer = L.Trainer(
        max_steps=max_steps, limit_train_batches=8, logger=logger, log_every_n_steps=1, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, callbacks=callbacks, accelerator="cpu", devices=1,
        **trainer_kwargs,
    )
    trainer.fit(model, DataLoader(RandomIds(), batch_size=BATCH), DataLoader(RandomIds(8), batch_size=BATCH),
                ckpt_path=ckpt_path)
    return trainer


class LayerHook:
    """What each MoE layer saw, read by a forward hook: per forward, per layer (stats, aux losses)."""

    def __init__(self, model: MoELanguageModel) -> None:
        self.forwards: list[list] = []
        layers = [m for m in model.modules() if isinstance(m, MoELayer)]
        for i, layer in enumerate(layers):
            layer.register_forward_hook(partial(self._record, i))

    def _record(self, i: int, module: MoELayer, args: tuple, output: torch.Tensor) -> None:
        if i == 0:
            self.forwards.append([])
        self.forwards[-1].append((module.stats, {k: float(v.detach()) for k, v in module.aux_losses.items()}))


def read_events(log_dir: str) -> EventAccumulator:
    events = EventAccumulator(log_dir, size_guidance={"scalars": 0, "histograms": 0, "images": 0})
    events.Reload()
    return events


@pytest.fixture(scope="module")
def tensorboard_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    # Capacity factor 0.5: each expert keeps at most half the balanced share, so assignments drop.
    model = tiny(ExpertCapacity(capacity_factor=0.5))
    hook = LayerHook(model)
    callback = RoutingMonitor(image_every_n_steps=2)
    logger = TensorBoardLogger(tmp_path_factory.mktemp("tb"), name="run")
    fit(model, [callback], max_steps=5, logger=logger)
    return {"events": read_events(logger.log_dir), "forwards": hook.forwards, "callback": callback}


def scalar_series(events: EventAccumulator, tag: str) -> list[float]:
    series = events.Scalars(tag)
    assert [s.step for s in series] == list(range(len(series))), tag  # Lightning logs train batch k at step k - 1
    return [s.value for s in series]


def test_tensorboard_scalar_histogram_and_image_tags(tensorboard_run: dict) -> None:
    tags = tensorboard_run["events"].Tags()
    # Capacity caps every expert at a quarter of the tokens: never collapsed.
    assert scalar_series(tensorboard_run["events"], "routing/collapsed_layers") == [0.0] * 5
    for name in (*ROUTING_VALUES, "aux_loss", "z_loss"):
        assert f"routing/{name}" in tags["scalars"]
        for i in range(LAYERS):
            assert f"routing/layer{i}/{name}" in tags["scalars"]
    assert sorted(tags["histograms"]) == [f"routing/layer{i}/expert_load" for i in range(LAYERS)]
    assert tags["images"] == ["routing/load_heatmap"]


def test_logged_scalars_match_what_the_layers_saw(tensorboard_run: dict) -> None:
    events, forwards = tensorboard_run["events"], tensorboard_run["forwards"]
    assert len(forwards) == 5  # one training forward per step, no validation
    per_layer: dict[str, list[list[float]]] = {}
    for i in range(LAYERS):
        for name in (*ROUTING_VALUES, "aux_loss", "z_loss"):
            per_layer.setdefault(name, []).append(scalar_series(events, f"routing/layer{i}/{name}"))
    for step, layers in enumerate(forwards):
        for i, (stats, aux) in enumerate(layers):
            expected = {"token_entropy": float(stats.entropy), "dropped_fraction": float(stats.dropped_fraction),
                        **{k: float(v) for k, v in load_summary(stats.load_fraction_E).items()}, **aux}
            for name, value in expected.items():
                assert per_layer[name][i][step] == pytest.approx(value, rel=1e-5, abs=1e-6), (step, i, name)
        dropped = per_layer["dropped_fraction"]
        assert dropped[0][step] > 0 and dropped[1][step] > 0  # capacity 0.5 drops assignments
        for i in range(LAYERS):
            assert 0.0 <= per_layer["load_entropy"][i][step] <= 1.0
            assert 0.0 <= per_layer["token_entropy"][i][step] <= math.log(EXPERTS) + 1e-6
    for name in ROUTING_VALUES:
        overall = scalar_series(events, f"routing/{name}")
        for step in range(5):
            values = [per_layer[name][i][step] for i in range(LAYERS)]
            reduce = max if name == "max_share" else min if name == "min_share" else (lambda v: sum(v) / len(v))
            assert overall[step] == pytest.approx(reduce(values), rel=1e-5, abs=1e-6), (name, step)


def test_histograms_hold_the_tokens_per_expert(tensorboard_run: dict) -> None:
    events, forwards = tensorboard_run["events"], tensorboard_run["forwards"]
    for i in range(LAYERS):
        histograms = events.Histograms(f"routing/layer{i}/expert_load")
        assert [h.step for h in histograms] == [1, 2, 4]  # the first step, then every 2 (global_step)
        for h in histograms:
            stats = forwards[h.step - 1][i][0]
            value = h.histogram_value
            assert list(value.bucket_limit) == [e + 0.5 for e in range(EXPERTS)]
            assert list(value.bucket) == stats.tokens_per_expert_E.tolist()
            assert value.num == sum(value.bucket)
            # Kept plus dropped assignments are the router's T x K.
            assert sum(value.bucket) + int(stats.num_dropped) == TOKENS * TOP_K


def test_heatmap_images_are_the_rendering_of_each_steps_shares(tensorboard_run: dict) -> None:
    images = tensorboard_run["events"].Images("routing/load_heatmap")
    assert [im.step for im in images] == [1, 2, 4]
    for im in images:
        assert (im.height, im.width) == heatmap_size_px(LAYERS, EXPERTS)
        pixels = matplotlib.image.imread(io.BytesIO(im.encoded_image_string), format="png")
        rgb = np.rint(pixels[..., :3] * 255).astype(np.uint8)
        assert len(np.unique(rgb.reshape(-1, 3), axis=0)) > 50  # a chart with text, not a few blocks
        # Exactly the chart of the shares the layers kept at that step (PNG is lossless).
        counts = [stats.tokens_per_expert_E for stats, _ in tensorboard_run["forwards"][im.step - 1]]
        shares = [c.float() / c.sum().float() for c in counts]
        assert np.array_equal(rgb, load_heatmap(shares, list(range(LAYERS)), im.step, title="routing: expert load"))
    callback = tensorboard_run["callback"]
    assert callback.state_dict() == {"train_batches": 5, "val_batches": 0, "images_logged": 3, "last_image_step": 4,
                                     "collapse_warned_layers": []}


def cell_patch(render: HeatmapRender, row: int, col: int, fraction: float = 0.6) -> np.ndarray:
    """The central ``fraction`` of cell ``(row, col)``'s pixels, ``(h, w, 3)`` int."""
    (y, x), (h, w) = render.centres_LE2[row, col], render.cell_hw
    dy, dx = h * fraction / 2, w * fraction / 2
    return render.image_HW3[round(y - dy):round(y + dy), round(x - dx):round(x + dx)].astype(int)


HEATMAP_SHARES = [[0.25, 0.25, 0.25, 0.25], [0.5, 0.5, 0.0, 0.0], [1.0, 0.0]]


def test_load_heatmap_colours_cells_by_relative_share() -> None:
    render = render_load_heatmap([torch.tensor(s) for s in HEATMAP_SHARES], [0, 2, 4], step=7, annotate=False)
    assert render.image_HW3.dtype == np.uint8 and render.image_HW3.shape == (*heatmap_size_px(3, 4), 3)
    colour = {}
    for row, shares in enumerate(HEATMAP_SHARES):
        for col in range(len(shares)):
            patch = cell_patch(render, row, col)
            assert (patch == patch[0, 0]).all(), "a cell is one colour"
            colour[row, col] = patch[0, 0]
    neutral = colour[0, 0]
    assert all((colour[0, col] == neutral).all() for col in range(4))  # balanced: the fair share everywhere
    assert np.ptp(neutral) < 10 and neutral.min() > 180  # coolwarm's light grey
    for red, blue in [((1, 0), (1, 2)), ((2, 0), (2, 1))]:  # twice the fair share (or more) vs nothing
        r, g, b = colour[red]
        assert r > b + 100 and r > g + 100
        r, g, b = colour[blue]
        assert b > r + 100
    for col in (2, 3):  # padding: blank with grey hatching, no colour of the map
        patch = cell_patch(render, 2, col)
        assert (np.ptp(patch, axis=-1) <= 3).all()
        assert (patch == 255).all(axis=-1).mean() > 0.5 and (patch < 235).all(axis=-1).any()


def test_load_heatmap_prints_the_shares_and_labels() -> None:
    shares = [torch.tensor(s) for s in HEATMAP_SHARES]
    plain = render_load_heatmap(shares, [0, 2, 4], step=7, annotate=False)
    text = render_load_heatmap(shares, [0, 2, 4], step=7)  # 12 cells: printed
    changed = (text.image_HW3 != plain.image_HW3).any(axis=-1)
    assert np.array_equal(text.centres_LE2, plain.centres_LE2)
    for row, row_shares in enumerate(HEATMAP_SHARES):
        for col in range(4):
            (y, x), (h, w) = plain.centres_LE2[row, col], plain.cell_hw
            box = changed[round(y - h / 2) + 2:round(y + h / 2) - 2, round(x - w / 2) + 2:round(x + w / 2) - 2]
            assert box.any() == (col < len(row_shares)), (row, col)  # text in every cell but the padding
    assert changed.sum() == sum(  # ... and nowhere else
        changed[round(y - plain.cell_hw[0] / 2):round(y + plain.cell_hw[0] / 2),
                round(x - plain.cell_hw[1] / 2):round(x + plain.cell_hw[1] / 2)].sum()
        for y, x in plain.centres_LE2.reshape(-1, 2))
    # Dark text on the light neutral cell, light text on the saturated red one.
    neutral, red = cell_patch(text, 0, 0), cell_patch(text, 1, 0)
    assert neutral.min() < cell_patch(plain, 0, 0).min() - 100
    assert red.sum(axis=-1).max() > cell_patch(plain, 1, 0).sum(axis=-1).max() + 200
    # Too many columns to read: no text (the colour bar tells the share).
    wide = [torch.full((40,), 1 / 40)] * 2
    assert np.array_equal(load_heatmap(wide), load_heatmap(wide, annotate=False))


def test_load_heatmap_layer_labels_and_step_change_only_their_margin() -> None:
    shares = [torch.tensor(s) for s in HEATMAP_SHARES]
    base = render_load_heatmap(shares, [0, 2, 4], step=7)
    (top, left), (h, w) = base.centres_LE2[0, 0], base.cell_hw
    top, left = round(top - h / 2), round(left - w / 2)
    for other in (render_load_heatmap(shares, [0, 1, 2], step=7), render_load_heatmap(shares, [0, 2, 4], step=8)):
        changed = (other.image_HW3 != base.image_HW3).any(axis=-1)
        rows, cols = np.nonzero(changed)
        assert rows.size and ((cols < left) | (rows < top)).all()  # the tick labels left, the title above
    with pytest.raises(ValueError, match=r"`layer_labels` must hold one label per layer \(3\), got 2"):
        load_heatmap(shares, [0, 1])
    with pytest.raises(ValueError, match="`step` must be an integer >= 0"):
        load_heatmap(shares, step=-1)
    with pytest.raises(ValueError, match="`shares` must be a non-empty sequence"):
        load_heatmap([])
    with pytest.raises(ValueError, match="`shares` must hold non-empty 1-D vectors"):
        load_heatmap([torch.ones(2, 2)])


def test_heatmap_size_grows_with_the_cells_within_bounds() -> None:
    assert heatmap_size_px(1, 1) == (200, 320)  # 2.5 x 4 inches at 80 dpi
    assert heatmap_size_px(61, 256) == (800, 1120)  # 10 x 14 inches
    sizes = [heatmap_size_px(layers, experts) for layers, experts in [(4, 8), (4, 16), (8, 16), (16, 32)]]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)
    with pytest.raises(ValueError, match="`num_experts` must be an integer >= 1"):
        heatmap_size_px(2, 0)


def test_csv_logger_gets_the_scalars_and_validation(tmp_path: Path) -> None:
    full = RoutingMonitor(image_every_n_steps=1)
    brief = RoutingMonitor(prefix="moe", per_layer=False, log_validation=True)
    trainer = fit(tiny(), [full, brief], max_steps=3, logger=CSVLogger(tmp_path, name="csv"), limit_val_batches=1,
                  val_check_interval=3, num_sanity_val_steps=0)
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    columns = set(rows[0])
    for name in (*ROUTING_VALUES, "aux_loss", "z_loss"):
        assert f"routing/{name}" in columns and f"routing/layer1/{name}" in columns
        assert f"moe/{name}" in columns and f"val_moe/{name}" in columns
    assert not any(c.startswith(("moe/layer", "val_moe/layer", "val_routing")) for c in columns)
    train_rows = [r for r in rows if r["routing/dropped_fraction"]]
    assert len(train_rows) == 3
    assert all(float(r["routing/dropped_fraction"]) == 0.0 for r in train_rows)  # dropless
    assert all(float(r["moe/load_entropy"]) == float(r["routing/load_entropy"]) for r in train_rows)
    assert [r for r in rows if r["val_moe/token_entropy"]]
    assert full.state_dict() == {"train_batches": 3, "val_batches": 0, "images_logged": 0, "last_image_step": None,
                                 "collapse_warned_layers": []}
    assert brief.state_dict()["val_batches"] == 1 and brief.state_dict()["train_batches"] == 3
    assert full.state_key != brief.state_key


@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended")
def test_resume_restores_the_counts_and_the_image_schedule(tmp_path: Path) -> None:
    # Images every 3 steps: steps 1 and 3 in 5 steps. A fresh callback resumed at step 3 would
    # log again at step 4 (its first batch); the restored one waits for step 6. No collapse alert:
    # in batches of 64 tokens chance alone can put one expert in 90% of the top-2s (step 4 here).
    first = RoutingMonitor(image_every_n_steps=3, collapse_alert=False)
    trainer = fit(tiny(), [first], max_steps=3, logger=TensorBoardLogger(tmp_path, name="a"))
    checkpoint = tmp_path / "step3.ckpt"
    trainer.save_checkpoint(checkpoint)
    assert first.state_dict() == {"train_batches": 3, "val_batches": 0, "images_logged": 2, "last_image_step": 3,
                                  "collapse_warned_layers": []}
    resumed = RoutingMonitor(image_every_n_steps=3, collapse_alert=False)
    trainer = fit(tiny(), [resumed], max_steps=5, logger=TensorBoardLogger(tmp_path, name="b"),
                  ckpt_path=str(checkpoint))
    assert resumed.state_dict() == {"train_batches": 5, "val_batches": 0, "images_logged": 2, "last_image_step": 3,
                                    "collapse_warned_layers": []}
    assert "routing/load_heatmap" not in read_events(trainer.logger.log_dir).Tags()["images"]


@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended")
def test_two_monitors_keep_separate_states_through_a_resume(tmp_path: Path) -> None:
    # Keyed by prefix. In 3 steps "routing" (every 3) draws images at steps 1 and 3, "moe" (every 2)
    # at 1 and 2; resumed to 5, each goes on from its own schedule: "moe" draws at 4, "routing" not.
    def monitors() -> list[RoutingMonitor]:
        return [RoutingMonitor(image_every_n_steps=3, collapse_alert=False),
                RoutingMonitor(prefix="moe", image_every_n_steps=2, collapse_alert=False)]

    first = monitors()
    trainer = fit(tiny(), first, max_steps=3, logger=TensorBoardLogger(tmp_path, name="a"))
    checkpoint = tmp_path / "step3.ckpt"
    trainer.save_checkpoint(checkpoint)
    assert [(m.images_logged, m.last_image_step) for m in first] == [(2, 3), (2, 2)]
    resumed = monitors()
    fit(tiny(), resumed, max_steps=5, logger=TensorBoardLogger(tmp_path, name="b"), ckpt_path=str(checkpoint))
    assert [(m.train_batches, m.images_logged, m.last_image_step) for m in resumed] == [(5, 2, 3), (5, 3, 4)]

    # A checkpoint from before the rename keyed the state by the former class name.
    saved = torch.load(checkpoint, weights_only=False)
    saved["callbacks"] = {"RoutingEntropyLogger{'prefix': 'routing'}": saved["callbacks"][first[0].state_key]}
    torch.save(saved, tmp_path / "former.ckpt")
    former = RoutingMonitor(image_every_n_steps=3, collapse_alert=False)
    fit(tiny(), [former], max_steps=5, logger=TensorBoardLogger(tmp_path, name="c"),
        ckpt_path=str(tmp_path / "former.ckpt"))
    assert (former.train_batches, former.images_logged, former.last_image_step) == (5, 2, 3)


def test_former_name_is_an_alias_in_python_and_yaml() -> None:
    from jsonargparse import ArgumentParser

    from lightning_moe.callbacks import RoutingEntropyLogger

    assert RoutingEntropyLogger is RoutingMonitor
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--callbacks", type=list[L.Callback])
    config = parser.parse_args(["--callbacks", '[{"class_path": "lightning_moe.callbacks.RoutingEntropyLogger", '
                                                '"init_args": {"prefix": "moe"}}]'])
    (callback,) = parser.instantiate(config).callbacks
    assert isinstance(callback, RoutingMonitor) and callback.prefix == "moe"


def test_state_dict_round_trip() -> None:
    callback = RoutingMonitor()
    state = {"train_batches": 7, "val_batches": 2, "images_logged": 1, "last_image_step": 5,
             "collapse_warned_layers": [3, 0]}
    callback.load_state_dict(state)
    assert callback.warned_layers == {0, 3}
    other = RoutingMonitor()
    other.load_state_dict(callback.state_dict())
    assert other.state_dict() == {**state, "collapse_warned_layers": [0, 3]}
    # A checkpoint from before the collapse alert has no warned layers.
    other.load_state_dict({"train_batches": 7, "val_batches": 2, "images_logged": 1, "last_image_step": 5})
    assert other.warned_layers == set() and other.state_dict()["collapse_warned_layers"] == []


def test_images_off_and_per_layer_off(tmp_path: Path) -> None:
    callback = RoutingMonitor(image_every_n_steps=0, per_layer=False)
    trainer = fit(tiny(), [callback], max_steps=2, logger=TensorBoardLogger(tmp_path, name="off"))
    tags = read_events(trainer.logger.log_dir).Tags()
    assert tags["images"] == [] and tags["histograms"] == []
    assert "routing/token_entropy" in tags["scalars"]
    assert not any("/layer" in t for t in tags["scalars"])


@pytest.mark.parametrize("kwargs, match", [
    ({"prefix": ""}, "`prefix` must be a non-empty string"),
    ({"prefix": "routing/"}, "`prefix` must be a non-empty string without leading or trailing '/'"),
    ({"prefix": 3}, "`prefix` must be a non-empty string"),
    ({"per_layer": 1}, "`per_layer` must be a bool"),
    ({"log_validation": "yes"}, "`log_validation` must be a bool"),
    ({"image_every_n_steps": -1}, "`image_every_n_steps` must be an integer >= 0"),
    ({"image_every_n_steps": 1.5}, "`image_every_n_steps` must be an integer >= 0"),
    ({"collapse_alert": 1}, "`collapse_alert` must be a bool"),
    ({"collapse_token_fraction": 0.0}, re.escape("`collapse_token_fraction` must be a number in (0, 1] or None")),
    ({"collapse_token_fraction": 1.5}, re.escape("`collapse_token_fraction` must be a number in (0, 1] or None")),
    ({"collapse_token_fraction": True}, re.escape("`collapse_token_fraction` must be a number in (0, 1] or None")),
    ({"collapse_load_entropy": -0.1}, re.escape("`collapse_load_entropy` must be a number in [0, 1]")),
    ({"collapse_load_entropy": 1.01}, re.escape("`collapse_load_entropy` must be a number in [0, 1]")),
    ({"collapse_load_entropy": "0.5"}, re.escape("`collapse_load_entropy` must be a number in [0, 1]")),
    ({"collapse_token_entropy": -1.0}, "`collapse_token_entropy` must be a finite number >= 0"),
    ({"collapse_token_entropy": math.inf}, "`collapse_token_entropy` must be a finite number >= 0"),
    ({"collapse_token_entropy": math.nan}, "`collapse_token_entropy` must be a finite number >= 0"),
    ({"collapse_warmup_steps": -1}, "`collapse_warmup_steps` must be an integer >= 0"),
    ({"collapse_warmup_steps": 2.0}, "`collapse_warmup_steps` must be an integer >= 0"),
])
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RoutingMonitor(**kwargs)


def test_model_without_moe_layers_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="RoutingMonitor found no MoE layer in MoELanguageModel"):
        fit(tiny(moe_every=0), [RoutingMonitor()], max_steps=1, logger=CSVLogger(tmp_path))


# ---------------------------------------------------------------- collapse alert


class CollapsingRouter(TopKRouter):
    """Top-k whose logits favour expert 0 by +10 for every token: it is in every token's top-k."""

    def _logits(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor | None = None) -> torch.Tensor:
        logits_TE = super()._logits(x_TD, token_ids_T)
        return logits_TE + torch.nn.functional.one_hot(torch.tensor(0), self.num_experts).to(logits_TE) * 10.0


def collapse_warnings(records: list[warnings.WarningMessage], prefix: str = "routing") -> list[str]:
    return [str(w.message) for w in records
            if issubclass(w.category, RoutingCollapseWarning) and f"`{prefix}/collapsed_layers`" in str(w.message)]


@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended")
def test_collapse_alert_fires_once_per_layer_and_survives_resume(tmp_path: Path, one_thread: None) -> None:
    # Expert 0 reaches every token (token fraction 1) yet holds only 1/K = 50% of the kept
    # assignments, so the load entropy (about 0.9) alone would not flag it.
    router = partial(CollapsingRouter, top_k=TOP_K)
    alert = RoutingMonitor(image_every_n_steps=0)
    late = RoutingMonitor(prefix="late", per_layer=False, image_every_n_steps=0, collapse_warmup_steps=2)
    logger = TensorBoardLogger(tmp_path, name="collapse")
    with pytest.warns(RoutingCollapseWarning) as records:
        trainer = fit(tiny(router=router), [alert, late], max_steps=3, logger=logger)
    messages = collapse_warnings(records.list)
    assert len(messages) == LAYERS  # once per layer, not once per step
    for i, message in enumerate(messages):
        assert f"MoE layer {i} " in message and "at global step 1:" in message  # global_step after batch 1
        assert "expert 0 reaches 100.0% of the tokens and holds 50.0% of the kept assignments" in message
        assert "token fraction 1.000 >= collapse_token_fraction=0.9" in message
        assert "load entropy" not in message  # only the token fraction criterion holds
    late_messages = collapse_warnings(records.list, prefix="late")
    assert len(late_messages) == LAYERS and all("at global step 2:" in m for m in late_messages)
    events = read_events(logger.log_dir)
    assert scalar_series(events, "routing/collapsed_layers") == [float(LAYERS)] * 3
    assert scalar_series(events, "late/collapsed_layers") == [0.0, float(LAYERS), float(LAYERS)]  # warm-up
    assert alert.collapsed_layers == list(range(LAYERS))
    assert alert.state_dict()["collapse_warned_layers"] == list(range(LAYERS))

    # Resumed from a checkpoint, the restored callback still counts the layers but does not warn again.
    checkpoint = tmp_path / "step3.ckpt"
    trainer.save_checkpoint(checkpoint)
    resumed = RoutingMonitor(image_every_n_steps=0)
    logger = TensorBoardLogger(tmp_path, name="resumed")
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        fit(tiny(router=router), [resumed], max_steps=5, logger=logger, ckpt_path=str(checkpoint))
    assert collapse_warnings(records) == []
    assert resumed.collapsed_layers == list(range(LAYERS))
    assert [s.value for s in read_events(logger.log_dir).Scalars("routing/collapsed_layers")] == [float(LAYERS)] * 2


def test_balanced_run_stays_silent(tmp_path: Path, one_thread: None) -> None:
    # Hash routing by token id over a balanced table: each expert reaches about K/E = 50% of the tokens.
    router = partial(HashRouter, top_k=TOP_K, vocab_size=256)
    callback = RoutingMonitor(image_every_n_steps=0, collapse_load_entropy=0.9)
    logger = TensorBoardLogger(tmp_path, name="balanced")
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        fit(tiny(router=router), [callback], max_steps=3, logger=logger)
    assert collapse_warnings(records) == []
    events = read_events(logger.log_dir)
    assert scalar_series(events, "routing/collapsed_layers") == [0.0] * 3
    assert all(v > 0.9 for i in range(LAYERS) for v in scalar_series(events, f"routing/layer{i}/load_entropy"))
    assert callback.collapsed_layers == [] and callback.state_dict()["collapse_warned_layers"] == []


def test_collapse_alert_off_logs_nothing(tmp_path: Path, one_thread: None) -> None:
    callback = RoutingMonitor(image_every_n_steps=0, collapse_alert=False)
    logger = TensorBoardLogger(tmp_path, name="off")
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        fit(tiny(router=partial(CollapsingRouter, top_k=TOP_K)), [callback], max_steps=2, logger=logger)
    assert collapse_warnings(records) == []
    assert "routing/collapsed_layers" not in read_events(logger.log_dir).Tags()["scalars"]


@pytest.mark.parametrize("kwargs, row, expected", [
    # row: E, token fraction, kept per token, load entropy, token entropy
    ({}, (4, 0.95, 2.0, 0.9, 1.0), ["token fraction"]),
    ({}, (4, 0.85, 2.0, 0.9, 1.0), []),
    ({"collapse_token_fraction": None}, (4, 1.0, 2.0, 0.9, 1.0), []),
    ({}, (2, 1.0, 2.0, 1.0, 0.5), []),  # K = E: every expert reaches every token, by design
    ({}, (4, 0.5, 2.0, 0.3, 1.0), ["load entropy"]),
    ({"collapse_load_entropy": 0.0}, (4, 0.5, 1.0, 0.0, 1.0), []),
    ({}, (4, 0.5, 1.0, 0.9, 0.01), []),  # token entropy is off by default
    ({"collapse_token_entropy": 0.1}, (4, 1.0, 1.0, 0.2, 0.01), ["token fraction", "load entropy", "token entropy"]),
])
def test_collapse_criteria(kwargs: dict, row: tuple, expected: list[str]) -> None:
    reasons = RoutingMonitor(**kwargs)._collapse_reasons(*row)
    assert len(reasons) == len(expected) and all(r.startswith(e) for r, e in zip(reasons, expected, strict=True))
