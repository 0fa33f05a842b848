"""The ``grouped`` custom op itself: experts split over worker threads or run one at a time give the
``loop`` reference's outputs and gradients; the worker pool survives ``fork``; a whole transformer
block compiles as one graph with inductor and equals eager."""

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from lightning_moe.balancing import SwitchAuxLoss, ZLoss
from lightning_moe.dispatch import grouped, grouped_swiglu
from lightning_moe.experts import SwiGLUExperts
from lightning_moe.layers import MoEConfig, MoELayer
from lightning_moe.models import MoETransformer
from lightning_moe.routing import TopKRouter


@pytest.fixture
def threads():
    """Run the test with the given number of torch threads, restoring the old number after."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def loop_reference(x_TD, weight_A, token_A, counts_E, w_gate, w_up, w_out):  # noqa: ANN001, ANN201
    """Plain autograd: each expert on its sorted rows, gated, added to its tokens."""
    y_TD = torch.zeros_like(x_TD)
    start = 0
    for expert, count in enumerate(counts_E.tolist()):
        rows = slice(start, start + count)
        x_nD = x_TD[token_A[rows]]
        out_nD = (torch.nn.functional.silu(x_nD @ w_gate[expert]) * (x_nD @ w_up[expert])) @ w_out[expert]
        y_TD = y_TD.index_add(0, token_A[rows], out_nD * weight_A[rows, None])
        start += count
    return y_TD


def random_assignments(tokens: int, experts: int, top_k: int, empty: tuple[int, ...] = ()):  # noqa: ANN201
    """Sorted (weight_A, token_A, counts_E): each token's top-k experts, never those in ``empty``."""
    logits = torch.randn(tokens, experts)
    logits[:, list(empty)] = -torch.inf
    top = logits.topk(top_k, dim=1)
    expert_A, token_A = top.indices.reshape(-1), torch.arange(tokens).repeat_interleave(top_k)
    order = torch.argsort(expert_A, stable=True)
    counts_E = torch.zeros(experts, dtype=torch.long).scatter_add_(0, expert_A, torch.ones_like(expert_A))
    return torch.rand(tokens * top_k, dtype=torch.float64)[order], token_A[order], counts_E


@pytest.mark.parametrize("workers", [1, 2, 3])
@pytest.mark.parametrize(("tokens", "d_model", "d_ff", "experts", "top_k", "empty"), [
    (37, 24, 40, 6, 2, ()), (64, 33, 17, 16, 4, (0, 5, 15)), (5, 7, 3, 9, 1, (1, 2, 3)), (50, 8, 12, 4, 1, (0, 1, 2)),
])
def test_matches_the_reference_split_over_workers_or_not(threads, monkeypatch, workers, tokens, d_model, d_ff,
                                                         experts, top_k, empty) -> None:
    threads(workers)
    monkeypatch.setattr(grouped, "PARALLEL_MAX_ROWS", 10**9)  # split whenever there are several threads
    monkeypatch.setattr(grouped, "PARALLEL_MIN_FLOPS", 0)
    torch.manual_seed(tokens + experts)
    weight_A, token_A, counts_E = random_assignments(tokens, experts, top_k, empty)
    expected_chunks = min(workers, int((counts_E > 0).sum()))
    assert len(grouped._chunks(grouped._expert_slices(counts_E.tolist()), torch.device("cpu"), 1)) == expected_chunks
    leaves = [torch.randn(tokens, d_model, dtype=torch.float64), weight_A,
              *(torch.randn(experts, *shape, dtype=torch.float64) / 4
                for shape in ((d_model, d_ff), (d_model, d_ff), (d_ff, d_model)))]
    grad_TD = torch.randn(tokens, d_model, dtype=torch.float64)
    results = []
    for function in (grouped_swiglu, loop_reference):
        inputs = [t.clone().requires_grad_() for t in leaves]
        x_TD, w_A, *weights = inputs
        y_TD = function(x_TD, w_A, token_A, counts_E, *weights)
        y_TD.backward(grad_TD)
        results.append([y_TD.detach(), *(t.grad for t in inputs)])
    for name, got, want in zip(["y", "x", "gates", "w_gate", "w_up", "w_out"], *results, strict=True):
        torch.testing.assert_close(got, want, msg=name)
    for e in empty:  # experts without rows: exactly zero gradients
        assert all(float(grad[e].abs().max()) == 0.0 for grad in results[0][3:]), e


def test_no_rows_at_all() -> None:
    # Every gate routed nowhere (all counts zero, A = 0): y is zero and so is every gradient.
    x_TD = torch.randn(6, 5, requires_grad=True)
    weights = [torch.randn(3, 5, 4, requires_grad=True), torch.randn(3, 5, 4, requires_grad=True),
               torch.randn(3, 4, 5, requires_grad=True)]
    empty = torch.zeros(0, dtype=torch.long)
    y_TD = grouped_swiglu(x_TD, torch.zeros(0), empty, torch.zeros(3, dtype=torch.long), *weights)
    y_TD.sum().backward()
    assert float(y_TD.abs().max()) == 0.0 and float(x_TD.grad.abs().max()) == 0.0
    assert all(float(w.grad.abs().max()) == 0.0 for w in weights)


def test_large_experts_and_little_work_run_one_at_a_time(threads) -> None:
    # Above PARALLEL_MAX_ROWS rows per expert each expert's matmuls get torch's own threads instead;
    # below PARALLEL_MIN_FLOPS of work threads cost more than they save.
    threads(2)
    few = grouped._expert_slices([grouped.PARALLEL_MAX_ROWS] * 4)
    many = grouped._expert_slices([grouped.PARALLEL_MAX_ROWS + 1] * 4)
    enough = -(-grouped.PARALLEL_MIN_FLOPS // (grouped.PARALLEL_MAX_ROWS * 4))  # FLOPs per row, just enough
    assert len(grouped._chunks(few, torch.device("cpu"), enough)) == 2
    assert len(grouped._chunks(few, torch.device("cpu"), enough - 1)) == 1
    assert len(grouped._chunks(many, torch.device("cpu"), enough)) == 1
    assert len(grouped._chunks(few, torch.device("meta"), enough)) == 1  # worker threads on CPU only


def test_worker_threads_are_balanced_by_rows_and_contiguous(threads) -> None:
    threads(2)
    slices = grouped._expert_slices([10, 0, 30, 5, 5, 10, 20])
    chunks = grouped._chunks(slices, torch.device("cpu"), 10**9)
    assert [[e for e, _ in c] for c in chunks] == [[0, 2], [3, 4, 5, 6]]  # 40 rows and 40 rows


def test_the_worker_pool_survives_fork(threads) -> None:
    # A pool made before fork has no threads in the child; the child must make its own, not hang.
    threads(2)
    script = textwrap.dedent("""
        import os, torch
        from lightning_moe.dispatch import grouped, grouped_swiglu
        grouped.PARALLEL_MAX_ROWS, grouped.PARALLEL_MIN_FLOPS = 10**9, 0
        torch.set_num_threads(2)
        x = torch.randn(20, 6); w = [torch.randn(4, 6, 5), torch.randn(4, 6, 5), torch.randn(4, 5, 6)]
        token_A = torch.arange(20); counts_E = torch.tensor([5, 5, 5, 5])
        y = grouped_swiglu(x, torch.ones(20), token_A, counts_E, *w)   # the parent's pool exists now
        assert grouped._pool is not None
        pid = os.fork()
        if pid == 0:
            ok = torch.equal(grouped_swiglu(x, torch.ones(20), token_A, counts_E, *w), y)
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        raise SystemExit(os.waitstatus_to_exitcode(status))
    """)
    result = subprocess.run([sys.executable, "-c", script], timeout=120, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert result.returncode == 0, result.stderr[-2000:]


def test_a_layer_whose_input_needs_no_gradient() -> None:
    # An input without grad (no dx computed): the op still gives the weights' and router's gradients.
    torch.manual_seed(0)
    layer = MoELayer(16, 24, 6, router=TopKRouter(16, 6, top_k=2))
    ref = copy.deepcopy(layer)
    ref.dispatcher = "loop"
    x = torch.randn(30, 16)
    layer(x).square().sum().backward()
    ref(x).square().sum().backward()
    for (name, p), q in zip(layer.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    assert isinstance(layer.experts, SwiGLUExperts)


def test_a_whole_block_compiles_as_one_graph_with_inductor_and_equals_eager() -> None:
    # The dispatch custom op reads the expert counts inside itself: no graph break anywhere in the
    # block (attention, router, balancers, routing statistics, grouped experts).
    torch.manual_seed(0)
    model = MoETransformer(vocab_size=64, max_seq_len=16, d_model=32, n_layers=1, n_heads=4, d_ff=64,
                           moe=MoEConfig(num_experts=4, expert_d_ff=32, balancers=[SwitchAuxLoss(0.01), ZLoss(0.001)]))
    eager = model.blocks[0]
    compiled = copy.deepcopy(eager)
    run = torch.compile(compiled, fullgraph=True, backend="inductor")
    for step in range(2):
        x = torch.randn(2, 16, 32)
        outputs = []
        for block, call in ((eager, eager), (compiled, run)):
            block.zero_grad(set_to_none=True)
            x_in = x.clone().requires_grad_()
            y = call(x_in)
            (y.square().mean() + sum(block.ffn.aux_losses.values())).backward()
            outputs.append((y.detach(), x_in.grad, dict(block.ffn.aux_losses), block.ffn.stats))
        (y_e, dx_e, aux_e, stats_e), (y_c, dx_c, aux_c, stats_c) = outputs
        torch.testing.assert_close(y_c, y_e, msg=f"step {step}")
        torch.testing.assert_close(dx_c, dx_e)
        assert aux_c.keys() == aux_e.keys() == {"aux_loss", "z_loss"}
        for name in aux_e:
            torch.testing.assert_close(aux_c[name].detach(), aux_e[name].detach())
        assert torch.equal(stats_c.tokens_per_expert_E, stats_e.tokens_per_expert_E)
        for (name, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
            torch.testing.assert_close(q.grad, p.grad, msg=name)


def test_autocast_reaches_the_experts() -> None:
    # Under bfloat16 autocast the experts compute in bfloat16, as a dense F.linear would, and the
    # float32 weights still get float32 gradients.
    torch.manual_seed(0)
    layer = MoELayer(16, 24, 4, router=TopKRouter(16, 4, top_k=2))
    x = torch.randn(12, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert layer.experts.w_gate_EDF.grad.dtype == torch.float32
    torch.testing.assert_close(y.float(), layer(x).detach(), atol=0.05, rtol=0.05)


# Recycled buffers: layers big enough that every buffer is recycled (RECYCLE_MIN_BYTES lowered).

@pytest.fixture
def recycle_everything(monkeypatch):
    monkeypatch.setattr(grouped, "RECYCLE_MIN_BYTES", 1)


def _layer_pair(seed: int = 0) -> tuple[MoELayer, MoELayer]:
    torch.manual_seed(seed)
    layer = MoELayer(16, 24, 6, router=TopKRouter(16, 6, top_k=2))
    reference = copy.deepcopy(layer)
    reference.dispatcher = "loop"
    return layer, reference


def test_recycled_gradients_reuse_storage_once_zero_grad_dropped_them(recycle_everything) -> None:
    layer, _ = _layer_pair()
    x = torch.randn(40, 16)
    pointers = []
    for _ in range(3):
        layer.zero_grad(set_to_none=True)
        layer(x).square().sum().backward()
        pointers.append(layer.experts.w_gate_EDF.grad.data_ptr())
    kept = grouped._recycled[layer.experts.w_gate_EDF]["d_w_gate"]  # (malloc may reuse an address by itself)
    assert pointers[0] == pointers[1] == pointers[2] == kept.data_ptr()  # the same storage: no fresh pages


def test_a_gradient_someone_still_holds_is_never_overwritten(recycle_everything) -> None:
    layer, reference = _layer_pair()
    x1, x2 = torch.randn(40, 16), torch.randn(40, 16)
    layer(x1).square().sum().backward()
    held = layer.experts.w_gate_EDF.grad  # the user keeps the tensor itself
    snapshot = held.clone()
    layer.zero_grad(set_to_none=True)
    layer(x2).square().sum().backward()
    assert torch.equal(held, snapshot)
    assert layer.experts.w_gate_EDF.grad.data_ptr() != held.data_ptr()
    reference(x2).square().sum().backward()
    torch.testing.assert_close(layer.experts.w_gate_EDF.grad, reference.experts.w_gate_EDF.grad)


def test_gradients_kept_between_steps_accumulate(recycle_everything) -> None:
    # zero_grad(set_to_none=False) / gradient accumulation: w.grad holds the kept storage, so the
    # next gradient is fresh and autograd adds it in place; the sum is right.
    layer, reference = _layer_pair()
    xs = [torch.randn(40, 16) for _ in range(3)]
    for model in (layer, reference):
        for x in xs:
            model(x).square().sum().backward()
    for (name, p), q in zip(layer.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_a_layer_called_twice_in_one_step_and_checkpointed(recycle_everything) -> None:
    # Two forwards before one backward (shared weights), and non-reentrant activation
    # checkpointing (the forward runs again inside the backward): saved activations and gradients
    # still in use are never reused.
    from torch.utils.checkpoint import checkpoint

    layer, reference = _layer_pair()
    x1, x2 = torch.randn(40, 16), torch.randn(40, 16)
    for model in (layer, reference):
        y = model(x1) + checkpoint(model, model(x2), use_reentrant=False)
        y.square().sum().backward()
    for (name, p), q in zip(layer.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_an_output_someone_holds_is_never_overwritten(recycle_everything) -> None:
    layer, _ = _layer_pair()
    with torch.no_grad():
        y1 = layer(torch.randn(40, 16))
        snapshot = y1.clone()
        y2 = layer(torch.randn(40, 16))
    assert torch.equal(y1, snapshot) and not torch.equal(y1, y2)


@pytest.mark.parametrize("workers", [1, 2])
def test_inference_mode_then_training(threads, monkeypatch, recycle_everything, workers) -> None:
    # Lightning validates under inference_mode: worker threads take the caller's mode over, and no
    # buffer made there (an inference tensor) is written by a later training step.
    threads(workers)
    monkeypatch.setattr(grouped, "PARALLEL_MAX_ROWS", 10**9)
    monkeypatch.setattr(grouped, "PARALLEL_MIN_FLOPS", 0)
    layer, reference = _layer_pair()
    x = torch.randn(40, 16)
    with torch.inference_mode():
        y_inference = layer(x)
    torch.testing.assert_close(y_inference, reference(x).detach())
    for model in (layer, reference):
        model(x).square().sum().backward()
    for (name, p), q in zip(layer.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
