"""The learning benchmark end to end on --tiny runs: the three reports, reuse of finished runs, and the default
(subprocess) launcher giving exactly what the fork launcher gave."""

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest

pytestmark = pytest.mark.slow  # README: `-m 'not slow'` leaves these out

ROWS = ["dense", "demo", "hash", "upcycled"]
SEEDS = [0, 1]
COMMON = ["--tiny", "--seeds", ",".join(map(str, SEEDS)), "--jobs", "2", "--threads", "1"]
REPO = Path(__file__).resolve().parents[2]


def bench(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "lightning_moe.bench.learning", *COMMON, "--out", str(out), *args],
                            capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def table_rows(markdown: str) -> dict[str, list[str]]:
    rows = {}
    for line in markdown.splitlines():
        if line.startswith("| ") and not line.startswith("| row "):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def csv_rows(out: Path) -> list[dict[str, str]]:
    with (out / "learning.csv").open() as f:
        return list(csv.DictReader(f))


def run_dirs(out: Path) -> set[str]:
    return {str(p.relative_to(out)) for p in (out / "runs").rglob("*") if p.is_dir()}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """The benchmark once, every run forked from one import of the CLI per job (~4 s a run instead of ~20 s)."""
    out = tmp_path_factory.mktemp("bench") / "learning"
    return out, bench(out, "--rows", ",".join(ROWS), "--launcher", "fork")


def test_reports_and_reuse(first_run: tuple[Path, subprocess.CompletedProcess]) -> None:
    out, first = first_run
    assert first.stderr.count("[learning] ran ") == len(SEEDS) * (len(ROWS) + 1)  # upcycled: dense half too

    # learning.md (also printed): one line per row, with both seeds.
    markdown = (out / "learning.md").read_text()
    rows = table_rows(markdown)
    assert list(rows) == ROWS, markdown
    assert rows == table_rows(first.stdout)
    for row, cells in rows.items():
        assert cells[0] == str(len(SEEDS)), (row, cells)
        mean, std = cells[1].split(" ± ")
        assert math.isfinite(float(mean)) and math.isfinite(float(std))
    assert rows["dense"][1] != "-" and rows["dense"][2] == "-"  # dense has no delta against itself
    assert rows["dense"][5] == "-" and rows["demo"][5].endswith("/4")  # dead-expert layers: MoE rows only
    # Equal active parameters but for the routers: at most the demo's token tables (4 x 32 x 256 entries, counted
    # whole), which the footnote flags; hash adds nothing.
    dense_active = int(rows["dense"][3].replace(",", ""))
    for row in ROWS:
        assert 0 <= int(rows[row][3].replace(",", "").rstrip(" †")) - dense_active <= 4 * 32 * 256, rows[row]
    assert rows["demo"][3].endswith("†") and "demo +3.0%" in markdown and not rows["hash"][3].endswith("†")

    # learning.csv: one line per run, finite val/loss everywhere; upcycled's curve spans the whole budget.
    lines = csv_rows(out)
    assert sorted((r["row"], int(r["seed"])) for r in lines) == sorted((row, s) for row in ROWS for s in SEEDS)
    for r in lines:
        points = [point.split(":") for point in r["val_loss_points"].split(";")]
        steps = [int(step) for step, _ in points]
        values = [float(value) for _, value in points]
        assert all(math.isfinite(v) for v in values) and math.isfinite(float(r["final_val_loss"]))
        assert float(r["final_val_loss"]) == values[-1] and steps[-1] == 4
        assert steps == [2, 4], r  # upcycled: its dense half's validation at 2, then its own at 2 + 2
        assert float(r["wall_seconds"]) > 0 and int(r["params_active"]) > 0
    # Same seed, same run: the two seeds differ, and every run is its own.
    dense = {int(r["seed"]): r["final_val_loss"] for r in lines if r["row"] == "dense"}
    assert dense[0] != dense[1]

    image = matplotlib.image.imread(out / "learning.png")
    assert image.ndim == 3 and image.shape[2] in (3, 4) and min(image.shape[:2]) > 100

    # A second invocation reuses every run: nothing new is started, the reports are the same.
    before = run_dirs(out)
    second = bench(out, "--rows", ",".join(ROWS), "--launcher", "fork")
    assert "[learning] ran " not in second.stderr
    assert second.stderr.count("[learning] reused ") == len(SEEDS) * (len(ROWS) + 1), second.stderr
    assert f"0 runs ran, {len(SEEDS) * (len(ROWS) + 1)} reused" in second.stderr
    assert run_dirs(out) == before
    assert csv_rows(out) == lines



def test_default_launcher_gives_the_same_numbers(first_run: tuple[Path, subprocess.CompletedProcess],
                                                 tmp_path: Path) -> None:
    """A fresh `python -m lightning_moe.cli fit ...` per run (the default) reproduces the forked run exactly."""
    out, _ = first_run
    again = bench(tmp_path / "learning", "--rows", "dense", "--seeds", "1")
    assert again.stderr.count("[learning] ran ") == 1 and "subprocess launcher" in again.stdout
    (line,) = csv_rows(tmp_path / "learning")
    (forked,) = [r for r in csv_rows(out) if r["row"] == "dense" and r["seed"] == "1"]
    assert {k: v for k, v in line.items() if k != "wall_seconds"} == {
        k: v for k, v in forked.items() if k != "wall_seconds"
    }
