"""``lightning-moe report``: the PNG and HTML page of a real tiny run's TensorBoard logs."""

import base64
import io
import re
import shutil
from functools import partial
from pathlib import Path

import lightning as L
import matplotlib.image
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, Dataset
from torch.utils.tensorboard import SummaryWriter

from lightning_moe.callbacks import DeadExpertDetector, RoutingMonitor
from lightning_moe.callbacks.heatmap import heatmap_size_px, load_heatmap
from lightning_moe.layers import MoEConfig
from lightning_moe.module import MoELanguageModel
from lightning_moe.report import REPORT_DPI, REPORT_WIDTH_IN, ReportError, find_run_dir, main, read_run, write_report
from lightning_moe.routing import TopKRouter

SEQ_LEN, BATCH, EXPERTS, LAYERS, STEPS = 16, 4, 4, 3, 6


class RandomIds(Dataset):
    def __init__(self, n: int) -> None:
        self.ids = torch.randint(0, 256, (n, SEQ_LEN + 1), generator=torch.Generator().manual_seed(1))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i]}


def distinct_colours(pixels: np.ndarray) -> int:
    """Distinct RGB colours of an ``(H, W, 3 or 4)`` float image in [0, 1]."""
    rgb = np.rint(pixels[..., :3] * 255).astype(np.int64)
    return np.unique((rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]).size


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real run: 6 steps of a 3-layer MoE LM, validation every 3, then a test (a second events file)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models run fastest on one thread
    try:
        L.seed_everything(0)
        model = MoELanguageModel(
            max_seq_len=SEQ_LEN, d_model=32, n_layers=LAYERS, n_heads=2, d_ff=64,
            optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3),
            moe=MoEConfig(num_experts=EXPERTS, expert_d_ff=32, router=partial(TopKRouter, top_k=2)),
        )
        callbacks = [RoutingMonitor(image_every_n_steps=1, collapse_alert=False),
                     RoutingMonitor(prefix="moe", image_every_n_steps=0, collapse_alert=False),
                     DeadExpertDetector(window=2)]
        logger = TensorBoardLogger(tmp_path_factory.mktemp("runs"), name="tiny")
        trainer = L.Trainer(
            max_steps=STEPS, limit_train_batches=8, limit_val_batches=1, val_check_interval=3, num_sanity_val_steps=0,
            logger=logger, log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
            enable_checkpointing=False, callbacks=callbacks, accelerator="cpu", devices=1,
        )
        trainer.fit(model, DataLoader(RandomIds(64), batch_size=BATCH), DataLoader(RandomIds(8), batch_size=BATCH))
        trainer.test(model, DataLoader(RandomIds(4), batch_size=BATCH), verbose=False)
    finally:
        torch.set_num_threads(threads)
    return Path(logger.log_dir)


def test_write_report_writes_a_png_and_a_page_naming_every_layer(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "tiny.png"
    assert write_report(run_dir, out) == {"png": out, "html": out.with_suffix(".html")}
    pixels = matplotlib.image.imread(out)
    assert pixels.shape[1] == REPORT_WIDTH_IN * REPORT_DPI and 1000 < pixels.shape[0] < 2500
    assert distinct_colours(pixels) > 1000  # curves, text, heatmaps
    page = out.with_suffix(".html").read_text()
    embedded = re.search(r'src="data:image/png;base64,([^"]+)"', page)
    assert embedded and base64.b64decode(embedded.group(1)) == out.read_bytes()
    for i in range(LAYERS):
        assert f"<td>layer {i}</td><td>{EXPERTS}</td>" in page
    assert "layer 3" not in page
    assert "<li>Every panel was drawn.</li>" in page
    assert "<th>heatmaps at steps</th><td>1, 3, 6</td>" in page
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    for tag in ("train/loss", "val/loss", "test/loss", "routing/load_cv"):
        last = events.Scalars(tag)[-1].value
        assert f"<th>{tag} (last)</th><td>{last:.4{'g' if tag.startswith('routing') else 'f'}}</td>" in page


def test_report_heatmaps_come_from_the_histograms_of_the_logged_images(run_dir: Path) -> None:
    logs = read_run(run_dir)
    images = logs.images["routing/load_heatmap"]
    assert sorted(images) == list(range(1, STEPS + 1))  # image_every_n_steps=1: every global step
    for step, png in images.items():
        rgb = np.rint(matplotlib.image.imread(io.BytesIO(png), format="png")[..., :3] * 255).astype(np.uint8)
        assert rgb.shape == (*heatmap_size_px(LAYERS, EXPERTS), 3)
        if step not in (1, STEPS):
            continue
        # The shares the report draws, from the histograms, render to exactly the logged image.
        counts = [torch.tensor(logs.histograms[f"routing/layer{i}/expert_load"][step], dtype=torch.float32)
                  for i in range(LAYERS)]
        assert all(c.numel() == EXPERTS and c.sum() == SEQ_LEN * BATCH * 2 for c in counts)  # top-2, dropless
        assert np.array_equal(rgb, load_heatmap([c / c.sum() for c in counts], list(range(LAYERS)), step,
                                                title="routing: expert load"))


def test_main_writes_beside_the_run_and_prints_the_paths(run_dir: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "version_0"
    shutil.copytree(run_dir, run)
    assert main([str(run)]) == 0
    assert capsys.readouterr().out.splitlines() == [f"wrote {run / 'report.png'}", f"wrote {run / 'report.html'}"]
    assert matplotlib.image.imread(run / "report.png").shape[1] == REPORT_WIDTH_IN * REPORT_DPI


@pytest.mark.parametrize("make, args, message", [
    (lambda d: None, [], "{d} is not a folder"),
    (lambda d: (d / "checkpoints").mkdir(parents=True), [], "{d} holds no TensorBoard events files"),
    (None, ["--prefix", "nope"], "has no routing tags under prefix 'nope'; prefixes found: moe, routing."),
    (None, ["--out", "{d}/report.jpg"], "`out` must be a path ending in .png"),
])
def test_main_exits_2_with_one_line_naming_the_problem(run_dir: Path, tmp_path: Path, make, args: list[str],  # noqa: ANN001
                                                       message: str, capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "missing" if make else run_dir
    if make:
        make(folder)
    with pytest.raises(SystemExit) as exit_info:
        main([str(folder), *[a.format(d=folder) for a in args]])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lightning-moe report: error: ")
    assert message.format(d=folder) in err


def test_a_folder_of_versions_reports_the_newest(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    runs = tmp_path / "tiny"
    for version in ("version_2", "version_10"):  # 10 is newer than 2, though "version_10" < "version_2"
        shutil.copytree(run_dir, runs / version)
    with SummaryWriter(runs / "version_9") as writer:
        writer.add_scalar("train/loss", 1.0, 0)
    (runs / "notes").mkdir()  # no events: not a run
    assert find_run_dir(runs) == runs / "version_10"
    assert find_run_dir(runs / "version_2") == runs / "version_2"
    assert main([str(runs)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"reporting the newest run in {runs}: version_10"
    assert f"<code>{runs / 'version_10'}</code>" in (runs / "version_10" / "report.html").read_text()
    assert not (runs / "report.png").exists()  # the report lives in the run it reports


def test_event_files_of_one_run_merge_by_step_the_later_file_winning(run_dir: Path, tmp_path: Path) -> None:
    # The real run: fit and test wrote two files; test/loss is in the second only.
    logs = read_run(run_dir)
    assert len(logs.event_files) == 2 and logs.series("test/loss")[0].size == 1
    assert logs.series("train/loss")[0].tolist() == list(range(STEPS))
    # A resumed run: the second file repeats steps 3-4 and goes on to 7.
    resumed = tmp_path / "version_0"
    for start, stop, base in ((0, 5, 1.0), (3, 8, 10.0)):
        with SummaryWriter(resumed) as writer:
            for step in range(start, stop):
                writer.add_scalar("train/loss", base + step, step)
    files = sorted(resumed.glob("events.out.tfevents.*"))
    # File names sort the other way round: the order comes from each file's first event.
    (first, second), names = files, [f"events.out.tfevents.{t}.host.1.0" for t in ("2", "1")]
    first.rename(resumed / names[0])
    second.rename(resumed / names[1])
    steps, values = read_run(resumed).series("train/loss")
    assert steps.tolist() == list(range(8))
    assert values.tolist() == [1.0, 2.0, 3.0, 13.0, 14.0, 15.0, 16.0, 17.0]
    paths = write_report(resumed)
    page = paths["html"].read_text()
    assert "No RoutingMonitor tags" in page and "No dead_experts/* scalars" in page
    assert "<th>train/loss (last)</th><td>17.0000</td>" in page


def test_another_prefix_and_panels_left_out(run_dir: Path, tmp_path: Path) -> None:
    # The "moe" monitor logged scalars but no images or histograms (image_every_n_steps=0).
    page = write_report(run_dir, tmp_path / "moe.png", prefix="moe")["html"].read_text()
    assert "<th>routing prefix</th><td>moe</td>" in page and "<th>moe/load_cv (last)</th>" in page
    assert "No moe/layer{i}/expert_load histograms nor moe/load_heatmap images" in page
    assert all(f"<td>layer {i}</td><td>?</td>" in page for i in range(LAYERS))  # experts unknown without histograms
    with pytest.raises(ReportError, match="`heatmaps` must be an integer >= 0, got -1"):
        write_report(run_dir, tmp_path / "x.png", heatmaps=-1)
