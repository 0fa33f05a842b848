"""User story: an MoE layer as a drop-in FFN in plain PyTorch, no Lightning.

Builds an MoELayer (8 SwiGLU experts, top-2), runs it on a batch, adds its balancing losses to the
training loss, and prints what the router did.

    python examples/plain_pytorch_layer.py
"""

import torch

from lightning_moe import MoELayer, SwitchAuxLoss, TopKRouter, ZLoss


def main() -> None:
    torch.manual_seed(0)
    d_model, d_ff, num_experts = 64, 128, 8
    layer = MoELayer(
        d_model, d_ff, num_experts,
        router=TopKRouter(d_model, num_experts, top_k=2),
        balancers=[SwitchAuxLoss(0.01), ZLoss(0.001)],
        dispatcher="grouped",
    )
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    x = torch.randn(4, 32, d_model)  # (batch, sequence, d_model)
    target = torch.randn_like(x)
    for step in range(20):
        y = layer(x)  # same shape as x
        loss = torch.nn.functional.mse_loss(y, target) + sum(layer.aux_losses.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 5 == 0:
            stats = layer.stats
            aux = {k: round(v.item(), 5) for k, v in layer.aux_losses.items()}
            print(f"step {step:2d}  loss {loss.item():.4f}  aux {aux}  entropy {stats.entropy.item():.3f}  "
                  f"tokens/expert {stats.tokens_per_expert_E.tolist()}")


if __name__ == "__main__":
    main()
