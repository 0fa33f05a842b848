"""Sharded checkpoints under DDP (``moe_ddp``, :class:`~lightning_moe.parallel.MoEDDPStrategy`).

Saved at EP=4 on four processes, each rank writing its own expert rows (weights and AdamW's moments)
with ``torch.distributed.checkpoint``; loaded at EP=2 on two processes and at EP=1 on one, each rank
reading only the saved chunks of its own rows: the same logits, the same optimizer state, and training
on gives the same losses at both layouts. ``ModelCheckpoint`` keeps its top-1 and ``last.ckpt`` as
directories; the offline readers join a directory into whole tensors.

Runs are ``ep_fit_worker.py`` (through ``test_expert_parallel_fit.fit``): a tiny MoELanguageModel with
E=8 experts and AdamW, 3 steps before saving and 3 after loading; one launch per layout.
"""

import functools
import sys
from pathlib import Path

import pytest
import torch
from ep_fit_worker import SEQ, VOCAB, Sequences
from test_expert_parallel_fit import LOSS_TOL, fit, mean_losses
from torch.distributed.checkpoint import FileSystemReader, TensorStorageMetadata

from lightning_moe.balancing import ZLoss
from lightning_moe.layers import MoEConfig
from lightning_moe.module import MoELanguageModel
from lightning_moe.parallel import MoEDDPStrategy, consolidate_checkpoint, load_full_state_dict
from lightning_moe.routing import TopKRouter

E = 8
ADAM = ("--experts", str(E), "--optimizer", "adam")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sharded")


@pytest.fixture(scope="module")
def saved(runs: Path) -> list[dict]:
    """The EP=4 run: 3 steps, a ModelCheckpoint every step, then ``trainer.save_checkpoint(ep4.ckpt)``."""
    return fit(runs / "ep4", "moe_ddp", 4, *ADAM, "--steps", "3", "--save", str(runs / "ep4.ckpt"),
               "--checkpoint-dir", str(runs / "ckpts"), processes=4)


def resumed(runs: Path, ep: int) -> list[dict]:
    return fit(runs / f"ep{ep}", "moe_ddp", ep, *ADAM, "--steps", "6", "--load", str(runs / "ep4.ckpt"),
               "--start-state", "--record-reads", processes=ep)


@pytest.fixture(scope="module")
def ep2(runs: Path, saved: list[dict]) -> list[dict]:
    return resumed(runs, 2)


@pytest.fixture(scope="module")
def ep1(runs: Path, saved: list[dict]) -> list[dict]:
    return resumed(runs, 1)


def expert_sizes(path: Path) -> dict[str, torch.Size]:
    """Whole shape of each saved expert tensor (weights and per-row optimizer state), by DCP key."""
    metadata = FileSystemReader(path).read_metadata()
    return {key: entry.size for key, entry in metadata.state_dict_metadata.items()
            if ".experts." in key and isinstance(entry, TensorStorageMetadata) and len(entry.size) >= 1}


@pytest.mark.slow
@pytest.mark.distributed
def test_each_rank_writes_its_own_expert_rows_once(runs: Path, saved: list[dict]) -> None:
    path = runs / "ep4.ckpt"
    metadata = FileSystemReader(path).read_metadata()
    experts = expert_sizes(path)
    assert len(experts) == 2 * 3 * 3  # 2 layers x (gate, up, out) x (weight, exp_avg, exp_avg_sq)
    chunks: dict[str, list[tuple[int, str]]] = {}
    for index, info in metadata.storage_data.items():
        chunks.setdefault(index.fqn, []).append((index.offset[0] if len(index.offset) else 0, info.relative_path))
    for key, size in experts.items():
        assert size[0] == E
        # Rank j of the expert-parallel group holds experts 2j, 2j+1: one chunk of 2 rows, in its own file.
        assert sorted(chunks[key]) == [(2 * j, f"__{j}_0.distcp") for j in range(4)], key
        assert all(tuple(c.sizes)[0] == 2 for c in metadata.state_dict_metadata[key].chunks)
    dense = [key for key, entry in metadata.state_dict_metadata.items()
             if isinstance(entry, TensorStorageMetadata) and key not in experts]
    assert any(key.startswith("state_dict.") for key in dense) and any(key.endswith(".exp_avg") for key in dense)
    assert all(len(chunks[key]) == 1 for key in dense)  # replicated: written once, by one rank
    assert sorted(p.name for p in path.glob("*.distcp")) == [f"__{r}_0.distcp" for r in range(4)]
    meta = torch.load(path / "meta.pt", weights_only=True)  # the rest, from rank 0
    assert "state_dict" not in meta and "optimizer_states" not in meta
    assert meta["global_step"] == 3 and meta["hyper_parameters"]["moe"]["expert_parallel_size"] == 4


@pytest.mark.slow
@pytest.mark.distributed
def test_model_checkpoint_keeps_top_one_and_last_as_directories(runs: Path, saved: list[dict]) -> None:
    folder = runs / "ckpts"
    # A checkpoint every step, top-1: the directories of steps 1 and 2 were removed; no temporary one is left.
    assert sorted(p.name for p in folder.iterdir()) == ["epoch=0-step=3.ckpt", "last.ckpt"]
    last, final = load_full_state_dict(folder / "last.ckpt"), load_full_state_dict(runs / "ep4.ckpt")
    assert last.keys() == final.keys() and final["model.blocks.0.ffn.experts.w_gate_EDF"].shape == (E, 16, 8)
    for key, value in final.items():
        torch.testing.assert_close(last[key], value, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.distributed
def test_ep2_reads_only_its_own_rows_and_continues_as_ep1(runs: Path, saved: list[dict], ep2: list[dict],
                                                          ep1: list[dict]) -> None:
    experts = expert_sizes(runs / "ep4.ckpt")
    for rank, run in enumerate(ep2):
        own = set(range(4 * rank, 4 * rank + 4))  # EP=2: experts 4r .. 4r+3
        read: dict[str, set[int]] = {}
        for key, chunk_offset, offsets, lengths in run["reads"]:
            if key not in experts:
                continue
            chunk = set(range(chunk_offset[0], chunk_offset[0] + 2))  # the saved chunk (read whole from its file)
            box = set(range(chunk_offset[0] + offsets[0], chunk_offset[0] + offsets[0] + lengths[0]))
            assert chunk <= own and box <= own, (rank, key, chunk_offset, offsets, lengths)
            read.setdefault(key, set()).update(box)
        assert read == {key: own for key in experts}
        assert run["expert_shapes"]["model.blocks.0.ffn.experts.w_gate_EDF"] == (4, 16, 8)
        torch.testing.assert_close(run["start_logits"], saved[0]["logits"], rtol=0, atol=1e-6)
        # AdamW's state arrived as this rank's rows of the one-process run's (which read everything).
        whole = ep1[0]["start_optimizer_state"]
        assert run["start_optimizer_state"].keys() == whole.keys()
        for name, state in run["start_optimizer_state"].items():
            rows = slice(4 * rank, 4 * rank + 4) if ".experts." in name else slice(None)
            assert float(state["step"]) == 3
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(state[key], whole[name][key][rows], rtol=0, atol=0)
    assert len(ep1[0]["losses"]) == 3
    assert mean_losses(ep2) == pytest.approx(ep1[0]["losses"], rel=LOSS_TOL, abs=LOSS_TOL)


@pytest.mark.slow
@pytest.mark.distributed
def test_ep1_on_one_process_restores_everything(runs: Path, saved: list[dict], ep1: list[dict]) -> None:
    run = ep1[0]
    assert run["expert_shapes"]["model.blocks.0.ffn.experts.w_gate_EDF"] == (E, 16, 8)
    torch.testing.assert_close(run["start_logits"], saved[0]["logits"], rtol=0, atol=1e-6)
    # The whole optimizer state, as the offline consolidation reads it from the four ranks' files.
    whole = consolidate_checkpoint(runs / "ep4.ckpt")
    names = torch.load(runs / "ep4.ckpt" / "meta.pt", weights_only=True)["lightning_moe_optimizers"][0]["param_names"]
    state = whole["optimizer_states"][0]["state"]
    assert len(state) == len(run["start_optimizer_state"])
    for index, entry in state.items():
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(run["start_optimizer_state"][names[index]][key], entry[key], rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.distributed
def test_a_directory_consolidates_into_one_checkpoint_file(runs: Path, saved: list[dict], tmp_path: Path) -> None:
    state_dict = load_full_state_dict(runs / "ep4.ckpt")
    assert state_dict["model.blocks.1.ffn.experts.w_out_EFD"].shape == (E, 8, 16)
    whole = consolidate_checkpoint(runs / "ep4.ckpt")
    assert whole["global_step"] == 3 and "loops" in whole and "hyper_parameters" in whole
    torch.save(whole, tmp_path / "whole.ckpt")
    # One file with whole experts, as plain `ddp` writes: an EP=1 model of the worker's make loads it.
    model = MoELanguageModel(VOCAB, SEQ, d_model=16, n_layers=2, n_heads=2, d_ff=32, moe=MoEConfig(
        router=functools.partial(TopKRouter, expert_bias=False), num_experts=E, expert_d_ff=8, balancers=[ZLoss(0.01)]))
    model.load_state_dict(torch.load(tmp_path / "whole.ckpt", weights_only=True)["state_dict"])
    model.eval()
    with torch.no_grad():
        logits = model(Sequences().ids[:4, :-1])
    torch.testing.assert_close(logits, saved[0]["logits"], rtol=0, atol=1e-6)


def test_moe_ddp_is_a_strategy_name_of_the_cli(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from lightning_moe.cli import run_cli

    monkeypatch.chdir(tmp_path)  # the trainer's logger would otherwise claim ./runs
    monkeypatch.setattr(sys, "argv", ["lightning-moe"])
    config = Path(__file__).resolve().parents[2] / "cli_configs" / "tiny.yaml"
    cli = run_cli(["--config", str(config), "--trainer.strategy", "moe_ddp", "--trainer.accelerator", "cpu",
                   "--trainer.devices", "1"], run=False)
    assert isinstance(cli.trainer.strategy, MoEDDPStrategy)
    assert MoEDDPStrategy.writes_expert_shards


def test_a_directory_saved_from_another_model_is_refused_when_loading_strictly(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    import lightning as L
    from torch.utils.data import DataLoader

    # DDP on one process sets LOCAL_RANK, NODE_RANK, WORLD_SIZE, ... in os.environ: keep them out of later tests
    # (an example that sees LOCAL_RANK believes torchrun started it).
    monkeypatch.setattr(os, "environ", os.environ.copy())

    def model(n_layers: int) -> MoELanguageModel:
        L.seed_everything(0, verbose=False)
        return MoELanguageModel(VOCAB, SEQ, d_model=16, n_layers=n_layers, n_heads=2, d_ff=32,
                                moe=MoEConfig(router=TopKRouter, num_experts=4, expert_d_ff=8, balancers=[ZLoss(0.01)]))

    def trainer() -> L.Trainer:
        return L.Trainer(accelerator="cpu", devices=1, strategy=MoEDDPStrategy(), max_steps=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)

    loader = DataLoader(Sequences(), batch_size=8)
    first = trainer()
    first.fit(model(3), loader)
    first.save_checkpoint(tmp_path / "three.ckpt")
    # DCP reads only what the model asks for; the strategy still reports the blocks the model lacks.
    with pytest.raises(RuntimeError, match=r"unexpected key\(s\) in state_dict: model\.blocks\.2\."):
        trainer().validate(model(2), dataloaders=loader, ckpt_path=tmp_path / "three.ckpt")
    lenient = model(2)
    lenient.strict_loading = False
    trainer().validate(lenient, dataloaders=loader, ckpt_path=tmp_path / "three.ckpt")
    assert not list(tmp_path.glob(".*"))  # no temporary or set-aside folder left
