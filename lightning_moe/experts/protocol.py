"""What a dispatcher may ask of the routed experts.

Legend: ``N`` rows given to one expert, ``A`` rows of all experts sorted by expert, ``D`` model
width, ``E`` experts, ``F`` expert hidden width.

Every experts module has :class:`Experts`' three members; the ``loop`` dispatcher needs nothing
else. A module may also offer its *fused form* (:class:`FusedSwiGLU`): SwiGLU experts hand their
three grouped weights to the fast paths, which then run their own kernels. Dispatchers ask for the
capability (:func:`swiglu_weights`), never for a class, so new expert kinds that offer it run fast
and others run through ``grouped_forward``.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class Experts(Protocol):
    """E experts of one layer, each a function ``(N, D) -> (N, D)``."""

    num_experts: int

    def expert_forward(self, expert: int, x_ND: Tensor) -> Tensor:
        """Run expert ``expert`` on its rows."""
        ...

    def grouped_forward(self, x_AD: Tensor, counts: list[int]) -> Tensor:
        """Run all experts on rows sorted by expert: ``counts[e]`` consecutive rows go to ``e``."""
        ...


@runtime_checkable
class FusedSwiGLU(Protocol):
    """Experts that are SwiGLU MLPs, ``(silu(x W_gate) * (x W_up)) W_out``, and say so."""

    def swiglu_weights(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(w_gate_EDF, w_up_EDF, w_out_EFD)``, the parameters themselves (gradients flow)."""
        ...


def swiglu_weights(experts: object) -> tuple[Tensor, Tensor, Tensor] | None:
    """The experts' fused SwiGLU weights if they offer them (:class:`FusedSwiGLU`), else ``None``."""
    fused = getattr(experts, "swiglu_weights", None)  # FusedSwiGLU, without a Protocol isinstance per call
    return None if fused is None else fused()
