"""Sharded checkpoints under DeepSpeed (:class:`~lightning_moe.parallel.MoEDeepSpeedStrategy`), in
DeepSpeed-MoE's own layout.

Saved with EP=2 on two processes (ZeRO-2, AdamW): one file per global expert per layer, written by
the rank that holds it, with that expert's rows only; the non-expert file and the ZeRO optimizer
files hold no whole expert tensor, and each rank's optimizer file holds its own experts' partition.
Resuming at the same layout restores AdamW's state through DeepSpeed's own load (training on goes as
the one-process run does from its checkpoint of the same weights and moments);
``to_universal_checkpoint`` carries that state to EP=1 on one process too; ``load_full_state_dict``
consolidates the directory offline into the whole weights. Resharding the weights alone to EP=1 is
tested in ``test_expert_parallel_fit.py``; the last test checks the marker's state-dict hooks in
this process.

Runs are ``ep_fit_worker.py`` (through ``test_expert_parallel_fit.fit``): a tiny MoELanguageModel with
E=4 experts, L=2 per rank, 4 AdamW steps before saving and 4 after loading.
"""

import functools
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed", reason="install the `deepspeed` extra: pip install -e '.[deepspeed]'")

from deepspeed.checkpoint.constants import EP_IS_EXPERT_PARAM, EP_NUM_EXPERTS, PARAM  # noqa: E402
from ep_fit_worker import SEQ, VOCAB, Sequences  # noqa: E402
from test_expert_parallel_fit import LOSS_TOL, fit, mean_losses  # noqa: E402

from lightning_moe.balancing import ZLoss  # noqa: E402
from lightning_moe.layers import MoEConfig, MoELayer  # noqa: E402
from lightning_moe.module import MoELanguageModel  # noqa: E402
from lightning_moe.parallel import MoEDeepSpeedStrategy, load_full_state_dict  # noqa: E402
from lightning_moe.parallel.ds_marker import DeepSpeedExpertMarker, deepspeed_expert_files  # noqa: E402
from lightning_moe.parallel.strategy import to_universal_checkpoint  # noqa: E402
from lightning_moe.routing import TopKRouter  # noqa: E402

E, L = 4, 2
EXPERT_NAMES = {"w_gate_EDF": (16, 8), "w_up_EDF": (16, 8), "w_out_EFD": (8, 16)}
ZERO2_ADAM = ("--stage", "2", "--optimizer", "adam")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ds_checkpoint")


@pytest.fixture(scope="module")
def saved(runs: Path) -> list[dict]:
    return fit(runs / "ep2", "deepspeed", 2, *ZERO2_ADAM, "--save", str(runs / "ep2.ckpt"), processes=2)


def tag_dir(runs: Path) -> Path:
    path = runs / "ep2.ckpt"
    return path / (path / "latest").read_text().strip()


def expert_file(runs: Path, layer: int, expert: int) -> dict[str, torch.Tensor]:
    return torch.load(tag_dir(runs) / f"layer_{layer}_expert_{expert}_mp_rank_00_model_states.pt", weights_only=True)


@pytest.mark.distributed
def test_one_file_per_expert_with_its_rows_only(runs: Path, saved: list[dict]) -> None:
    files = {p.name for p in tag_dir(runs).iterdir()}
    experts = {f"layer_{layer}_expert_{e}_mp_rank_00_model_states.pt" for layer in range(2) for e in range(E)}
    optimizer = {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(2)}
    assert files == experts | optimizer | {"mp_rank_00_model_states.pt"}
    for layer in range(2):
        for e in range(E):
            state = expert_file(runs, layer, e)
            prefix = f"model.blocks.{layer}.ffn.deepspeed_marker.deepspeed_moe.experts.deepspeed_experts.{e}."
            assert {key: tuple(value.shape) for key, value in state.items()} == {
                prefix + name: shape for name, shape in EXPERT_NAMES.items()}
            for value in state.values():  # not a view of the grouped tensor: the file holds these rows alone
                assert value.untyped_storage().nbytes() == value.numel() * value.element_size()


@pytest.mark.distributed
def test_no_other_file_holds_expert_tensors(runs: Path, saved: list[dict]) -> None:
    model_states = torch.load(tag_dir(runs) / "mp_rank_00_model_states.pt", weights_only=False)
    assert not [key for key in model_states["module"] if "experts" in key]
    assert "model.blocks.0.ffn.router.scorer.weight_ED" in model_states["module"]
    assert "lightning_moe_state_dict" not in model_states  # nothing gathered
    assert MoEDeepSpeedStrategy.writes_expert_shards  # so MoELanguageModel.on_save_checkpoint gathers nothing
    assert model_states["lightning_moe_expert_parallel"] == {
        "world_size": 2, "sizes": {"model.blocks.0.ffn": 2, "model.blocks.1.ffn": 2}}
    assert model_states["global_step"] == 4 and "loops" in model_states
    for rank in range(2):
        # ZeRO-2: each rank's optimizer file holds its own experts' rows (expert-data-parallel group of one), in
        # fp32 and both AdamW moments, as one flat partition per parameter group: never the whole E rows.
        zero = torch.load(tag_dir(runs) / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt",
                          weights_only=False)["optimizer_state_dict"]
        (group, fragments), = [(i, m) for i, m in enumerate(zero["param_slice_mappings"]) if any(
            "experts" in name for name in m)]
        flat = zero["single_partition_of_fp32_groups"][group]
        moments = zero["base_optimizer_state"]["state"][group]
        assert moments["exp_avg"].shape == moments["exp_avg_sq"].shape == flat.shape
        assert flat.numel() == 2 * sum(L * 128 for _ in EXPERT_NAMES)  # 2 layers x 3 tensors x L experts
        for layer in range(2):
            for name, shape in EXPERT_NAMES.items():
                fragment = fragments[f"model.blocks.{layer}.ffn.experts.{name}"]
                assert fragment.numel == L * 128
                rows = flat[fragment.start:fragment.start + fragment.numel].view(L, *shape)
                for local in range(L):
                    written = expert_file(runs, layer, rank * L + local)
                    key = f"model.blocks.{layer}.ffn.deepspeed_marker.deepspeed_moe.experts.deepspeed_experts." \
                          f"{rank * L + local}.{name}"
                    torch.testing.assert_close(rows[local], written[key], rtol=0, atol=0)


@pytest.mark.distributed
def test_load_full_state_dict_consolidates_the_experts(runs: Path, saved: list[dict]) -> None:
    whole = load_full_state_dict(runs / "ep2.ckpt")
    for layer in range(2):
        for name, shape in EXPERT_NAMES.items():
            tensor = whole[f"model.blocks.{layer}.ffn.experts.{name}"]
            assert tuple(tensor.shape) == (E, *shape)
            for e in range(E):
                file_key = f"model.blocks.{layer}.ffn.deepspeed_marker.deepspeed_moe.experts.deepspeed_experts.{e}."
                torch.testing.assert_close(tensor[e], expert_file(runs, layer, e)[file_key + name], rtol=0, atol=0)
    # A one-process EP=1 model of the worker's make loads it strictly and computes what the EP=2 ranks did.
    model = MoELanguageModel(VOCAB, SEQ, d_model=16, n_layers=2, n_heads=2, d_ff=32, moe=MoEConfig(
        router=functools.partial(TopKRouter, expert_bias=False), num_experts=E, expert_d_ff=8, balancers=[ZLoss(0.01)]))
    model.load_state_dict(whole)
    model.eval()
    with torch.no_grad():
        logits = model(Sequences().ids[:4, :-1])
    for rank in saved:
        torch.testing.assert_close(logits, rank["logits"], rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def reference(runs: Path, saved: list[dict]) -> dict:
    """One process, no DeepSpeed: the same 4 AdamW steps (as the EP=2 run's), saved, then 4 more from its own
    checkpoint."""
    single = fit(runs / "single", "single", 1, "--optimizer", "adam", "--save", str(runs / "single.ckpt"))
    assert mean_losses(saved) == pytest.approx(single[0]["losses"], rel=LOSS_TOL, abs=LOSS_TOL)
    return fit(runs / "single_on", "single", 1, "--optimizer", "adam", "--load", str(runs / "single.ckpt"),
               "--steps", "8")[0]


def continues_as_reference(resumed: list[dict], reference: dict) -> None:
    # AdamW's moments restarted from zero would move the first step after the load by ~lr per weight.
    assert len(resumed[0]["losses"]) == 4
    assert mean_losses(resumed) == pytest.approx(reference["losses"], rel=LOSS_TOL, abs=LOSS_TOL)
    for rank in resumed:
        torch.testing.assert_close(rank["logits"], reference["logits"], rtol=0, atol=1e-5)


@pytest.mark.distributed
def test_resuming_at_the_same_layout_restores_the_zero_optimizer_state(runs: Path, reference: dict) -> None:
    resumed = fit(runs / "ep2_on", "deepspeed", 2, *ZERO2_ADAM, "--load", str(runs / "ep2.ckpt"), "--steps", "8",
                  processes=2)
    continues_as_reference(resumed, reference)


@pytest.mark.distributed
def test_a_universal_checkpoint_reshards_the_optimizer_state_too(runs: Path, reference: dict) -> None:
    universal = to_universal_checkpoint(runs / "ep2.ckpt", runs / "ep2_universal")
    # Every parameter's fp32 copy and moments, whole: an expert's joins both ranks' rows, marked for DeepSpeed.
    expert = torch.load(universal / "checkpoint" / "zero" / "model.blocks.1.ffn.experts.w_out_EFD" / "exp_avg.pt",
                        weights_only=False)
    assert tuple(expert[PARAM].shape) == (E, 8, 16) and expert[EP_IS_EXPERT_PARAM] and expert[EP_NUM_EXPERTS] == E
    assert (universal / "latest_universal").read_text() == "checkpoint"
    # Loaded at EP=1 on one process (ZeRO-2 with its own partitioning), training on goes as the reference does.
    resumed = fit(runs / "ep1_universal", "deepspeed", 1, *ZERO2_ADAM, "--load", str(universal), "--universal",
                  "--steps", "8")
    assert resumed[0]["expert_shapes"]["model.blocks.0.ffn.experts.w_gate_EDF"] == (E, 16, 8)
    continues_as_reference(resumed, reference)


@pytest.mark.distributed
def test_a_checkpoint_of_the_earlier_format_still_loads_its_weights(runs: Path, saved: list[dict]) -> None:
    # Before per-expert files, the non-expert file carried the whole state dict (experts gathered) and the marker
    # wrote no expert files: rebuild one from this run's checkpoint.
    import shutil

    from lightning_moe.parallel.strategy import STATE_KEY

    old = runs / "old_format.ckpt"
    shutil.copytree(runs / "ep2.ckpt", old)
    tag = old / (old / "latest").read_text().strip()
    client = torch.load(tag / "mp_rank_00_model_states.pt", weights_only=False)
    client[STATE_KEY] = load_full_state_dict(runs / "ep2.ckpt")
    torch.save(client, tag / "mp_rank_00_model_states.pt")
    for file in tag.glob("layer_*_expert_*_mp_rank_00_model_states.pt"):
        file.unlink()
    resumed = fit(runs / "old_format_on", "deepspeed", 2, *ZERO2_ADAM, "--load", str(old), "--steps", "5",
                  "--start-state", processes=2)
    for rank, before in zip(resumed, saved, strict=True):
        torch.testing.assert_close(rank["start_logits"], before["logits"], rtol=0, atol=1e-6)


def test_the_marker_shows_per_expert_keys_only_while_deepspeed_saves() -> None:
    # What DeepSpeed's save and load see of a layer inside deepspeed_expert_files, and the ordinary state dict
    # outside it (one process, EP=1: the marker stands for all 4 experts).
    torch.manual_seed(0)
    layer, other = MoELayer(8, 6, E), MoELayer(8, 6, E)
    layer.deepspeed_marker, other.deepspeed_marker = DeepSpeedExpertMarker(E, 1), DeepSpeedExpertMarker(E, 1)
    plain = layer.state_dict()
    with deepspeed_expert_files(layer) as markers:
        exposed, own = layer.state_dict(), layer.deepspeed_marker.state_dict()
    assert markers == [layer.deepspeed_marker] and layer.state_dict().keys() == plain.keys()
    names = [name for name, _ in layer.expert_parameters()]
    assert sorted(names) == ["w_gate_EDF", "w_out_EFD", "w_up_EDF"] and not any("marker" in key for key in plain)
    per_expert = {f"deepspeed_moe.experts.deepspeed_experts.{e}.{name}": plain[f"experts.{name}"][e]
                  for e in range(E) for name in names}
    assert own.keys() == per_expert.keys()  # the marker's own state dict: what DeepSpeed splits into files
    assert exposed.keys() == (plain.keys() - {f"experts.{name}" for name in names}) | {
        f"deepspeed_marker.{key}" for key in per_expert}
    for key, value in per_expert.items():
        assert torch.equal(own[key], value) and torch.equal(exposed[f"deepspeed_marker.{key}"], value)
    with deepspeed_expert_files(other):
        other.load_state_dict(exposed)  # strict: the per-expert keys go back into the grouped tensors
    other.load_state_dict(plain)  # and the ordinary state dict still loads
    for key, value in other.state_dict().items():
        assert torch.equal(value, plain[key]), key
