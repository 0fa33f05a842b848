"""SwiGLU experts with grouped weights, and the dense SwiGLU FFN they replace.

Legend: ``N`` rows (tokens) given to one expert, ``D`` model width, ``E`` experts,
``F`` expert hidden width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_moe._validate import check_positive_int
from lightning_moe.experts.protocol import SeededExperts, uniform_values


def swiglu(x_ND: Tensor, w_gate_DF: Tensor, w_up_DF: Tensor, w_out_FD: Tensor) -> Tensor:
    """``(silu(x W_gate) * (x W_up)) W_out``: the SwiGLU MLP of one expert, ``(N, D)``."""
    return (F.silu(x_ND @ w_gate_DF) * (x_ND @ w_up_DF)) @ w_out_FD


class SwiGLUExperts(SeededExperts):
    """E SwiGLU MLPs stored as three grouped weights.

    ``w_gate_EDF`` and ``w_up_EDF`` project D -> F, ``w_out_EFD`` projects F -> D. Fine-grained
    experts are the same module with a smaller F. Parameters: ``3 * E * D * F``.

    Expert ``e`` starts at nn.Linear's default scale, uniform(+-1/sqrt(fan_in)), drawn from its own
    generator (``init_seed``, ``e``) (:class:`~lightning_moe.experts.protocol.SeededExperts`): the same
    values at every E and expert-parallel size, and buildable lazily
    (:class:`~lightning_moe.experts.protocol.LazyExperts`).

    Args:
        d_model: model width D, >= 1.
        d_ff: expert hidden width F, >= 1.
        num_experts: number of experts E, >= 1.
    """

    def __init__(self, d_model: int, d_ff: int, num_experts: int) -> None:
        check_positive_int("d_model", d_model)
        check_positive_int("d_ff", d_ff)
        super().__init__(num_experts)
        self.d_model, self.d_ff = d_model, d_ff
        self.w_gate_EDF = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.w_up_EDF = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.w_out_EFD = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.reset_parameters()

    def expert_init(self, generator: torch.Generator) -> dict[str, Tensor]:
        """One expert's weights: gate, up (fan-in D), then out (fan-in F), uniform(+-1/sqrt(fan_in))."""
        d, f = self.d_model, self.d_ff
        return {"w_gate_EDF": uniform_values((d, f), 1.0 / math.sqrt(d), generator),
                "w_up_EDF": uniform_values((d, f), 1.0 / math.sqrt(d), generator),
                "w_out_EFD": uniform_values((f, d), 1.0 / math.sqrt(f), generator)}

    def swiglu_weights(self) -> tuple[Tensor, Tensor, Tensor]:
        """The fused form the fast dispatchers run (:class:`~lightning_moe.experts.FusedSwiGLU`)."""
        return self.w_gate_EDF, self.w_up_EDF, self.w_out_EFD

    def expert_forward(self, expert: int, x_ND: Tensor) -> Tensor:
        """Run one expert on ``x_ND``; the readable path used by the ``loop`` dispatcher."""
        return swiglu(x_ND, self.w_gate_EDF[expert], self.w_up_EDF[expert], self.w_out_EFD[expert])

    def grouped_forward(self, x_AD: Tensor, counts: list[int]) -> Tensor:
        """Run the experts on rows sorted by expert: rows ``counts[:e].sum()`` onward go to ``e``.

        ``unbind`` and ``split`` make one view per expert whose backward is a single stack or
        cat, instead of one full-size zero gradient per indexed expert.
        """
        weights = zip(self.w_gate_EDF.unbind(0), self.w_up_EDF.unbind(0), self.w_out_EFD.unbind(0), strict=True)
        outputs = [swiglu(x_ND, *w) for x_ND, w in zip(x_AD.split(counts), weights, strict=True)]
        return torch.cat(outputs)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_ff={self.d_ff}, num_experts={self.num_experts}"


class SwiGLU(nn.Module):
    """The dense SwiGLU feed-forward block (LLaMA-style), ``(..., D) -> (..., D)``.

    Parameters: ``3 * D * F``.
    """

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.d_model = check_positive_int("d_model", d_model)
        self.d_ff = check_positive_int("d_ff", d_ff)
        self.gate = nn.Linear(d_model, d_ff, bias=False)
        self.up = nn.Linear(d_model, d_ff, bias=False)
        self.out = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(F.silu(self.gate(x)) * self.up(x))
