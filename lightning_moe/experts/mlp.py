"""Two-layer MLP experts with biases (BERT/ViT-style FFNs), grouped weights.

Legend: ``N`` rows (tokens) given to one expert, ``A`` rows of all experts sorted by expert,
``D`` model width, ``E`` experts, ``F`` expert hidden width.

These are the experts a GELU FFN with biases (``act(x W_in + b_in) W_out + b_out``) is upcycled
into. They follow the :class:`~lightning_moe.experts.Experts` protocol, so the ``loop`` and
``grouped`` dispatchers run them (``grouped`` through :meth:`grouped_forward`); they do not offer
the fused SwiGLU form (:class:`~lightning_moe.experts.FusedSwiGLU`) the hand-written fast paths
run, so ``triton`` falls back to ``grouped`` with a warning.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_moe._validate import check_positive_int
from lightning_moe.experts.protocol import SeededExperts, uniform_values

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,  # exact (erf) GELU: BERT's and Hugging Face's "gelu"
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # GPT-2's "gelu_new", "gelu_pytorch_tanh"
    "relu": F.relu,
    "silu": F.silu,
}


def mlp(x_ND: Tensor, w_in_DF: Tensor, b_in_F: Tensor | None, w_out_FD: Tensor, b_out_D: Tensor | None,
        activation: Callable[[Tensor], Tensor]) -> Tensor:
    """``act(x W_in + b_in) W_out + b_out``: the MLP of one expert, ``(N, D)``."""
    h_NF = x_ND @ w_in_DF
    if b_in_F is not None:
        h_NF = h_NF + b_in_F
    out_ND = activation(h_NF) @ w_out_FD
    return out_ND if b_out_D is None else out_ND + b_out_D


class MLPExperts(SeededExperts):
    """E two-layer MLPs stored as grouped weights: ``w_in_EDF``, ``b_in_EF``, ``w_out_EFD``, ``b_out_ED``.

    Parameters: ``2 * E * D * F`` plus ``E * (F + D)`` biases when ``bias=True``. Without biases
    ``b_in_EF`` and ``b_out_ED`` are ``None``. Expert ``e`` starts as nn.Linear does, weights and
    biases uniform(+-1/sqrt(fan_in)), drawn from its own generator (``init_seed``, ``e``)
    (:class:`~lightning_moe.experts.protocol.SeededExperts`: the same values at every E and expert-parallel
    size, and buildable lazily).

    Args:
        d_model: model width D, >= 1.
        d_ff: expert hidden width F, >= 1.
        num_experts: number of experts E, >= 1.
        activation: one of ``ACTIVATIONS`` (``gelu``, ``gelu_tanh``, ``relu``, ``silu``).
        bias: give both projections a bias.
    """

    def __init__(self, d_model: int, d_ff: int, num_experts: int, activation: str = "gelu", bias: bool = True) -> None:
        check_positive_int("d_model", d_model)
        check_positive_int("d_ff", d_ff)
        check_positive_int("num_experts", num_experts)
        if activation not in ACTIVATIONS:
            raise ValueError(f"Unknown `activation` {activation!r}; valid names are {sorted(ACTIVATIONS)}.")
        super().__init__(num_experts)
        self.d_model, self.d_ff = d_model, d_ff
        self.activation = activation
        self._act = ACTIVATIONS[activation]
        self.w_in_EDF = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.b_in_EF = nn.Parameter(torch.empty(num_experts, d_ff)) if bias else None
        self.w_out_EFD = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.b_out_ED = nn.Parameter(torch.empty(num_experts, d_model)) if bias else None
        self.reset_parameters()

    def expert_init(self, generator: torch.Generator) -> dict[str, Tensor]:
        """One expert's tensors in order ``w_in``, ``b_in``, ``w_out``, ``b_out``, uniform(+-1/sqrt(fan_in)):
        fan-in D for the input projection and its bias, F for the output's."""
        d, f = self.d_model, self.d_ff
        values = {"w_in_EDF": uniform_values((d, f), 1.0 / math.sqrt(d), generator)}
        if self.b_in_EF is not None:
            values["b_in_EF"] = uniform_values((f,), 1.0 / math.sqrt(d), generator)
        values["w_out_EFD"] = uniform_values((f, d), 1.0 / math.sqrt(f), generator)
        if self.b_out_ED is not None:
            values["b_out_ED"] = uniform_values((d,), 1.0 / math.sqrt(f), generator)
        return values

    def _expert_weights(self, expert: int) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
        b_in = None if self.b_in_EF is None else self.b_in_EF[expert]
        b_out = None if self.b_out_ED is None else self.b_out_ED[expert]
        return self.w_in_EDF[expert], b_in, self.w_out_EFD[expert], b_out

    def expert_forward(self, expert: int, x_ND: Tensor) -> Tensor:
        """Run one expert on ``x_ND``; the readable path used by the ``loop`` dispatcher."""
        return mlp(x_ND, *self._expert_weights(expert), self._act)

    def grouped_forward(self, x_AD: Tensor, counts: list[int]) -> Tensor:
        """Run the experts on rows sorted by expert: rows ``sum(counts[:e])`` onward go to ``e``.

        ``unbind`` gives one view per expert whose backward is a single stack, rather than one
        full-size zero gradient per indexed expert.
        """
        e = self.num_experts
        b_in = self.b_in_EF.unbind(0) if self.b_in_EF is not None else [None] * e
        b_out = self.b_out_ED.unbind(0) if self.b_out_ED is not None else [None] * e
        weights = zip(self.w_in_EDF.unbind(0), b_in, self.w_out_EFD.unbind(0), b_out, strict=True)
        outputs = [mlp(x_ND, *w, self._act) for x_ND, w in zip(x_AD.split(counts), weights, strict=True)]
        return torch.cat(outputs)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_ff={self.d_ff}, num_experts={self.num_experts}, "
                f"activation={self.activation!r}, bias={self.b_in_EF is not None}")
