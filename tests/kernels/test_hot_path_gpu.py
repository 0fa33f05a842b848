"""The dropless hot path on a GPU: a whole MoE layer's forward and backward with no host sync, and
captured in one CUDA graph (replays equal eager). Marked ``gpu``: skipped without CUDA.

The CPU side of the same contract (no graph break: the layer and a whole transformer block compile
with ``fullgraph=True``) is tested in ``tests/dispatch/test_grouped.py`` and
``tests/kernels/test_triton_dispatch.py``.
"""

import pytest
import torch

from lightning_moe.balancing import SwitchAuxLoss, ZLoss
from lightning_moe.layers import MoELayer
from lightning_moe.routing import TopKRouter

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DISPATCHERS = ["triton", "triton-kernels", "triton-grouped_mm"]


def _layer(dispatcher: str) -> MoELayer:
    torch.manual_seed(0)
    layer = MoELayer(256, 128, 8, router=TopKRouter(256, 8, top_k=2), dispatcher=dispatcher,
                     balancers=[SwitchAuxLoss(0.01), ZLoss(0.001)])
    return layer.to("cuda", torch.bfloat16)


def _step(layer: MoELayer, x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    y = layer(x)
    (torch.autograd.backward([y, *layer.aux_losses.values()], [dy, *(None,) * len(layer.aux_losses)]))
    return y


@pytest.mark.parametrize("dispatcher", DISPATCHERS)
def test_layer_forward_and_backward_make_no_host_sync(dispatcher: str) -> None:
    layer = _layer(dispatcher)
    x = torch.randn(2, 512, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)
    for _ in range(2):  # Triton autotuning and the engine choice sync: warm up first
        _step(layer, x, dy)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        layer.zero_grad(set_to_none=True)
        _step(layer, x, dy)
        stats = layer.stats  # recording the statistics must not sync either
        assert stats is not None
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("dispatcher", DISPATCHERS)
def test_layer_forward_and_backward_replay_from_one_cuda_graph(dispatcher: str) -> None:
    layer = _layer(dispatcher)
    static_x = torch.randn(2, 512, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    static_dy = torch.randn_like(static_x)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (autotuning, engine choice) off the capture
        for _ in range(3):
            layer.zero_grad(set_to_none=True)
            static_x.grad = None
            _step(layer, static_x, static_dy)
    torch.cuda.current_stream().wait_stream(side)
    layer.zero_grad(set_to_none=True)
    static_x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = _step(layer, static_x, static_dy)

    for seed in (1, 2):
        torch.manual_seed(seed)
        new_x, new_dy = torch.randn_like(static_x), torch.randn_like(static_dy)
        with torch.no_grad():
            static_x.copy_(new_x)
            static_dy.copy_(new_dy)
        graph.replay()
        torch.cuda.synchronize()
        replayed = (static_y.clone(), static_x.grad.clone(), {n: p.grad.clone() for n, p in layer.named_parameters()})

        eager = _layer(dispatcher)
        eager.load_state_dict(layer.state_dict())
        x = new_x.clone().requires_grad_()
        y = _step(eager, x, new_dy)
        torch.testing.assert_close(replayed[0], y.detach(), atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(replayed[1], x.grad, atol=2e-2, rtol=2e-2)
        for name, p in eager.named_parameters():
            torch.testing.assert_close(replayed[2][name], p.grad, atol=5e-2, rtol=5e-2, msg=name)
