"""Token-choice routing: each token picks its top-k experts (plain, or inside its best groups).

Legend: ``T`` tokens, ``D`` model width, ``E`` experts, ``K`` experts per token,
``G`` expert groups, ``M`` groups kept per token, ``A`` assignments (``A = T * K`` here).
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
from torch import Tensor

from lightning_moe._validate import check_int_range, check_non_negative, check_positive_float, divisors
from lightning_moe.routing.routing import Router, Routing
from lightning_moe.routing.scorers import LinearScorer, ScorerFactory, build_scorer


def token_choice_routing(scores_TE: Tensor, logits_TE: Tensor, experts_TK: Tensor, gates_TK: Tensor) -> Routing:
    """Flatten a ``(T, K)`` token-choice decision into the ``Routing`` contract (token-major order)."""
    num_tokens, top_k = experts_TK.shape
    token_A = torch.arange(num_tokens, device=experts_TK.device).repeat_interleave(top_k)
    return Routing(scores_TE=scores_TE, logits_TE=logits_TE, token_A=token_A,
                   expert_A=experts_TK.reshape(-1), weight_A=gates_TK.reshape(-1))


class TopKRouter(Router):
    """Token-choice top-k (Switch, Mixtral, Qwen-MoE, DeepSeek-V3) over any scorer.

    Scores: ``softmax`` over all experts, or ``sigmoid`` per expert (DeepSeek-V3); the balancing
    losses and statistics see sigmoid scores divided by their sum over experts. Each token keeps
    its ``top_k`` highest-scoring experts. With ``renormalize=True`` the kept scores are divided
    by their sum (normalising *after* top-k: Mixtral, DeepSeek-V3), so a token's gates sum to 1;
    with ``False`` the gates are the scores as normalised *before* top-k (Switch, Qwen2-MoE's
    default). Gates are then multiplied by ``scaling_factor`` (DeepSeek-V3's routed scaling factor).

    ``jitter > 0`` multiplies the router input by noise drawn from U(1 - jitter, 1 + jitter), in
    training only (Switch Transformer). ``expert_bias=True`` adds the ``expert_bias_E`` buffer to
    the scores when *choosing* experts but never to the gate weights: auxiliary-loss-free
    balancing (the buffer is updated by ``BiasOffsetUpdater``-style callbacks).

    With ``top_k=1`` renormalising makes every gate 1 and cuts the router off from the
    language-model gradient (a warning says so): Switch routing uses ``renormalize=False``.

    Args:
        d_model: width of the hidden states routed, >= 1.
        num_experts: number of experts E, >= 1.
        top_k: experts per token K, in [1, num_experts].
        renormalize: renormalise the gate weights over the top-k.
        scorer: scorer factory, called as ``scorer(d_model, num_experts)``.
        score_func: ``softmax`` or ``sigmoid``.
        scaling_factor: multiplies every gate, > 0.
        jitter: multiplicative input noise amplitude in training, in [0, 1).
        expert_bias: own an ``expert_bias_E`` buffer (zeros) that steers selection only.
        gating_kernel: ``auto`` computes scores, bias, top-k and gates in one Triton kernel
            (:func:`~lightning_moe.kernels.gating.fused_topk_gating`) when the logits are on CUDA
            and Triton is installed, in torch otherwise; ``triton`` always uses the kernel (an
            error where it cannot run); ``torch`` never does. Both compute the same function.
            Subclasses that restrict the selection (group-limited top-k) always use torch.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int = 2,
        renormalize: bool = True,
        scorer: ScorerFactory = LinearScorer,
        score_func: Literal["softmax", "sigmoid"] = "softmax",
        scaling_factor: float = 1.0,
        jitter: float = 0.0,
        expert_bias: bool = False,
        gating_kernel: Literal["auto", "triton", "torch"] = "auto",
    ) -> None:
        super().__init__(d_model, num_experts, top_k)
        if score_func not in ("softmax", "sigmoid"):
            raise ValueError(f"`score_func` must be 'softmax' or 'sigmoid', got {score_func!r}.")
        if gating_kernel not in ("auto", "triton", "torch"):
            raise ValueError(f"`gating_kernel` must be 'auto', 'triton' or 'torch', got {gating_kernel!r}.")
        self.gating_kernel = gating_kernel
        self.score_func = score_func
        self.renormalize = renormalize
        self.scaling_factor = check_positive_float("scaling_factor", scaling_factor)
        self.jitter = check_non_negative("jitter", jitter)
        if self.jitter >= 1:
            raise ValueError(f"`jitter` must be in [0, 1), got {jitter!r}.")
        if top_k == 1 and renormalize and num_experts > 1:
            warnings.warn(
                f"{type(self).__name__}(top_k=1, renormalize=True) gives every token a gate of exactly 1, so the "
                "router learns from the balancing losses only. Use renormalize=False for Switch-style top-1 routing.",
                stacklevel=2,
            )
        self.scorer = build_scorer(scorer, d_model, num_experts)
        if expert_bias:
            self.register_buffer("expert_bias_E", torch.zeros(num_experts))
        else:
            self.expert_bias_E = None

    def _logits(self, x_TD: Tensor, token_ids_T: Tensor | None = None) -> Tensor:
        """``(T, E)`` raw logits, with the training-time input jitter."""
        if self.training and self.jitter > 0:
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        return self.scorer(x_TD, token_ids_T)

    def _scores(self, logits_TE: Tensor) -> tuple[Tensor, Tensor]:
        """``(affinity_TE, scores_TE)``: gate-source scores and normalised scores from the logits."""
        if self.score_func == "softmax":
            affinity_TE = logits_TE.softmax(dim=-1)
            return affinity_TE, affinity_TE
        affinity_TE = logits_TE.sigmoid()
        return affinity_TE, affinity_TE / affinity_TE.sum(dim=-1, keepdim=True)

    def select(self, choice_TE: Tensor) -> Tensor:
        """``(T, K)`` expert indices chosen from the (biased) scores; subclasses restrict it."""
        return choice_TE.topk(self.top_k, dim=-1).indices

    def _use_kernel(self, logits_TE: Tensor) -> bool:
        if self.gating_kernel == "torch" or type(self).select is not TopKRouter.select:
            return False
        if self.gating_kernel == "triton":
            return True  # fused_topk_gating raises, naming the reason, where it cannot run
        from lightning_moe.kernels._triton import unavailable_reason

        fits = logits_TE.dtype in (torch.float32, torch.float16, torch.bfloat16) and self.num_experts <= 4096
        return logits_TE.is_cuda and fits and unavailable_reason(logits_TE) is None

    def forward(self, x_TD: Tensor, token_ids_T: Tensor | None = None) -> Routing:
        logits_TE = self._logits(x_TD, token_ids_T)
        if self._use_kernel(logits_TE):
            from lightning_moe.kernels.gating import fused_topk_gating

            scores_TE, gates_TK, experts_TK = fused_topk_gating(
                logits_TE, self.top_k, self.score_func, self.expert_bias_E, self.renormalize, self.scaling_factor)
            return self.with_own_losses(token_choice_routing(scores_TE, logits_TE, experts_TK, gates_TK))
        affinity_TE, scores_TE = self._scores(logits_TE)
        choice_TE = affinity_TE.detach()
        if self.expert_bias_E is not None:
            choice_TE = choice_TE + self.expert_bias_E.to(choice_TE.dtype)
        experts_TK = self.select(choice_TE)
        gates_TK = affinity_TE.gather(1, experts_TK)
        if self.renormalize:
            gates_TK = gates_TK / gates_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        if self.scaling_factor != 1.0:
            gates_TK = gates_TK * self.scaling_factor
        return self.with_own_losses(token_choice_routing(scores_TE, logits_TE, experts_TK, gates_TK))

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, num_experts={self.num_experts}, top_k={self.top_k}, "
                f"renormalize={self.renormalize}, score_func={self.score_func!r}, "
                f"scaling_factor={self.scaling_factor}, jitter={self.jitter}, "
                f"expert_bias={self.expert_bias_E is not None}, gating_kernel={self.gating_kernel!r}")


def group_limited_mask(choice_TE: Tensor, num_groups: int, topk_groups: int,
                       group_score: Literal["max", "top2_sum"] = "max") -> Tensor:
    """``(T, E)`` bool: the experts inside each token's ``topk_groups`` best groups.

    The E experts form ``num_groups`` equal groups of consecutive experts; a group scores a token
    by its best expert's ``choice_TE`` (``"max"``) or the sum of its two best (``"top2_sum"``,
    DeepSeek-V3). :class:`GroupLimitedTopKRouter` and the Hugging Face DeepSeek-V3 view both select
    through this mask; arguments are not checked here (the router checks them when it is built).
    """
    num_tokens, num_experts = choice_TE.shape
    choice_TGS = choice_TE.view(num_tokens, num_groups, num_experts // num_groups)
    if group_score == "max":
        group_TG = choice_TGS.amax(dim=-1)
    else:
        group_TG = choice_TGS.topk(2, dim=-1).values.sum(dim=-1)
    groups_TM = group_TG.topk(topk_groups, dim=-1).indices
    mask_TG = torch.zeros_like(group_TG, dtype=torch.bool).scatter_(1, groups_TM, True)
    return mask_TG.repeat_interleave(num_experts // num_groups, dim=1)


class GroupLimitedTopKRouter(TopKRouter):
    """Group-limited (device-limited) top-k: the best ``topk_groups`` groups, then top-k inside them.

    The E experts form ``num_groups`` equal groups of consecutive experts (one group per device
    under expert parallelism). Each group is scored per token by its best expert
    (``group_score="max"``, DeepSeek-V2's device-limited routing) or by the sum of its two best
    (``"top2_sum"``, DeepSeek-V3); the token then takes its top-k among the experts of its
    ``topk_groups`` best groups, so it never reaches more than ``topk_groups`` devices. Group
    scores use the biased scores when ``expert_bias=True``, as DeepSeek-V3 does.

    Args:
        num_groups: number of groups G, >= 1, dividing ``num_experts``.
        topk_groups: groups kept per token M, in [1, num_groups]; ``top_k`` must be at most
            ``M * E / G``.
        group_score: ``max`` or ``top2_sum`` (needs groups of at least 2 experts).
        The other arguments are :class:`TopKRouter`'s.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int = 2,
        num_groups: int = 4,
        topk_groups: int = 2,
        group_score: Literal["max", "top2_sum"] = "max",
        renormalize: bool = True,
        scorer: ScorerFactory = LinearScorer,
        score_func: Literal["softmax", "sigmoid"] = "softmax",
        scaling_factor: float = 1.0,
        jitter: float = 0.0,
        expert_bias: bool = False,
    ) -> None:
        super().__init__(d_model, num_experts, top_k, renormalize, scorer, score_func, scaling_factor, jitter,
                         expert_bias)
        self.num_groups = check_int_range("num_groups", num_groups, 1, num_experts)
        if num_experts % num_groups:
            raise ValueError(
                f"`num_groups` ({num_groups}) must divide `num_experts` ({num_experts}) into equal groups; "
                f"valid values: {divisors(num_experts)}."
            )
        self.topk_groups = check_int_range("topk_groups", topk_groups, 1, num_groups)
        group_size = num_experts // num_groups
        if top_k > topk_groups * group_size:
            raise ValueError(
                f"`top_k` ({top_k}) exceeds the {topk_groups * group_size} experts that `topk_groups`={topk_groups} "
                f"groups of {group_size} hold; raise `topk_groups` or lower `top_k`."
            )
        if group_score not in ("max", "top2_sum"):
            raise ValueError(f"`group_score` must be 'max' or 'top2_sum', got {group_score!r}.")
        if group_score == "top2_sum" and group_size < 2:
            raise ValueError(f"`group_score='top2_sum'` needs groups of >= 2 experts; these have {group_size}.")
        self.group_score = group_score

    def group_mask(self, choice_TE: Tensor) -> Tensor:
        """``(T, E)`` bool: the experts inside each token's ``topk_groups`` best groups."""
        return group_limited_mask(choice_TE, self.num_groups, self.topk_groups, self.group_score)

    def select(self, choice_TE: Tensor) -> Tensor:
        masked_TE = choice_TE.masked_fill(~self.group_mask(choice_TE), float("-inf"))
        return masked_TE.topk(self.top_k, dim=-1).indices

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, num_groups={self.num_groups}, topk_groups={self.topk_groups}, "
                f"group_score={self.group_score!r}")
