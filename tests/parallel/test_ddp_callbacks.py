"""The callbacks under real 2-process DDP on CPU (gloo): ranks agree, and they agree on the sum."""

import pytest
import torch
from ddp_launch import run_ranks

from lightning_moe.balancing import bias_update


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return run_ranks("ddp_callbacks_worker.py", tmp_path_factory.mktemp("ddp"))


@pytest.mark.distributed
def test_biases_are_identical_on_both_ranks_and_follow_the_summed_loads(ranks: list[dict]) -> None:
    r0, r1 = ranks
    same = all(torch.equal(a, b) for a, b in zip(r0["loads"], r1["loads"], strict=True))
    assert not same, "the ranks should see different data"
    for layer in range(2):
        assert torch.equal(r0["biases"][layer], r1["biases"][layer])
        expected = torch.zeros(4)
        for step in range(6):
            expected = bias_update(expected, r0["loads"][step][layer] + r1["loads"][step][layer], 0.05)
        torch.testing.assert_close(r0["biases"][layer], expected)
    assert torch.equal(r0["weights"], r1["weights"])


@pytest.mark.distributed
def test_dead_expert_windows_are_counted_over_both_ranks(ranks: list[dict]) -> None:
    r0, r1 = ranks
    assert r0["dead"] == r1["dead"]
    window = sum(r0["loads"][3:6]) + sum(r1["loads"][3:6])  # the last window, both ranks
    expected = {f"model.blocks.{i}.ffn": torch.nonzero(window[i] / window[i].sum() < 0.25).flatten().tolist()
                for i in range(2)}
    assert r0["dead"] == {k: v for k, v in expected.items() if v}


@pytest.mark.distributed
def test_routing_metrics_are_reduced_across_ranks(ranks: list[dict]) -> None:
    r0, r1 = ranks
    assert r0["metrics"] and r0["metrics"] == r1["metrics"]
    last = r0["loads"][-1] + r1["loads"][-1]  # the last step, both ranks
    share = last[0].double() / last[0].sum()
    assert r0["metrics"]["routing/layer0/max_share"] == pytest.approx(float(share.max()), rel=1e-5)
    assert r0["metrics"]["routing/layer0/min_share"] == pytest.approx(float(share.min()), rel=1e-5)
