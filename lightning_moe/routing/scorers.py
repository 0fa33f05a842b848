"""Scorers: how token-to-expert affinity is computed, ``x_TD -> logits_TE`` in float32.

A scorer is half of a router; the selection rule (top-k, group-limited, expert-choice, balanced)
is the other half and takes a scorer *factory* ``scorer(d_model, num_experts)``, so YAML chooses
both without repeating widths::

    router:
      class_path: lightning_moe.routing.TopKRouter
      init_args:
        top_k: 2
        scorer:
          class_path: lightning_moe.routing.AttentionScorer
          init_args: {d_key: 64, temperature: 0.5}

Every scorer computes in float32 with autocast off (float64 inputs stay float64): small logit
differences decide the top-k, and low-precision softmaxes are a known source of MoE instability.
Each class documents its parameter count; the router-design study's Table I (D=768, E=8) is
reproduced by ``lightning-moe-bench-routers``.

Legend: ``T`` tokens, ``D`` model width, ``E`` experts, ``H`` scorer hidden width,
``Q`` query/key width of the attention scorer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_moe._validate import check_choice, check_positive_float, check_positive_int, check_token_ids
from lightning_moe.routing.centering import InputCentering
from lightning_moe.routing.routing import LossWeight

__all__ = [
    "AttentionScorer",
    "HybridScorer",
    "LinearScorer",
    "MLPHadamardScorer",
    "MLPScorer",
    "Scorer",
    "ScorerFactory",
    "TokenScorer",
    "build_scorer",
]

_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu, "relu": F.relu, "silu": F.silu, "tanh": torch.tanh,
}


class Scorer(nn.Module):
    """Base class: ``forward(x_TD) -> logits_TE`` (float32 or wider), one logit per expert.

    With ``center_input=True`` (every scorer's default) the hidden states are centred first
    (:class:`~lightning_moe.routing.centering.InputCentering`: minus the batch mean in training,
    minus its running mean in evaluation), so the direction all tokens share cannot put one
    expert in every token's top-k. ``False`` scores the raw hidden states (as Switch, Mixtral
    and DeepSeek do; those need a trained model's inputs or a strong balancer to stay balanced).

    A scorer may bring auxiliary losses of its own (:class:`SelfSupervisedScorer`'s pretext loss):
    it sets ``aux_losses`` (``{name: coeff * loss}``) in each forward and offers the weights through
    :meth:`scheduled_coefficients`; its router passes them on in ``Routing.aux_losses``.
    """

    d_model: int
    num_experts: int
    aux_losses: dict[str, Tensor]
    """The losses this scorer brought in its last forward (empty for most scorers)."""

    def __init__(self, d_model: int, num_experts: int, center_input: bool = True) -> None:
        super().__init__()
        self.d_model = check_positive_int("d_model", d_model)
        self.num_experts = check_positive_int("num_experts", num_experts)
        if not isinstance(center_input, bool):
            raise ValueError(f"`center_input` must be a bool, got {center_input!r}.")
        self.centering = InputCentering(d_model) if center_input else None
        self.aux_losses = {}
        # Checkpoints written before centring existed load into a centring scorer: the running
        # mean starts at zero and is filled by the first training batch.
        self.register_load_state_dict_pre_hook(_default_centering_state)

    @property
    def center_input(self) -> bool:
        return self.centering is not None

    def forward(self, x_TD: Tensor, token_ids_T: Tensor | None = None) -> Tensor:
        """``(T, E)`` logits; ``token_ids_T`` reach scorers that route by token id (:class:`TokenScorer`)."""
        dtype = torch.promote_types(x_TD.dtype, torch.float32)
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            x_TD = x_TD.to(dtype)
            if self.centering is not None:
                x_TD = self.centering(x_TD)
            return self.logits(x_TD, dtype)

    def logits(self, x_TD: Tensor, dtype: torch.dtype) -> Tensor:  # pragma: no cover - abstract
        """``x_TD`` already in ``dtype`` (float32 or wider); parameters must be cast to it."""
        raise NotImplementedError

    def expert_rows(self) -> list[Tensor]:
        """The parameters whose first dimension indexes experts (row ``e`` belongs to expert ``e``
        alone); ``DeadExpertDetector`` re-initialises those rows when it revives an expert."""
        return []

    def scheduled_coefficients(self) -> list[LossWeight]:
        """The weights of the losses this scorer brings (``[]`` unless it brings some)."""
        return []

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_experts={self.num_experts}, center_input={self.center_input}"


def _default_centering_state(module: Scorer, state_dict: dict, prefix: str, *args: object) -> None:
    for child_name, child in module.named_children():
        if isinstance(child, InputCentering):
            for name, value in child.state_dict().items():
                state_dict.setdefault(f"{prefix}{child_name}.{name}", torch.zeros_like(value))


ScorerFactory = Callable[[int, int], Scorer]
"""Builds a scorer from ``(d_model, num_experts)``; routers call it, YAML never repeats widths."""


def build_scorer(factory: ScorerFactory, d_model: int, num_experts: int) -> Scorer:
    """Call a scorer factory and check that it built a :class:`Scorer` of the right size."""
    scorer = factory(d_model, num_experts)
    if not isinstance(scorer, Scorer) or (scorer.d_model, scorer.num_experts) != (d_model, num_experts):
        raise ValueError(f"`scorer` must build a Scorer for d_model={d_model}, num_experts={num_experts}, "
                         f"got {scorer!r}.")
    return scorer


def _linear_init(weight: Tensor, fan_in: int) -> None:
    # nn.Linear's default scale, so outputs are O(1) whatever the fan-in.
    bound = 1.0 / math.sqrt(fan_in)
    nn.init.uniform_(weight, -bound, bound)


class LinearScorer(Scorer):
    """One projection to E logits (Shazeer, Switch, Mixtral). Parameters: ``E * D`` (no bias).

    Args:
        center_input: centre the hidden states before scoring (:class:`Scorer`).
    """

    def __init__(self, d_model: int, num_experts: int, center_input: bool = True) -> None:
        super().__init__(d_model, num_experts, center_input)
        self.weight_ED = nn.Parameter(torch.empty(num_experts, d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _linear_init(self.weight_ED, self.d_model)

    def expert_rows(self) -> list[Tensor]:
        return [self.weight_ED]

    def logits(self, x_TD: Tensor, dtype: torch.dtype) -> Tensor:
        return F.linear(x_TD, self.weight_ED.to(dtype))


class AttentionScorer(Scorer):
    """Token queries against learned per-expert keys, both L2-normalised, over a temperature.

    ``logits = <q / |q|, k_e / |k_e|> / temperature`` with ``q = W_q x``: a cosine similarity in
    [-1, 1], so the temperature alone sets how sharp the routing can get (1.0 keeps every
    logit within [-1, 1]: nearly uniform scores, as in the router study's Table I; X-MoE's cosine
    router uses about 0.07). Parameters: ``D * Q + E * Q`` (``W_q`` has no bias), 49,664 at D=768,
    E=8, Q=64 as in the study.

    Args:
        d_key: query/key width Q, >= 1.
        temperature: divides the cosine similarities, > 0.
        center_input: centre the hidden states before scoring (:class:`Scorer`).
    """

    def __init__(self, d_model: int, num_experts: int, d_key: int = 64, temperature: float = 1.0,
                 center_input: bool = True) -> None:
        super().__init__(d_model, num_experts, center_input)
        self.d_key = check_positive_int("d_key", d_key)
        self.temperature = check_positive_float("temperature", temperature)
        self.query_QD = nn.Parameter(torch.empty(d_key, d_model))
        self.keys_EQ = nn.Parameter(torch.empty(num_experts, d_key))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _linear_init(self.query_QD, self.d_model)
        nn.init.normal_(self.keys_EQ)

    def expert_rows(self) -> list[Tensor]:
        return [self.keys_EQ]

    def logits(self, x_TD: Tensor, dtype: torch.dtype) -> Tensor:
        q_TQ = F.normalize(F.linear(x_TD, self.query_QD.to(dtype)), dim=-1)
        k_EQ = F.normalize(self.keys_EQ.to(dtype), dim=-1)
        return (q_TQ @ k_EQ.T) / self.temperature

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, d_key={self.d_key}, temperature={self.temperature}"


class MLPScorer(Scorer):
    """A hidden layer with a non-linearity: ``logits = W_2 act(W_1 x + b_1) + b_2``.

    Parameters: ``D * H + H + H * E + E`` (99,464 at D=768, E=8, H=128).

    Args:
        d_hidden: hidden width H, >= 1.
        activation: ``gelu``, ``relu``, ``silu`` or ``tanh``.
        center_input: centre the hidden states before scoring (:class:`Scorer`).
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        d_hidden: int = 128,
        activation: Literal["gelu", "relu", "silu", "tanh"] = "gelu",
        center_input: bool = True,
    ) -> None:
        super().__init__(d_model, num_experts, center_input)
        self.d_hidden = check_positive_int("d_hidden", d_hidden)
        self.activation = check_choice("activation", activation, sorted(_ACTIVATIONS))
        self.fc1 = nn.Linear(d_model, d_hidden)
        self.fc2 = nn.Linear(d_hidden, num_experts)
        # The non-linearity gives centred inputs a shared mean again (GELU >= -0.17): centre the
        # features that fc2 scores as well, or one expert starts in most tokens' top-k.
        self.feature_centering = InputCentering(d_hidden) if center_input else None
        if center_input:  # a random bias per expert is the very token-independent offset centring removes
            nn.init.zeros_(self.fc2.bias)

    def hidden(self, x_TD: Tensor, dtype: torch.dtype) -> Tensor:
        return _ACTIVATIONS[self.activation](F.linear(x_TD, self.fc1.weight.to(dtype), self.fc1.bias.to(dtype)))

    def expert_rows(self) -> list[Tensor]:
        return [self.fc2.weight, self.fc2.bias]

    def logits(self, x_TD: Tensor, dtype: torch.dtype) -> Tensor:
        return self.score_features(self.hidden(x_TD, dtype), dtype)

    def score_features(self, z_TH: Tensor, dtype: torch.dtype) -> Tensor:
        """``fc2`` of the (centred) hidden features."""
        if self.feature_centering is not None:
            z_TH = self.feature_centering(z_TH)
        return F.linear(z_TH, self.fc2.weight.to(dtype), self.fc2.bias.to(dtype))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, d_hidden={self.d_hidden}, activation={self.activation!r}"


class MLPHadamardScorer(MLPScorer):
    """MLP features times a projection of the input, element-wise, then a linear map to logits.

    ``logits = W_2 (act(W_1 x + b_1) * (W_p x)) + b_2``: the product lets features of the input
    gate the MLP's features, which with top-k gives the structured, sparse routing the router
    study reported (lowest entropy, highest mean top-k probability). Parameters:
    ``2 * D * H + H + H * E + E`` (197,768 at D=768, E=8, H=128; ``W_p`` has no bias).

    Args:
        d_hidden: hidden width H, >= 1.
        activation: ``gelu``, ``relu``, ``silu`` or ``tanh``.
        center_input: centre the hidden states before scoring (:class:`Scorer`).
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        d_hidden: int = 128,
        activation: Literal["gelu", "relu", "silu", "tanh"] = "gelu",
        center_input: bool = True,
    ) -> None:
        super().__init__(d_model, num_experts, d_hidden, activation, center_input)
        self.proj_HD = nn.Parameter(torch.empty(d_hidden, d_model))
        _linear_init(self.proj_HD, d_model)

    def logits(self, x_TD: Tensor, dtype: torch.dtype) -> Tensor:
        z_TH = self.hidden(x_TD, dtype) * F.linear(x_TD, self.proj_HD.to(dtype))
        return self.score_features(z_TH, dtype)


class HybridScorer(Scorer):
    """Linear and attention logits mixed: ``w_lin * linear(x) + w_att * attention(x)``.

    The two weights are a softmax over two mixing logits (a convex combination), learned by
    default or fixed at ``linear_weight`` when ``learn_mix=False``. Parameters: the linear
    scorer's, the attention scorer's, plus 2 when learned (55,810 at D=768, E=8, Q=64, as in the
    router study).

    Args:
        d_key: query/key width of the attention part, >= 1.
        temperature: the attention part's temperature, > 0.
        linear_weight: initial (or fixed) weight of the linear part, in (0, 1).
        learn_mix: learn the mixing weights.
        center_input: centre the hidden states before scoring (:class:`Scorer`).
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        d_key: int = 64,
        temperature: float = 1.0,
        linear_weight: float = 0.5,
        learn_mix: bool = True,
        center_input: bool = True,
    ) -> None:
        super().__init__(d_model, num_experts, center_input)
        if not (isinstance(linear_weight, (int, float)) and 0.0 < linear_weight < 1.0):
            raise ValueError(f"`linear_weight` must be in (0, 1), got {linear_weight!r}.")
        # The parts score the input this scorer has already centred.
        self.linear = LinearScorer(d_model, num_experts, center_input=False)
        self.attention = AttentionScorer(d_model, num_experts, d_key, temperature, center_input=False)
        self.d_key, self.temperature, self.linear_weight = d_key, temperature, float(linear_weight)
        mix_2 = torch.tensor([math.log(linear_weight), math.log(1.0 - linear_weight)])
        if learn_mix:
            self.mix_2 = nn.Parameter(mix_2)
        else:
            self.register_buffer("mix_2", mix_2)
        self.learn_mix = learn_mix

    def mix_weights(self) -> Tensor:
        """``(w_lin, w_att)``, summing to 1."""
        return self.mix_2.float().softmax(dim=0)

    def expert_rows(self) -> list[Tensor]:
        return self.linear.expert_rows() + self.attention.expert_rows()

    def logits(self, x_TD: Tensor, dtype: torch.dtype) -> Tensor:
        w_2 = self.mix_2.to(dtype).softmax(dim=0)
        return w_2[0] * self.linear.logits(x_TD, dtype) + w_2[1] * self.attention.logits(x_TD, dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, learn_mix={self.learn_mix}"


class TokenScorer(Scorer):
    """A learned table of logits per token id: ``logits_TE = W[:, token_ids].T`` (a learned hash).

    Routes each token by its id alone, like :class:`~lightning_moe.routing.HashRouter`, but the
    table is learned: the language-model loss (through the gates) and the balancers move it, so
    tokens that should share experts come to share them. On byte-level text this is the router that
    won our learning benchmark (``benchmarks/BENCHMARKS.md``, "Learned routing"): a token's identity
    is the strongest routing signal a small model has early in training, and a table keeps a token's
    experts stable while the hidden states drift (StableMoE's argument for routing by token
    embedding). Needs the token ids: ``MoETransformer`` passes them to its routers; a router called
    without them raises. The hidden states are not read.

    Parameters: ``E * V``; a token reads ``E`` of them.

    Args:
        vocab_size: vocabulary size V, >= 1 (256 for byte tokens; the data module's ``vocab_size``).
        init_std: standard deviation of the initial table, > 0 (small: near-uniform gates at first).
    """

    def __init__(self, d_model: int, num_experts: int, vocab_size: int = 256, init_std: float = 0.1) -> None:
        super().__init__(d_model, num_experts, center_input=False)
        self.vocab_size = check_positive_int("vocab_size", vocab_size)
        self.init_std = check_positive_float("init_std", init_std)
        self.weight_EV = nn.Parameter(torch.empty(num_experts, vocab_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight_EV, std=self.init_std)

    def expert_rows(self) -> list[Tensor]:
        return [self.weight_EV]

    def forward(self, x_TD: Tensor, token_ids_T: Tensor | None = None) -> Tensor:
        if token_ids_T is None:
            raise ValueError("TokenScorer routes by token id but the router received none: call the router (or "
                             "MoELayer) with `token_ids`, as MoETransformer does.")
        if token_ids_T.shape != x_TD.shape[:1]:
            raise ValueError(f"`token_ids_T` must have shape ({x_TD.shape[0]},), one id per routed token; got "
                             f"{tuple(token_ids_T.shape)}.")
        check_token_ids(token_ids_T, self.vocab_size)
        dtype = torch.promote_types(x_TD.dtype, torch.float32)
        return self.weight_EV.to(dtype).T[token_ids_T]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, vocab_size={self.vocab_size}, init_std={self.init_std}"
