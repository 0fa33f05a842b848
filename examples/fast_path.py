"""The fast path: pick a dispatcher, check it against the reference, and compile through the kernels.

``auto`` (the default) runs ``grouped`` on CPU and ``triton`` on a GPU. ``grouped`` is the CPU fast
path: one custom op, per-expert matmuls written into preallocated (recycled) buffers, small experts on
worker threads, no ``(tokens x K, D)`` tensor. ``triton`` runs the Triton kernels (permute, expert
GEMMs, unpermute; the router's fused top-k gating) on CUDA, the expert GEMMs on our Triton kernels or
torch's ``grouped_mm``, whichever measured faster (``triton-kernels`` / ``triton-grouped_mm`` force
one); elsewhere it says why and falls back to ``grouped``. Every backend computes the same function
as ``loop``, the readable reference, which this script checks, outputs and gradients.

    python examples/fast_path.py            # on a GPU machine the triton rows run the kernels
"""

import warnings

import torch

from lightning_moe import MoELayer, TopKRouter
from lightning_moe.dispatch.triton import fallback_reason

device = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
d_model, d_ff, experts, top_k = 64, 48, 16, 4  # fine-grained: many narrow experts, several per token
x = torch.randn(4, 32, d_model, device=device)
grad = torch.randn_like(x)


def run(dispatcher: str) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)  # the same weights for every backend
    layer = MoELayer(d_model, d_ff, experts, router=TopKRouter(d_model, experts, top_k=top_k),
                     dispatcher=dispatcher).to(device)
    inputs = x.clone().requires_grad_(True)
    layer(inputs).backward(grad)
    return layer(inputs).detach(), inputs.grad


reference = run("loop")
for name in ("auto", "grouped", "triton"):  # dispatcher "triton-kernels" / "triton-grouped_mm" force an engine
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y, dx = run(name)
    note = f" (fell back: {caught[0].message})" if caught else ""
    print(f"{name:8s} max |y - y_loop| = {(y - reference[0]).abs().max():.2e}, "
          f"max |dx - dx_loop| = {(dx - reference[1]).abs().max():.2e}{note}")
    torch.testing.assert_close(y, reference[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dx, reference[1], atol=1e-4, rtol=1e-4)

reason = fallback_reason(x.view(-1, d_model), MoELayer(d_model, d_ff, experts).experts)
print("Triton kernels:", "run here" if reason is None else f"not here: {reason}")
if reason is None:
    from lightning_moe.dispatch import engine_choices

    print("GEMM engine chosen by 'triton' (auto):", engine_choices())
