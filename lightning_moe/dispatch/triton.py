"""The ``triton`` backend: permute, grouped SwiGLU and unpermute as Triton kernels.

Legend: ``T`` tokens, ``D`` model width, ``E`` experts, ``A`` assignments.

The expert GEMMs between the fused permute and combine run on an *engine*
(:mod:`lightning_moe.dispatch.engines`): our Triton grouped GEMM (``engine="triton"``, registered
as dispatcher ``triton-kernels``), torch's ``F.grouped_mm`` (``"grouped_mm"``, dispatcher
``triton-grouped_mm``), or the faster of the two measured once per shape (``"auto"``, the default,
dispatcher ``triton``).

Where the kernels cannot run (no Triton, CPU tensors without ``TRITON_INTERPRET=1``, experts
that do not offer the fused SwiGLU form, :class:`~lightning_moe.experts.FusedSwiGLU`) it warns
once, naming the reason, and computes the same function with the ``grouped`` backend; each step
decides for itself, so a wrapping dispatcher (expert parallelism) falls back the same way.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lightning_moe._validate import check_choice
from lightning_moe.dispatch.base import Plan, autocast_inputs
from lightning_moe.dispatch.engines import ENGINES, expert_swiglu
from lightning_moe.dispatch.grouped import GroupedDispatcher
from lightning_moe.experts.protocol import Experts, swiglu_weights
from lightning_moe.kernels._triton import unavailable_reason
from lightning_moe.routing.routing import Routing

if TYPE_CHECKING:  # the kernels register their custom ops on first use, not on import
    from lightning_moe.kernels.permute import DispatchPlan


@functools.cache
def _warn_fallback(reason: str) -> None:
    # Cached so a training loop warns once per distinct reason, not once per step.
    warnings.warn(f"dispatcher='triton' falls back to 'grouped': {reason}.", RuntimeWarning, stacklevel=3)


def fallback_reason(x_TD: Tensor, experts: object) -> str | None:
    """Why ``triton_dispatch`` cannot run the kernels on these inputs, or ``None`` if it can."""
    if swiglu_weights(experts) is None:
        return f"the Triton path runs SwiGLU experts (swiglu_weights()), not {type(experts).__name__}"
    return _input_reason(x_TD)


@dataclass
class TritonPlan(Plan):
    """The kernels' plan (both layouts of the assignments) next to the common fields; ``weight_A``
    is in token-sorted order, as ``unpermute`` reads it."""

    kernel_plan: DispatchPlan | None = None


class TritonDispatcher(GroupedDispatcher):
    """``y_t = sum_a weight_a * expert_{e_a}(x_t)`` with the Triton kernels; no host sync.

    permute: tokens gathered into expert order (:func:`~lightning_moe.kernels.permute.permute`);
    compute: the experts as grouped GEMMs over the sorted rows, on the chosen engine
    (:func:`~lightning_moe.dispatch.engines.expert_swiglu`); combine: outputs summed per token with
    their gates (:func:`~lightning_moe.kernels.permute.unpermute`, a gather-reduce, no atomics).
    Each step runs the ``grouped`` backend's instead where the kernels cannot run.

    Args:
        engine: what runs the expert GEMMs: ``"auto"`` (measure both once per device, dtype and
            expert shape, keep the faster; the default), ``"triton"`` (our kernels) or
            ``"grouped_mm"`` (``torch.nn.functional.grouped_mm``; ``RuntimeError`` where torch
            cannot run it on the inputs).
    """

    name = "triton"
    _NAMES = {"auto": "triton", "triton": "triton-kernels", "grouped_mm": "triton-grouped_mm"}

    def __init__(self, engine: str = "auto") -> None:
        super().__init__()
        self.engine = check_choice("engine", engine, ENGINES)
        self.name = self._NAMES[engine]

    def _falls_back(self, x: Tensor, experts: object | None = None) -> bool:
        """Whether to run the ``grouped`` backend's step instead (warning once per reason)."""
        reason = _step_reason(x, experts)
        if reason is not None:
            _warn_fallback(reason)
        return reason is not None

    def permute(self, x_TD: Tensor, routing: Routing) -> tuple[Tensor, Plan]:
        if self._falls_back(x_TD):
            return super().permute(x_TD, routing)
        return self._kernel_permute(x_TD, routing)

    def compute(self, x_AD: Tensor, plan: Plan, experts: Experts) -> Tensor:
        if self._falls_back(x_AD, experts):
            return super().compute(x_AD, plan, experts)
        return self._kernel_compute(x_AD, plan, experts.swiglu_weights())

    def combine(self, out_AD: Tensor, plan: Plan) -> Tensor:
        if not isinstance(plan, TritonPlan) or plan.kernel_plan is None:
            return super().combine(out_AD, plan)
        from lightning_moe.kernels.permute import unpermute

        return unpermute(out_AD, plan.weight_A, plan.kernel_plan)

    def __call__(self, x_TD: Tensor, routing: Routing, experts: Experts) -> Tensor:
        if self._falls_back(x_TD, experts):  # checked once here, not again in each step
            return super().__call__(x_TD, routing, experts)  # the grouped backend, fused
        x_AD, plan = self._kernel_permute(x_TD, routing)
        return self.combine(self._kernel_compute(x_AD, plan, experts.swiglu_weights()), plan)

    def _kernel_permute(self, x_TD: Tensor, routing: Routing) -> tuple[Tensor, TritonPlan]:
        from lightning_moe.kernels.permute import make_plan, permute

        (x_TD,) = autocast_inputs(x_TD)  # under autocast the experts run in its dtype (weights cast to x's)
        kernel_plan = make_plan(routing.token_A, routing.expert_A, x_TD.shape[0], routing.num_experts)
        plan = TritonPlan(counts_E=kernel_plan.counts_E, num_tokens=x_TD.shape[0], token_A=kernel_plan.src_token_A,
                          weight_A=routing.weight_A[kernel_plan.token_order_A].float(), dtype=x_TD.dtype,
                          kernel_plan=kernel_plan)
        return permute(x_TD, kernel_plan), plan

    def _kernel_compute(self, x_AD: Tensor, plan: Plan, weights: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        offsets_E1 = plan.kernel_plan.offsets_E1 if isinstance(plan, TritonPlan) and plan.kernel_plan is not None \
            else torch.cat([plan.counts_E.new_zeros(1), plan.counts_E.cumsum(0)])
        return expert_swiglu(x_AD, *weights, offsets_E1, engine=self.engine)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, engine={self.engine!r})"


class AutoDispatcher(TritonDispatcher):
    """The fastest backend for each call's device: ``grouped`` on CPU (even where Triton's
    interpreter could run the kernels), the Triton kernels with the ``auto`` GEMM engine on a GPU.
    Where the kernels cannot run on a GPU (no Triton, float64, experts that are not SwiGLU) it runs
    ``grouped`` without a warning: choosing is its job. The default dispatcher."""

    name = "auto"

    def __init__(self) -> None:
        super().__init__(engine="auto")
        self.name = "auto"

    def _falls_back(self, x: Tensor, experts: object | None = None) -> bool:
        return x.device.type == "cpu" or _step_reason(x, experts) is not None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name='auto')"


def _step_reason(x: Tensor, experts: object | None) -> str | None:
    """Why the kernels cannot run a step on ``x`` (and ``experts``, for the steps that run them)."""
    return _input_reason(x) if experts is None else fallback_reason(x, experts)


def _input_reason(x: Tensor) -> str | None:
    """Why the kernels cannot take ``x`` (its dtype, or no Triton for its device), or ``None``."""
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"the Triton kernels take float32, float16 or bfloat16 inputs, got {x.dtype}"
    return unavailable_reason(x)


triton_dispatch = TritonDispatcher()
"""A shared ``triton`` dispatcher (engine ``auto``): ``triton_dispatch(x_TD, routing, experts) -> y_TD``."""
