"""Expert parallelism with multi-head latent attention and multi-token prediction: a DDP fit with EP=2 on
two gloo processes matches one process with EP=1, the MTP block's MoE layer sharded like the others, with
BiasOffsetUpdater and DeadExpertDetector (found by discovery) running on every MoE layer.

The runs are ``ep_fit_worker.py`` (through ``test_expert_parallel_fit.fit``) with its model made an MLA
model with ``mtp_depth=1`` (``--model-kwargs``).
"""

import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # README: `-m 'not slow'` leaves these out

MLA = dict(q_lora_rank=12, kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=6, v_head_dim=8)


@pytest.mark.distributed
def test_ddp_ep2_with_mla_and_mtp_matches_one_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    import test_expert_parallel_fit as ep_fit

    model = json.dumps({"attention": "mla", "mla": MLA, "mtp_depth": 1})
    args = ("--callbacks", "--steps", "3", "--model-kwargs", model)
    # 3 steps: after 4 the +-0.05 bias updates happen to bring every bias back to 0 here; after 3 none is 0.
    one = ep_fit.fit(tmp_path / "ep1", "single", 1, *args)[0]
    two = ep_fit.fit(tmp_path / "ep2", "ddp", 2, *args, processes=2)

    assert len(one["losses"]) == 3
    assert ep_fit.mean_losses(two) == pytest.approx(one["losses"], rel=ep_fit.LOSS_TOL, abs=ep_fit.LOSS_TOL)
    assert one["expert_shapes"]["model.mtp.0.block.ffn.experts.w_gate_EDF"] == (4, 16, 8)
    assert len(one["biases"]) == 3  # two layers' routers and the MTP block's
    assert one["revived"] > 0 and all(rank["revived"] == one["revived"] for rank in two)
    for rank in two:
        assert rank["expert_shapes"]["model.blocks.0.ffn.experts.w_gate_EDF"] == (2, 16, 8)  # 4 experts over 2
        assert rank["expert_shapes"]["model.mtp.0.block.ffn.experts.w_gate_EDF"] == (2, 16, 8)
        for bias, expected in zip(rank["biases"], one["biases"], strict=True):
            assert torch.equal(bias, expected) and bias.abs().sum() > 0
        torch.testing.assert_close(rank["logits"], one["logits"], rtol=0, atol=1e-5)
