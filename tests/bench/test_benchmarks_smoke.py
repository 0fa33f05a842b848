"""The benchmark scripts run end to end on a tiny shape and print the rows they promise (no timing asserted)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
TINY = ["--tokens", "64", "--d-model", "32", "--experts", "4", "--top-k", "2", "--d-ff", "16", "--rounds", "1",
        "--warmup", "1", "--device", "cpu", "--threads", "1"]


def run_script(script: str, args: list[str], cwd: Path) -> str:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True,
                            timeout=300, cwd=cwd, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def table_rows(output: str) -> dict[str, list[str]]:
    """``{path: cells}`` of the markdown table rows (header and rule excluded)."""
    rows = {}
    for line in output.splitlines():
        if line.startswith("| ") and not line.startswith("| path") and not line.startswith("| model"):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def test_moe_layer_every_path_without_memory(tmp_path: Path) -> None:
    output = run_script("moe_layer.py", [*TINY, "--no-memory", "--ours", "grouped,no-such-dispatcher"], tmp_path)
    rows = table_rows(output)
    expected = ["dense", "grouped", "sort-loop"]
    if has("transformers"):
        expected.append("hf-eager")
    if has("deepspeed"):
        expected += ["deepspeed", "deepspeed-dropless"]
    assert set(expected) <= set(rows), output
    # Present, or skipped with a reason (an older transformers or torch).
    for optional in ("hf-grouped_mm", "torch-grouped_mm"):
        assert optional in rows or f"skipped {optional}:" in output, output
    assert "skipped no-such-dispatcher: " in output
    assert "MISMATCH" not in output, output
    assert "check sort-loop: " in output and output.count(": OK") >= len(rows) - 2  # all but dense and grouped
    if has("deepspeed"):
        assert "dropped" in output
    assert rows["dense"][2] == "1.000"  # median/dense of the reference
    assert all(cells[5] == "-" for cells in rows.values())  # no peak MB


@pytest.mark.slow
def test_moe_layer_peak_memory_in_subprocesses(tmp_path: Path) -> None:
    output = run_script("moe_layer.py", [*TINY, "--only", "grouped,sort-loop"], tmp_path)
    rows = table_rows(output)
    assert list(rows) == ["dense", "grouped", "sort-loop"], output
    for name, cells in rows.items():
        assert float(cells[5]) >= 0, (name, output)  # peak MB measured, not "-"
    assert "unavailable" not in output, output


def test_train_throughput_prints_both_models_and_the_ratio(tmp_path: Path) -> None:
    args = ["--steps", "2", "--warmup", "1", "--batch-size", "2", "--seq-len", "16", "--d-model", "32", "--n-layers",
            "1", "--n-heads", "2", "--experts", "4", "--expert-d-ff", "16", "--device", "cpu", "--threads", "1"]
    output = run_script("train_throughput.py", args, tmp_path)
    rows = table_rows(output)
    assert list(rows) == ["dense", "moe (grouped)"], output
    # Same active parameters but the router's E*D weights; the MoE holds E/K times the FFN weights in all.
    dense_active = int(rows["dense"][5].replace(",", ""))
    moe_total, moe_active = (int(rows["moe (grouped)"][i].replace(",", "")) for i in (4, 5))
    assert moe_active == dense_active + 4 * 32 and moe_total > moe_active
    assert "MoE/dense tokens/s: " in output


@pytest.mark.slow
def test_busy_threads_times_each_thread_count_idle_and_busy(tmp_path: Path) -> None:
    output = run_script("busy_threads.py", ["--rounds", "1", "--steps", "1", "--threads", "2", "--hogs", "1"], tmp_path)
    rows = [line.strip("|").split("|") for line in output.splitlines() if line.startswith(("| idle", "| busy"))]
    assert [(r[0].strip(), int(r[1])) for r in rows] == [("idle", 1), ("idle", 2), ("busy", 1), ("busy", 2)], output
    assert all(float(r[2]) > 0 for r in rows) and rows[0][3].strip() == rows[2][3].strip() == "1.00x"
