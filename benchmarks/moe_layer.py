"""Forward+backward time and memory of MoELayer against a dense SwiGLU of the same active FLOPs and other MoEs.

Every path computes ``y = f(x)`` for ``x`` of shape (T, D) and back-propagates one real incoming gradient
(not an expanded one) into the input and the weights. The paths, all in this one process and interleaved
round by round (these machines are noisy; the order rotates each round):

- ``dense``: ``lightning_moe.experts.SwiGLU(D, K*F)``. Per token it does exactly the expert matmuls of K
  experts of width F, so it is the reference: every ratio is relative to it.
- ours: ``MoELayer(D, F, E, router=TopKRouter(D, E, top_k=K), dispatcher=NAME)``, one row per name in
  ``--ours`` (default ``grouped``, plus ``triton`` on CUDA; names missing from
  ``lightning_moe.dispatch.DISPATCHERS`` are skipped with a note). Our ``grouped`` layer is the weight
  source of every MoE path below, and the reference their outputs are checked against before timing.
- ``hf-eager``, ``hf-grouped_mm`` (``--hf``): transformers' ``MixtralSparseMoeBlock`` with our weights
  (router ``gate.weight``; experts fused ``gate_up_proj`` (E, 2F, D) and ``down_proj`` (E, D, F)), the
  experts implementation chosen by ``config._experts_implementation`` (transformers 5.x). Mixtral routes
  like our default ``TopKRouter``: softmax, top-k, renormalise.
- ``deepspeed``: DeepSpeed-MoE's ``sharded_moe.MOELayer`` with its ``TopKGate`` (k=K,
  ``--ds-capacity-factor``, second expert by plain top-2 rather than Gumbel sampling) and experts
  ``deepspeed.moe.experts.Experts(SwiGLU(D, F), E)``; ``deepspeed-dropless`` is the same with
  ``drop_tokens=False``. The fraction of assignments dropped by capacity is printed, and the output check
  covers the tokens that kept all K. One process: ``ep_size=1`` in a single-process gloo group,
  ``DS_ACCELERATOR=cpu`` on CPU. (With K=1 DeepSpeed does not renormalise the gate, so its check fails.)
- ``torch-grouped_mm``: softmax/top-k routing, sort by expert, one gather, ``F.grouped_mm`` (or
  ``torch._grouped_mm``) for the fused gate/up and the down projections, one scatter-add. Skipped where a
  tiny fwd+bwd probe of that op fails on this device/dtype.
- ``sort-loop``: the simple baseline: argsort by expert, one ``index_select``, then for each expert
  ``F.silu(x @ wg) * (x @ wu) @ wo`` on its ``split`` slice in a Python loop (weights ``unbind`` once, so
  the backward is one stack rather than E full-size zero gradients), one ``index_add``.
- ``dense-bf16-mm`` (CUDA; or by ``--only``): one bf16 matmul (T, D) @ (D, 9*K*F), which has the total
  active FLOPs of the fwd+bwd, forward only: the speed-of-light reference for "at least 60% of a dense
  bf16 matmul".

A path that cannot be built or whose forward fails is skipped with a note under the table. On CPU,
``hf-eager``'s backward indexes one expert at a time out of the fused weights and so writes E full-size
zero gradients: at E=128..256 it takes seconds per step (``--only`` leaves it out).

Active FLOPs: the forward does 3 matmuls of ``2*T*K*D*F`` FLOPs, the backward twice that; 18*T*K*D*F in
all (the router is not counted). On CUDA each timing is bracketed by ``torch.cuda.synchronize`` and the
table adds achieved TFLOP/s and the ratio to ``dense-bf16-mm``.

Peak memory (``peak MB``): the extra memory of one fwd+bwd over what is allocated before it (weights and
inputs; the previous step's gradients freed with ``zero_grad(set_to_none=True)``), so parameter
gradients count in it. On CUDA: ``max_memory_allocated`` after ``reset_peak_memory_stats``, minus
``memory_allocated`` before. On CPU torch keeps no allocator statistics, so each path runs in a fresh
subprocess (this script re-invoked with a hidden flag): build the module and inputs, one warm-up
fwd+bwd, free the gradients, ``malloc_trim``, read ``VmRSS``, reset the RSS high-water mark
(``/proc/self/clear_refs``), one fwd+bwd, then high-water (``VmHWM``; ``ru_maxrss`` where the reset is
refused) minus that RSS. Our ``grouped`` op keeps its large CPU buffers between steps (recycled
rather than page-faulted afresh); they are released before the measured step, so it counts them like
every other path's allocations. It is approximate (allocator caching, page granularity) but comparable across
paths. ``--no-memory`` skips it.

    python benchmarks/moe_layer.py                          # C1: T=4096 D=512 E=8 K=2 F=1024, float32
    python benchmarks/moe_layer.py --config C2              # T=4096 D=512 E=64 K=8 F=128
    python benchmarks/moe_layer.py --config sweep           # T=4096 D=512 K=2 F=256, E in 8, 32, 128, 256
    python benchmarks/moe_layer.py --config all --device cuda --dtype bfloat16
    python benchmarks/moe_layer.py --experts 64 --top-k 8 --d-ff 128 --only grouped,sort-loop
    python benchmarks/moe_layer.py --config C2 --tokens 512 --rounds 2   # explicit values override a config
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import functools
import gc
import importlib.metadata
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_moe.dispatch import DISPATCHERS, release_recycled_buffers
from lightning_moe.experts import SwiGLU
from lightning_moe.layers import MoELayer
from lightning_moe.routing import LinearScorer, TopKRouter


@dataclass(frozen=True)
class Shape:
    name: str
    tokens: int
    d_model: int
    experts: int
    top_k: int
    d_ff: int

    @property
    def active_flops(self) -> float:
        """Forward 3 matmuls of 2*T*K*D*F FLOPs, backward twice that."""
        return 18.0 * self.tokens * self.top_k * self.d_model * self.d_ff

    def describe(self) -> str:
        label = f" ({self.name})" if self.name else ""
        return f"T={self.tokens} D={self.d_model} E={self.experts} K={self.top_k} F={self.d_ff}{label}"


CONFIGS: dict[str, list[Shape]] = {
    "C1": [Shape("C1", 4096, 512, 8, 2, 1024)],
    "C2": [Shape("C2", 4096, 512, 64, 8, 128)],
    "sweep": [Shape(f"sweep E={e}", 4096, 512, e, 2, 256) for e in (8, 32, 128, 256)],
}
CONFIGS["all"] = CONFIGS["C1"] + CONFIGS["C2"] + CONFIGS["sweep"]
FIXED_PATHS = ("dense", "deepspeed", "deepspeed-dropless", "torch-grouped_mm", "sort-loop", "dense-bf16-mm")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class Skip(Exception):
    """A path that cannot run here; the message says why."""


# ----------------------------------------------------------------------------------------------- paths


def _router(shape: Shape) -> TopKRouter:
    # Uncentred, as Mixtral's gate and every alternative here route: their outputs are compared with ours.
    return TopKRouter(shape.d_model, shape.experts, top_k=shape.top_k,
                      scorer=functools.partial(LinearScorer, center_input=False))


def softmax_topk(x_TD: Tensor, router_ED: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """Mixtral's (and our default TopKRouter's) routing: float32 softmax, top-k, renormalise."""
    probs_TE = F.linear(x_TD.float(), router_ED.float()).softmax(dim=-1)
    weight_TK, expert_TK = probs_TE.topk(top_k, dim=-1)
    return weight_TK / weight_TK.sum(dim=-1, keepdim=True), expert_TK


class SortLoop(nn.Module):
    """Argsort by expert, one gather, a Python loop of per-expert SwiGLUs on ``split`` slices, one scatter-add."""

    def __init__(self, reference: MoELayer, top_k: int) -> None:
        super().__init__()
        experts = reference.experts
        self.top_k = top_k
        self.router_ED = nn.Parameter(reference.router.scorer.weight_ED.detach().clone())
        self.w_gate_EDF = nn.Parameter(experts.w_gate_EDF.detach().clone())
        self.w_up_EDF = nn.Parameter(experts.w_up_EDF.detach().clone())
        self.w_out_EFD = nn.Parameter(experts.w_out_EFD.detach().clone())

    def forward(self, x_TD: Tensor) -> Tensor:
        weight_TK, expert_TK = softmax_topk(x_TD, self.router_ED, self.top_k)
        expert_A = expert_TK.reshape(-1)
        order_A = torch.argsort(expert_A, stable=True)
        token_A = order_A // self.top_k
        counts = torch.bincount(expert_A, minlength=self.w_gate_EDF.shape[0]).tolist()
        x_AD = x_TD.index_select(0, token_A)
        weights = zip(self.w_gate_EDF.unbind(0), self.w_up_EDF.unbind(0), self.w_out_EFD.unbind(0), strict=True)
        outputs = [(F.silu(x_ND @ wg) * (x_ND @ wu)) @ wo
                   for x_ND, (wg, wu, wo) in zip(x_AD.split(counts), weights, strict=True)]
        out_AD = torch.cat(outputs) * weight_TK.reshape(-1)[order_A].unsqueeze(-1).to(x_TD.dtype)
        return torch.zeros_like(x_TD).index_add(0, token_A, out_AD)


def grouped_mm_op() -> Callable[..., Tensor] | None:
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


class TorchGroupedMM(nn.Module):
    """Sort by expert, then ``grouped_mm`` over all experts at once: fused gate/up (E, 2F, D), down (E, D, F).

    Weights are stored (E, out, in) and passed transposed, the layout transformers' ``grouped_mm`` experts
    use. The group offsets are a device-side cumsum: no host sync.
    """

    def __init__(self, reference: MoELayer, top_k: int) -> None:
        super().__init__()
        experts = reference.experts
        self.top_k = top_k
        self.num_experts = experts.num_experts
        self.router_ED = nn.Parameter(reference.router.scorer.weight_ED.detach().clone())
        gate_up = torch.cat([experts.w_gate_EDF.detach().transpose(1, 2), experts.w_up_EDF.detach().transpose(1, 2)], 1)
        self.w_gate_up_E2FD = nn.Parameter(gate_up.contiguous())
        self.w_down_EDF = nn.Parameter(experts.w_out_EFD.detach().transpose(1, 2).contiguous())

    def forward(self, x_TD: Tensor) -> Tensor:
        gmm = grouped_mm_op()
        weight_TK, expert_TK = softmax_topk(x_TD, self.router_ED, self.top_k)
        expert_A = expert_TK.reshape(-1)
        order_A = torch.argsort(expert_A, stable=True)
        token_A = order_A // self.top_k
        offsets_E = torch.bincount(expert_A, minlength=self.num_experts).cumsum(0).to(torch.int32)
        x_AD = x_TD.index_select(0, token_A)
        gate_AF, up_AF = gmm(x_AD, self.w_gate_up_E2FD.transpose(-2, -1), offs=offsets_E).chunk(2, dim=-1)
        out_AD = gmm(F.silu(gate_AF) * up_AF, self.w_down_EDF.transpose(-2, -1), offs=offsets_E)
        out_AD = out_AD * weight_TK.reshape(-1)[order_A].unsqueeze(-1).to(out_AD.dtype)
        return torch.zeros_like(x_TD).index_add(0, token_A, out_AD.to(x_TD.dtype))


def probe_grouped_mm(shape: Shape, device: torch.device, dtype: torch.dtype) -> None:
    """A tiny fwd+bwd of ``grouped_mm`` with this shape's widths, dtype and device; ``Skip`` if it fails."""
    gmm = grouped_mm_op()
    if gmm is None:
        raise Skip(f"torch {torch.__version__} has neither torch.nn.functional.grouped_mm nor torch._grouped_mm")
    d, f = shape.d_model, shape.d_ff
    try:
        x = torch.randn(16, d, device=device, dtype=dtype, requires_grad=True)
        w = torch.randn(2, 2 * f, d, device=device, dtype=dtype, requires_grad=True)
        offsets = torch.tensor([5, 16], device=device, dtype=torch.int32)
        y = gmm(x, w.transpose(-2, -1), offs=offsets)
        y.backward(torch.randn_like(y))
        expected = torch.cat([x[:5] @ w[0].T, x[5:] @ w[1].T])
        error_norm = (y.float() - expected.float()).norm() / expected.float().norm()
        if not error_norm <= 1e-2:
            raise RuntimeError(f"wrong result (relative error {error_norm:.1e})")
    except Exception as error:  # NotImplementedError, RuntimeError (strides, dtype, compute capability)
        name = "torch.nn.functional.grouped_mm" if gmm is getattr(F, "grouped_mm", None) else "torch._grouped_mm"
        raise Skip(f"{name} fails on {device.type} {dtype} ({type(error).__name__}: {error})") from None


class HFBlock(nn.Module):
    """transformers' MixtralSparseMoeBlock behind the (T, D) -> (T, D) interface."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x_TD: Tensor) -> Tensor:
        return self.block(x_TD.unsqueeze(0)).squeeze(0)


def build_hf(impl: str, shape: Shape, reference: MoELayer) -> nn.Module:
    try:
        from transformers.models.mixtral.configuration_mixtral import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except Exception as error:
        raise Skip(f"transformers' Mixtral cannot be imported ({type(error).__name__}: {error})") from None
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

        registered = getattr(ALL_EXPERTS_FUNCTIONS, "valid_keys", None)
        known = ["eager", *(registered() if registered else ALL_EXPERTS_FUNCTIONS._global_mapping)]
    except Exception:  # transformers without the experts interface (4.x)
        known = ["eager"]
    if impl not in known:
        raise Skip(f"experts implementation {impl!r} not in this transformers ({known})")
    config = MixtralConfig(hidden_size=shape.d_model, intermediate_size=shape.d_ff, num_local_experts=shape.experts,
                           num_experts_per_tok=shape.top_k, router_jitter_noise=0.0, num_hidden_layers=1,
                           num_attention_heads=1, num_key_value_heads=1)
    config._experts_implementation = impl
    block = MixtralSparseMoeBlock(config)
    experts = block.experts
    if not hasattr(experts, "gate_up_proj"):
        raise Skip("this transformers stores Mixtral experts as a list of modules, not fused 3-D weights")
    ours = reference.experts
    with torch.no_grad():
        block.gate.weight.copy_(reference.router.scorer.weight_ED)
        experts.gate_up_proj.copy_(torch.cat([ours.w_gate_EDF.transpose(1, 2), ours.w_up_EDF.transpose(1, 2)], 1))
        experts.down_proj.copy_(ours.w_out_EFD.transpose(1, 2))
    return HFBlock(block)


def init_single_process_group() -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


class DeepSpeedMoE(nn.Module):
    """DeepSpeed-MoE's MOELayer (ep_size 1) behind the (T, D) -> (T, D) interface."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x_TD: Tensor) -> Tensor:
        return self.layer(x_TD, None)  # the second input is DeepSpeed's `used_token` mask

    @torch.no_grad()
    def kept_per_token(self, x_TD: Tensor) -> Tensor:
        """(T,) assignments of each token that the capacity limit kept."""
        gate = self.layer.gate
        try:  # DeepSpeed with sparse routes: (l_aux, C, E, indices (K, T) with -1 = dropped, ...)
            indices_KT = gate(x_TD, None, True)[3]
            return (indices_KT >= 0).sum(0)
        except TypeError:  # older DeepSpeed: (l_aux, combine_weights, dispatch_mask (T, E, C), exp_counts)
            return gate(x_TD)[2].sum((1, 2))


def build_deepspeed(dropless: bool, shape: Shape, reference: MoELayer, device: torch.device,
                    capacity_factor: float) -> DeepSpeedMoE:
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import inspect

        from deepspeed.moe.experts import Experts
        from deepspeed.moe.sharded_moe import MOELayer, TopKGate
    except Exception as error:
        raise Skip(f"DeepSpeed cannot be imported ({type(error).__name__}: {error})") from None
    parameters = inspect.signature(TopKGate).parameters
    if dropless and "drop_tokens" not in parameters:
        raise Skip("this DeepSpeed's TopKGate has no drop_tokens argument")
    init_single_process_group()
    kwargs = {"drop_tokens": not dropless} if "drop_tokens" in parameters else {}
    if "top2_2nd_expert_sampling" in parameters:
        kwargs["top2_2nd_expert_sampling"] = False  # plain top-2, as every other path routes
    # min_capacity=4 is deepspeed.moe.layer.MoE's default.
    gate = TopKGate(shape.d_model, shape.experts, k=shape.top_k, capacity_factor=capacity_factor,
                    eval_capacity_factor=capacity_factor, min_capacity=4, **kwargs)
    experts = Experts(SwiGLU(shape.d_model, shape.d_ff), num_local_experts=shape.experts)
    ours = reference.experts
    with torch.no_grad():
        gate.wg.weight.copy_(reference.router.scorer.weight_ED)
        for e, expert in enumerate(experts.deepspeed_experts):
            expert.gate.weight.copy_(ours.w_gate_EDF[e].T)
            expert.up.weight.copy_(ours.w_up_EDF[e].T)
            expert.out.weight.copy_(ours.w_out_EFD[e].T)
    return DeepSpeedMoE(MOELayer(gate, experts, "ep_size_1", 1, shape.experts))


class DenseMatmul(nn.Module):
    """One bf16 (T, D) @ (D, 9*K*F) matmul: 18*T*K*D*F FLOPs, the fwd+bwd's active FLOPs. Forward only."""

    forward_only = True

    def __init__(self, shape: Shape, device: torch.device) -> None:
        super().__init__()
        self.register_buffer("a", torch.randn(shape.tokens, shape.d_model, device=device, dtype=torch.bfloat16))
        self.register_buffer("b", torch.randn(shape.d_model, 9 * shape.top_k * shape.d_ff, device=device,
                                              dtype=torch.bfloat16))

    def forward(self, x_TD: Tensor) -> Tensor:
        return self.a @ self.b


def build_reference(shape: Shape, device: torch.device, dtype: torch.dtype) -> MoELayer:
    """Our grouped layer, seed 0: the weights of every MoE path."""
    torch.manual_seed(0)
    layer = MoELayer(shape.d_model, shape.d_ff, shape.experts,
                     router=_router(shape), dispatcher="grouped")
    return layer.to(device=device, dtype=dtype)


def build_path(name: str, shape: Shape, reference: MoELayer, device: torch.device, dtype: torch.dtype,
               args: argparse.Namespace) -> nn.Module:
    """The module of path ``name`` on ``device``/``dtype``; raises ``Skip`` when it cannot run here."""
    if name == "dense":
        torch.manual_seed(2)
        return SwiGLU(shape.d_model, shape.top_k * shape.d_ff).to(device=device, dtype=dtype)
    if name == "dense-bf16-mm":
        return DenseMatmul(shape, device)
    if name == "sort-loop":
        return SortLoop(reference, shape.top_k)
    if name == "torch-grouped_mm":
        probe_grouped_mm(shape, device, dtype)
        return TorchGroupedMM(reference, shape.top_k)
    if name.startswith("hf-"):
        return build_hf(name[3:], shape, reference).to(device=device, dtype=dtype)
    if name in ("deepspeed", "deepspeed-dropless"):
        module = build_deepspeed(name == "deepspeed-dropless", shape, reference, device, args.ds_capacity_factor)
        return module.to(device=device, dtype=dtype)
    if name not in DISPATCHERS:
        raise Skip(f"no dispatcher {name!r} in lightning_moe.dispatch.DISPATCHERS ({sorted(DISPATCHERS)})")
    if name == "grouped":
        return reference
    layer = MoELayer(shape.d_model, shape.d_ff, shape.experts,
                     router=_router(shape), dispatcher=name)
    layer = layer.to(device=device, dtype=dtype)
    layer.load_state_dict(reference.state_dict())
    return layer


def make_inputs(shape: Shape, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(shape.tokens, shape.d_model, generator=generator).to(device=device, dtype=dtype)
    grad = torch.randn(shape.tokens, shape.d_model, generator=generator).to(device=device, dtype=dtype)
    return x.requires_grad_(), grad  # a real (not expanded) incoming gradient


# ---------------------------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fwd_bwd(module: nn.Module, x: Tensor, grad: Tensor) -> None:
    y = module(x)
    if not getattr(module, "forward_only", False):
        y.backward(grad)


def clear_grads(module: nn.Module, x: Tensor) -> None:
    module.zero_grad(set_to_none=True)
    x.grad = None


def fwd_bwd_seconds(module: nn.Module, x: Tensor, grad: Tensor, device: torch.device) -> float:
    clear_grads(module, x)
    synchronize(device)
    start = time.perf_counter()
    fwd_bwd(module, x, grad)
    synchronize(device)
    return time.perf_counter() - start


def cuda_peak_mb(module: nn.Module, x: Tensor, grad: Tensor, device: torch.device) -> float:
    clear_grads(module, x)
    gc.collect()
    synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fwd_bwd(module, x, grad)
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    clear_grads(module, x)
    return peak / 2**20


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def cpu_peak_mb_here(module: nn.Module, x: Tensor, grad: Tensor) -> float:
    """In a fresh process: warm-up step, free grads, RSS; one step; RSS high-water minus that RSS."""
    fwd_bwd(module, x, grad)
    clear_grads(module, x)
    # Our grouped op keeps its large CPU buffers (gradients, activations) between steps; dropped
    # here, so the measured step allocates them as every other path allocates its own.
    release_recycled_buffers()
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back, so the step's growth shows
    except (OSError, AttributeError):
        pass
    rss_kb = _proc_status_kb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # reset the RSS high-water mark (VmHWM) to the current RSS
        reset = True
    except OSError:
        reset = False
    fwd_bwd(module, x, grad)
    peak_kb = _proc_status_kb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max(peak_kb - rss_kb, 0) / 1024


def cpu_peak_mb_subprocess(name: str, shape: Shape, args: argparse.Namespace) -> tuple[float | None, str]:
    command = [sys.executable, os.path.abspath(__file__), "--memory-child", name, "--device", "cpu",
               "--dtype", args.dtype, "--tokens", str(shape.tokens), "--d-model", str(shape.d_model),
               "--experts", str(shape.experts), "--top-k", str(shape.top_k), "--d-ff", str(shape.d_ff),
               "--ds-capacity-factor", str(args.ds_capacity_factor)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    result = subprocess.run(command, capture_output=True, text=True)
    for line in result.stdout.splitlines():
        if line.startswith("PEAK_MB "):
            return float(line.split()[1]), ""
    tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
    return None, f"memory child exited {result.returncode}: {tail}"


def memory_child(args: argparse.Namespace) -> None:
    shape = explicit_shape(args, CONFIGS["C1"][0])
    device, dtype = torch.device("cpu"), DTYPES[args.dtype]
    reference = build_reference(shape, device, dtype)
    module = build_path(args.memory_child, shape, reference, device, dtype, args)
    del reference
    x, grad = make_inputs(shape, device, dtype)
    print(f"PEAK_MB {cpu_peak_mb_here(module, x, grad):.3f}", flush=True)


# ----------------------------------------------------------------------------------------------- checks


def check_outputs(name: str, module: nn.Module, x: Tensor, y_ref: Tensor, dtype: torch.dtype) -> tuple[str, bool]:
    """Compare with our grouped layer's output once before timing; DeepSpeed with drops: kept tokens only."""
    with torch.no_grad():
        y = module(x).float()
    rows = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    extra = ""
    if isinstance(module, DeepSpeedMoE):
        kept = module.kept_per_token(x)
        top_k = module.layer.gate.k
        dropped = 1.0 - kept.sum().item() / (x.shape[0] * top_k)
        rows = kept == top_k
        extra = f"; dropped {dropped:.2%} of assignments"
        if not dropless(module):
            extra += (f" (capacity factor {module.layer.gate.capacity_factor}); compared on the "
                      f"{int(rows.sum())} tokens that kept all {top_k}")
    diff = (y[rows] - y_ref[rows]).abs()
    max_diff = diff.max().item() if diff.numel() else 0.0
    rel = (diff.norm() / y_ref[rows].norm().clamp_min(1e-30)).item() if diff.numel() else 0.0
    # float32: the paths differ by summation order only. bfloat16: also by where they round, and a
    # near-tie in the router can flip one expert, so the relative norm is the test there.
    ok = max_diff <= 1e-4 if dtype == torch.float32 else rel <= 2e-2
    verdict = "OK" if ok else "MISMATCH"
    return f"check {name}: max |y - y_grouped| = {max_diff:.2e}, relative {rel:.1e}: {verdict}{extra}", ok


def dropless(module: DeepSpeedMoE) -> bool:
    return not getattr(module.layer.gate, "drop_tokens", True)


# ------------------------------------------------------------------------------------------------ main


def selected_paths(args: argparse.Namespace, device: torch.device) -> list[str]:
    if args.only:
        names = ["dense", *(n.strip() for n in args.only.split(",") if n.strip())]
    else:
        ours = args.ours.split(",") if args.ours else ["grouped", "triton"] if device.type == "cuda" else ["grouped"]
        names = ["dense", *ours, *(f"hf-{impl}" for impl in args.hf.split(",") if impl), "deepspeed",
                 "deepspeed-dropless", "torch-grouped_mm", "sort-loop"]
        if device.type == "cuda":
            names.append("dense-bf16-mm")
    return list(dict.fromkeys(n.strip() for n in names if n.strip()))


def explicit_shape(args: argparse.Namespace, base: Shape) -> Shape:
    overrides = {field: getattr(args, field) for field in ("tokens", "d_model", "experts", "top_k", "d_ff")
                 if getattr(args, field) is not None}
    return replace(base, name="" if overrides else base.name, **overrides)


def versions() -> str:
    parts = []
    for package in ("transformers", "deepspeed", "triton"):
        try:
            parts.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            parts.append(f"no {package}")
    return ", ".join(parts)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"cpu ({model}, {os.cpu_count()} cores)"


def run_shape(shape: Shape, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> None:
    reference = build_reference(shape, device, dtype)
    x, grad = make_inputs(shape, device, dtype)
    with torch.no_grad():
        y_ref = reference(x).float()

    modules: dict[str, nn.Module] = {}
    notes: list[str] = []
    for name in selected_paths(args, device):
        try:
            modules[name] = build_path(name, shape, reference, device, dtype, args)
        except Skip as reason:
            notes.append(f"skipped {name}: {reason}")
            continue
        if name in ("dense", "dense-bf16-mm", "grouped"):
            continue
        try:
            line, ok = check_outputs(name, modules[name], x, y_ref, dtype)
        except Exception as error:
            notes.append(f"skipped {name}: its forward failed ({type(error).__name__}: {error})")
            del modules[name]
            continue
        print(line, flush=True)

    times: dict[str, list[float]] = {name: [] for name in modules}
    for round_ in range(args.warmup + args.rounds):
        names = list(modules)
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            try:
                seconds = fwd_bwd_seconds(modules[name], x, grad, device)
            except Exception as error:
                notes.append(f"dropped {name}: fwd+bwd failed ({type(error).__name__}: {error})")
                del modules[name], times[name]
                continue
            if round_ >= args.warmup:
                times[name].append(seconds)
    if "dense" not in times:
        sys.exit("the dense reference failed; no ratios")

    peaks: dict[str, float | None] = {name: None for name in modules}
    if not args.no_memory:
        for name, module in modules.items():
            if device.type == "cuda":
                peaks[name] = cuda_peak_mb(module, x, grad, device)
            else:
                peaks[name], problem = cpu_peak_mb_subprocess(name, shape, args)
                if problem:
                    notes.append(f"peak MB of {name} unavailable: {problem}")
    print_table(shape, args, device, times, peaks, notes)


def milliseconds(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}" if seconds < 0.01 else f"{seconds * 1e3:.1f}"


def print_table(shape: Shape, args: argparse.Namespace, device: torch.device, times: dict[str, list[float]],
                peaks: dict[str, float | None], notes: list[str]) -> None:
    cuda = device.type == "cuda"
    today = datetime.date.today().isoformat()
    print(f"\n### {today}, {device_name(device)}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.dtype}\n")
    print(f"`python benchmarks/moe_layer.py {' '.join(sys.argv[1:])}`: {shape.describe()}, {args.rounds} interleaved "
          f"rounds after {args.warmup} warm-up; {versions()}\n")
    columns = ["path", "median ms", "min ms", "median/dense", "min/dense", "tokens/s", "peak MB"]
    if cuda:
        columns += ["TFLOP/s", "vs bf16 mm"]
    print("| " + " | ".join(columns) + " |")
    print("|---" + "|---:" * (len(columns) - 1) + "|")
    dense_med, dense_min = statistics.median(times["dense"]), min(times["dense"])
    mm_med = statistics.median(times["dense-bf16-mm"]) if times.get("dense-bf16-mm") else None
    for name, ts in times.items():
        med, low = statistics.median(ts), min(ts)
        peak = peaks.get(name)
        cells = [name, milliseconds(med), milliseconds(low), f"{med / dense_med:.3f}", f"{low / dense_min:.3f}",
                 f"{shape.tokens / med:.0f}", "-" if peak is None else f"{peak:.1f}"]
        if cuda:
            cells += [f"{shape.active_flops / med / 1e12:.1f}", "-" if mm_med is None else f"{mm_med / med:.2f}"]
        print("| " + " | ".join(cells) + " |")
    if cuda and mm_med is not None:
        print("\n`vs bf16 mm`: achieved TFLOP/s over dense-bf16-mm's (medians); target for ours: >= 0.60.")
    for note in notes:
        print(f"- {note}")
    print(flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=[*CONFIGS], default=None,
                        help="named shapes (default C1); explicit --tokens/--d-model/... override their values")
    parser.add_argument("--tokens", type=int, default=None, help="T")
    parser.add_argument("--d-model", type=int, default=None, help="D")
    parser.add_argument("--experts", type=int, default=None, help="E")
    parser.add_argument("--top-k", type=int, default=None, help="K")
    parser.add_argument("--d-ff", type=int, default=None, help="F, the hidden width of each expert")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=[*DTYPES], default="float32")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--ours", default=None,
                        help="comma-separated dispatcher names (default: grouped, plus triton on CUDA)")
    parser.add_argument("--hf", default="eager,grouped_mm",
                        help="comma-separated transformers experts implementations, each a row hf-NAME")
    parser.add_argument("--ds-capacity-factor", type=float, default=1.0, help="DeepSpeed TopKGate capacity factor")
    parser.add_argument("--only", default=None,
                        help="comma-separated paths to run (dense is always added), e.g. grouped,hf-eager,sort-loop; "
                             f"fixed names {', '.join(FIXED_PATHS)}, hf-IMPL, or a dispatcher name")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for flag in ("tokens", "d_model", "experts", "top_k", "d_ff", "rounds", "threads"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args)
        return

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    shapes = [explicit_shape(args, base) for base in CONFIGS[args.config or "C1"]]
    for shape in shapes:
        if shape.top_k > shape.experts:
            parser.error(f"top-k {shape.top_k} exceeds the {shape.experts} experts of {shape.describe()}")
    for shape in dict.fromkeys(shapes):
        print(f"== {shape.describe()}, {device.type}, {args.dtype}", flush=True)
        run_shape(shape, args, device, dtype)


if __name__ == "__main__":
    main()
