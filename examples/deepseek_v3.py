"""A tiny DeepSeek-V3 end to end: train it with latent attention and multi-token prediction, export it to
``transformers``' ``DeepseekV3ForCausalLM``, and bring a ``transformers`` model back.

    python examples/deepseek_v3.py [--max-steps 20] [--log-dir runs]
    tensorboard --logdir runs      # train/mtp_loss next to train/lm_loss

1. ``MoELanguageModel`` with ``attention="mla"`` (multi-head latent attention), ``mtp_depth=1`` (one
   multi-token-prediction module, λ = 0.3), the first layer dense, fine-grained routed experts plus a
   shared one, DeepSeek-V3's router (sigmoid scores, group-limited top-k, a selection bias moved by
   ``BiasOffsetUpdater``, routed scaling) and its sequence-wise balance loss, trained on the built-in
   corpus. The router scores the raw hidden states (``center_input=False``), as DeepSeek-V3's gate does,
   so that the model can be exported.
2. ``to_deepseek_v3`` builds a ``DeepseekV3ForCausalLM`` with the same logits (the MTP module, which
   ``transformers`` has no place for, is dropped with a warning) and ``from_deepseek_v3`` converts it back.
"""

from __future__ import annotations

import argparse
import functools
import warnings

from lightning_moe.extras import require

require("hf", "examples/deepseek_v3.py (transformers' DeepseekV3ForCausalLM)", modules=("transformers",))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402

from lightning_moe.balancing import SequenceAuxLoss  # noqa: E402
from lightning_moe.callbacks import BiasOffsetUpdater  # noqa: E402
from lightning_moe.data import TextDataModule  # noqa: E402
from lightning_moe.layers import MoEConfig  # noqa: E402
from lightning_moe.models import MLAConfig, from_deepseek_v3, to_deepseek_v3  # noqa: E402
from lightning_moe.module import MoELanguageModel  # noqa: E402
from lightning_moe.routing import GroupLimitedTopKRouter, LinearScorer  # noqa: E402

SEQ_LEN = 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--log-dir", default="runs")
    args = parser.parse_args()
    L.seed_everything(0)

    router = functools.partial(GroupLimitedTopKRouter, top_k=2, num_groups=4, topk_groups=2, group_score="top2_sum",
                               score_func="sigmoid", renormalize=True, scaling_factor=2.5, expert_bias=True,
                               scorer=functools.partial(LinearScorer, center_input=False))
    moe = MoEConfig(num_experts=16, expert_d_ff=64, router=router, num_shared_experts=1,
                    balancers=[SequenceAuxLoss(1e-4)])
    module = MoELanguageModel(max_seq_len=SEQ_LEN, d_model=64, n_layers=3, n_heads=4, d_ff=256, moe=moe,
                              first_dense_layers=1, attention="mla",
                              mla=MLAConfig(q_lora_rank=48, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16,
                                            v_head_dim=16),
                              tie_embeddings=False, mtp_depth=1, mtp_weight=0.3)
    model = module.model
    print(f"KV cache per token: {model.kv_cache_per_token()} elements over {model.n_layers} layers "
          f"(multi-head attention of the same width: {2 * model.d_model * model.n_layers})")
    print("parameters:", model.parameter_counts())

    trainer = L.Trainer(max_steps=args.max_steps, logger=TensorBoardLogger(args.log_dir, name="deepseek_v3"),
                        callbacks=[BiasOffsetUpdater(rate=0.001)], log_every_n_steps=5, limit_val_batches=2,
                        val_check_interval=args.max_steps, enable_checkpointing=False, enable_model_summary=False,
                        enable_progress_bar=False)
    trainer.fit(module, TextDataModule(seq_len=SEQ_LEN, batch_size=8))
    metrics = trainer.callback_metrics
    print(f"after {trainer.global_step} steps: train/lm_loss {float(metrics['train/lm_loss']):.3f}, "
          f"train/mtp_loss {float(metrics['train/mtp_loss']):.3f} (the token after next), "
          f"val/loss {float(metrics['val/loss']):.3f}")

    model.eval()
    ids = torch.randint(0, 256, (2, SEQ_LEN))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hf_model = to_deepseek_v3(model).eval()
    for warning in caught:
        print("warning:", warning.message)
    with torch.no_grad():
        ours, theirs = model(ids), hf_model(ids).logits
    difference = float((ours - theirs).abs().max())
    print(f"to_deepseek_v3: {type(hf_model).__name__}, max |logits difference| {difference:.2e}")

    back = from_deepseek_v3(hf_model).eval()
    with torch.no_grad():
        again = back(ids)
    print(f"from_deepseek_v3: max |logits difference| {float((again - theirs).abs().max()):.2e}")


if __name__ == "__main__":
    main()
