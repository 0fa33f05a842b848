"""The benchmark scripts run end to end on a tiny shape and print the rows they promise (no timing asserted)."""

import importlib.util
import json
import math
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


TINY_MODEL = ["--steps", "2", "--warmup", "1", "--batch-size", "2", "--seq-len", "16", "--d-model", "32", "--layers",
              "1", "--heads", "2", "--experts", "4", "--d-ff", "16", "--device", "cpu", "--threads", "1"]


def test_train_throughput_prints_both_models_the_ratio_and_mfu(tmp_path: Path) -> None:
    output = run_script("train_throughput.py", [*TINY_MODEL, "--peak-tflops", "0.1", "--json", "out.json"], tmp_path)
    rows = table_rows(output)
    assert list(rows) == ["dense", "moe (grouped)"], output
    # Same active parameters but the router's E*D weights; the MoE holds E/K times the FFN weights in all.
    dense_active = int(rows["dense"][5].replace(",", ""))
    moe_total, moe_active = (int(rows["moe (grouped)"][i].replace(",", "")) for i in (4, 5))
    assert moe_active == dense_active + 4 * 32 and moe_total > moe_active
    assert "MoE/dense tokens/s: " in output and "target >= 0.8" in output
    assert "Peak for MFU: 0.1 TFLOP/s (--peak-tflops)" in output, output
    assert all(cells[9].endswith("%") and cells[10] == "-" for cells in rows.values())  # MFU; no CUDA memory
    summary = json.loads((tmp_path / "out.json").read_text())
    dense = summary["models"]["dense"]
    # Tied embedding: N = head 256*32 + attention 4*32*32 + FFN 3*32*32; 6 N + 12 L S D with L=1, S=16, D=32.
    assert dense["matmul_params"] == 256 * 32 + 4 * 32 * 32 + 3 * 32 * 32
    assert dense["train_flops_per_token"] == 6 * dense["matmul_params"] + 12 * 16 * 32
    for row in summary["models"].values():
        assert math.isfinite(row["mfu"]) and row["mfu"] > 0 and len(row["step_ms"]) == 2
        assert row["mfu"] == pytest.approx(row["tflops_median"] / 0.1)
    assert summary["ratio_median"] > 0 and summary["config"]["dispatcher"] == "grouped"


def test_train_throughput_gpu_preset_overridden_to_tiny_sizes_on_cpu(tmp_path: Path) -> None:
    output = run_script("train_throughput.py", ["--preset", "gpu", *TINY_MODEL, "--peak-tflops", "auto"], tmp_path)
    rows = table_rows(output)
    assert list(rows) == ["dense", "moe (grouped)"], output
    assert "preset gpu; vocabulary 256, D=32, 1 layers" in output and "bfloat16" in output  # the preset's dtype
    assert "(measured: best large bfloat16 matmul on this device)" in output, output
    assert all(cells[9].endswith("%") for cells in rows.values())


def test_train_throughput_presets_parse_and_explicit_options_win(monkeypatch: pytest.MonkeyPatch) -> None:
    # The script imports its sibling moe_layer through sys.path; both are undone after the test.
    monkeypatch.setattr(sys, "path", list(sys.path))
    for name in ("train_throughput", "moe_layer"):
        monkeypatch.setitem(sys.modules, name, None)
        monkeypatch.delitem(sys.modules, name)
    spec = importlib.util.spec_from_file_location("train_throughput", BENCHMARKS / "train_throughput.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_throughput"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    gpu = module.parse_args(["--preset", "gpu", "--device", "cpu"])
    sizes = (gpu.d_model, gpu.n_layers, gpu.n_heads, gpu.experts, gpu.top_k, gpu.expert_d_ff)
    assert sizes == (1024, 8, 16, 8, 2, 2048)
    assert (gpu.seq_len, gpu.dtype, gpu.dispatcher) == (1024, "bfloat16", "grouped")
    mixed = module.parse_args(["--preset", "gpu", "--device", "cpu", "--n-layers", "2", "--dtype", "float32"])
    assert (mixed.n_layers, mixed.dtype, mixed.d_model) == (2, "float32", 1024)
    tiny = module.parse_args(["--device", "cpu"])
    assert (tiny.d_model, tiny.n_layers, tiny.batch_size, tiny.seq_len, tiny.steps) == (128, 4, 16, 128, 30)
    for bad in (["--peak-tflops", "0"], ["--peak-tflops", "fast"], ["--dispatcher", "nope"], ["--top-k", "9"]):
        with pytest.raises(SystemExit):
            module.parse_args([*bad, "--device", "cpu"])


@pytest.mark.slow
def test_busy_threads_times_each_thread_count_idle_and_busy(tmp_path: Path) -> None:
    output = run_script("busy_threads.py", ["--rounds", "1", "--steps", "1", "--threads", "2", "--hogs", "1"], tmp_path)
    rows = [line.strip("|").split("|") for line in output.splitlines() if line.startswith(("| idle", "| busy"))]
    assert [(r[0].strip(), int(r[1])) for r in rows] == [("idle", 1), ("idle", 2), ("busy", 1), ("busy", 2)], output
    assert all(float(r[2]) > 0 for r in rows) and rows[0][3].strip() == rows[2][3].strip() == "1.00x"


def test_host_overhead_times_every_path_on_cpu(tmp_path: Path) -> None:
    output = run_script("host_overhead.py", ["--device", "cpu", "--tokens", "64", "--d-model", "32", "--experts",
                                             "4", "--d-ff", "16", "--rounds", "2", "--warmup", "1",
                                             "--dispatchers", "grouped,loop,no-such"], tmp_path)
    rows = table_rows(output)
    assert set(rows) == {"dense", "grouped", "loop"}, output
    assert all(cells[3] == "-" and cells[4] == "-" for cells in rows.values())  # no CUDA graph on CPU
    assert all(float(cells[0]) > 0 and float(cells[1]) > 0 for cells in rows.values())
    assert "skipped no-such: not a registered dispatcher" in output
