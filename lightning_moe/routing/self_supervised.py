"""The self-supervised router's scorer: a feature extractor trained by a contrastive pretext task, then a routing head.

Legend: ``T`` tokens, ``D`` model width, ``E`` experts, ``H`` feature width, ``N`` anchor tokens of
the pretext task (positive pairs).

The router-design study's seventh router (its supplement, section X-1): features ``z = g_φ(x)`` from a
feature extractor, routing probabilities ``p = softmax(W_r z)`` (or any other selection rule's use of
the logits ``W_r z``), and ``g_φ`` trained with an InfoNCE pretext loss

.. math::

    L = -\\frac{1}{N} \\sum_{i=1}^{N} \\log
        \\frac{\\exp(\\mathrm{sim}(z_i, z_i^+) / \\tau)}{\\sum_{j=1}^{N} \\exp(\\mathrm{sim}(z_i, z_j^+) / \\tau)}

with ``sim`` the cosine similarity and ``τ`` a temperature; the negatives of anchor ``i`` are the
positives of the other anchors of the batch (``j ≠ i``), so the denominator holds the positive and
``N - 1`` negatives. The extractor is trained together with the model (the default: the pretext loss
is one of the layer's auxiliary losses) or pre-trained alone and frozen
(:meth:`SelfSupervisedScorer.pretrain`, ``freeze_extractor``).

Positive pairs: **the same token's hidden state under two independent dropout masks** (SimCSE's
choice for sentence embeddings). Why this and not, say, neighbouring positions: a scorer sees the
routed tokens flattened, without sequence boundaries (the same call serves our layers, expert
choice and routers swapped into Hugging Face blocks), and dropout views need nothing but the token
itself; the pretext then asks the features to be *stable* under small perturbations of the hidden
state (the property that keeps a token's experts from flipping as the model drifts) and, through
the batch negatives, *spread out* over the sphere (distinct tokens get distinct features that the
routing head can split among experts rather than collapse onto one). Neighbouring positions would
ask for context-coherent routing instead, which the model's attention already mixes in.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_moe._validate import check_choice, check_non_negative, check_positive_float, check_positive_int
from lightning_moe.routing.centering import InputCentering
from lightning_moe.routing.routing import LossWeight
from lightning_moe.routing.scorers import _ACTIVATIONS, Scorer, _linear_init

__all__ = ["SelfSupervisedScorer", "info_nce_loss"]

#: Names the LightningModules log losses under already (``train/loss``, ``train/lm_loss``, ``train/mtp_loss``).
_RESERVED_NAMES = frozenset({"loss", "lm_loss", "mtp_loss"})


def info_nce_loss(anchor_NH: Tensor, positive_NH: Tensor, temperature: float) -> Tensor:
    """InfoNCE over a batch of positive pairs, cosine similarity, the other pairs' positives as negatives.

    ``-mean_i log( exp(cos(a_i, p_i)/τ) / Σ_j exp(cos(a_i, p_j)/τ) )``: row ``i`` of the ``(N, N)``
    similarity matrix is a classification of anchor ``i`` among all ``N`` positives, its own the target.
    ``log N`` when the features carry no information; 0 only when each anchor is infinitely closer to
    its own positive.
    """
    if anchor_NH.shape != positive_NH.shape or anchor_NH.dim() != 2:
        raise ValueError(f"`anchor_NH` and `positive_NH` must be (N, H) of one shape, got {tuple(anchor_NH.shape)} "
                         f"and {tuple(positive_NH.shape)}.")
    sim_NN = F.normalize(anchor_NH, dim=-1) @ F.normalize(positive_NH, dim=-1).T
    target_N = torch.arange(anchor_NH.shape[0], device=anchor_NH.device)
    return F.cross_entropy(sim_NN / temperature, target_N)


class SelfSupervisedScorer(Scorer):
    """Routing by features of a self-supervised extractor: ``logits = W_r g_φ(x)``, ``g_φ`` trained by InfoNCE.

    ``g_φ`` is ``depth`` linear layers of width H with ``activation`` between them (``depth=1`` is one
    linear map); its features are centred (with ``center_input``, as :class:`MLPScorer`'s) and mapped to
    one logit per expert by the routing head ``W_r`` (no bias). In training, while the extractor is not
    frozen, every forward also computes the pretext loss (module docstring; with ``coeff`` 0 it brings a
    0 without computing it) on ``num_anchors`` tokens drawn at random from the batch, two dropout views of each (rate
    ``view_dropout``), and brings ``coeff * loss`` as the auxiliary loss ``loss_name``: the layer adds
    it to its balancers' losses, so it is logged as ``train/<loss_name>`` (summed over layers), added
    to the training loss, and scheduled by ``ZLossScheduler(balancer=<loss_name>)``. With
    ``detach_input`` (the default) the pretext trains the extractor only, never the model's hidden
    states; the language-model loss reaches both the head and the extractor through the gates.

    Pre-training: :meth:`pretrain` trains the extractor alone on hidden states you give it (for
    example a trained model's router inputs) and freezes it; ``freeze_extractor=True`` builds it
    frozen (load its weights afterwards). A frozen extractor brings no loss and gets no gradient;
    the routing head still trains. The frozen state is saved with the model (``extractor_frozen``).

    Parameters: ``D*H + H + (depth - 1) * (H*H + H) + E*H`` (14,464 at D=128, E=32, H=64, depth 2;
    53,888 at the router study's D=768, E=8, H=64, depth 2).

    Args:
        d_feature: feature width H of the extractor, >= 1.
        depth: linear layers in the extractor, >= 1.
        activation: between the extractor's layers: ``gelu``, ``relu``, ``silu`` or ``tanh``.
        temperature: τ of the pretext loss, > 0 (SimCLR/SimCSE use 0.05 to 0.5).
        coeff: weight of the pretext loss in the training loss, >= 0 (0 computes no pretext loss).
        view_dropout: dropout rate of the two views of a token, in (0, 1).
        num_anchors: tokens per forward the pretext loss is computed on, >= 2 (all of them when the
            batch is smaller); the cost is two extractor passes over them and an N x N similarity.
        detach_input: the pretext loss does not reach the hidden states (only the extractor).
        freeze_extractor: build the extractor frozen (no pretext loss, no gradient).
        loss_name: the auxiliary loss's name (``train/<loss_name>``), distinct from the balancers'.
        center_input: centre the hidden states (and the features) before scoring (:class:`Scorer`).
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        d_feature: int = 64,
        depth: int = 2,
        activation: Literal["gelu", "relu", "silu", "tanh"] = "gelu",
        temperature: float = 0.1,
        coeff: float = 0.01,
        view_dropout: float = 0.1,
        num_anchors: int = 256,
        detach_input: bool = True,
        freeze_extractor: bool = False,
        loss_name: str = "ssl_loss",
        center_input: bool = True,
    ) -> None:
        super().__init__(d_model, num_experts, center_input)
        self.d_feature = check_positive_int("d_feature", d_feature)
        self.depth = check_positive_int("depth", depth)
        self.activation = check_choice("activation", activation, sorted(_ACTIVATIONS))
        self.temperature = check_positive_float("temperature", temperature)
        if not (isinstance(view_dropout, (int, float)) and 0.0 < view_dropout < 1.0):
            raise ValueError(f"`view_dropout` must be in (0, 1), got {view_dropout!r}: two views without dropout "
                             "are the same view.")
        self.view_dropout = float(view_dropout)
        self.num_anchors = check_positive_int("num_anchors", num_anchors)
        if num_anchors < 2:
            raise ValueError(f"`num_anchors` must be >= 2 (an anchor needs negatives), got {num_anchors}.")
        self.detach_input = bool(detach_input)
        if isinstance(loss_name, str) and (loss_name in _RESERVED_NAMES or loss_name.startswith("mtp_loss")):
            raise ValueError(f"`loss_name` must not be one of the model's own loss names ({sorted(_RESERVED_NAMES)}, "
                             f"mtp_loss_<k>): they are logged as train/<name> already; got {loss_name!r}.")
        self.loss_weight = LossWeight(loss_name, check_non_negative("coeff", coeff))
        widths = [d_model] + [d_feature] * depth
        self.extractor = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True))
        self.head_EH = nn.Parameter(torch.empty(num_experts, d_feature))
        _linear_init(self.head_EH, d_feature)
        self.feature_centering = InputCentering(d_feature) if center_input else None
        self.register_buffer("extractor_frozen", torch.tensor(False))
        self.register_load_state_dict_post_hook(SelfSupervisedScorer._apply_frozen)
        self.last_pretext_loss: Tensor | None = None
        """The unweighted pretext loss of the last forward that computed one (detached; for inspection)."""
        self._frozen = False  # mirrors the buffer, so the hot path never reads a device tensor
        self._warned_no_grad = False
        if freeze_extractor:
            self.freeze_extractor()

    @property
    def frozen(self) -> bool:
        """Whether the extractor is frozen."""
        return self._frozen

    @property
    def loss_name(self) -> str:
        return self.loss_weight.name

    @property
    def coeff(self) -> float:
        """The pretext loss's weight (``loss_weight.coeff``; ``ZLossScheduler`` may change it)."""
        return self.loss_weight.coeff

    def scheduled_coefficients(self) -> list[LossWeight]:
        return [self.loss_weight]

    def expert_rows(self) -> list[Tensor]:
        return [self.head_EH]

    def extractor_parameters(self) -> list[nn.Parameter]:
        """The parameters of ``g_φ`` (not the routing head's)."""
        return list(self.extractor.parameters())

    def freeze_extractor(self, frozen: bool = True) -> None:
        """Stop (or, with ``False``, restart) training the extractor: no gradient, no pretext loss."""
        self._frozen = bool(frozen)
        self.extractor_frozen.fill_(self._frozen)
        for param in self.extractor_parameters():
            param.requires_grad_(not frozen)

    @staticmethod
    def _apply_frozen(module: SelfSupervisedScorer, incompatible_keys: object) -> None:
        # A loaded checkpoint's frozen flag also freezes the parameters (requires_grad is not in a state dict).
        # It only ever freezes: a parameter the caller froze some other way stays frozen.
        if bool(module.extractor_frozen):
            module.freeze_extractor()

    # -- features and logits ---------------------------------------------------------------------

    def features(self, x_TD: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """``g_φ(x)``: ``(T, H)`` features of (already centred) hidden states, computed in ``dtype``."""
        dtype = x_TD.dtype if dtype is None else dtype
        act = _ACTIVATIONS[self.activation]
        z = x_TD.to(dtype)
        for i, layer in enumerate(self.extractor):
            z = F.linear(z, layer.weight.to(dtype), layer.bias.to(dtype))
            if i < len(self.extractor) - 1:
                z = act(z)
        return z

    def pretext_loss(self, x_TD: Tensor, generator: torch.Generator | None = None,
                     num_anchors: int | None = None) -> Tensor:
        """The unweighted InfoNCE loss on ``min(num_anchors, T)`` tokens of ``x_TD`` (centred hidden
        states; ``num_anchors`` defaults to this scorer's), each seen through two dropout masks. Random
        anchors (``generator`` for a fixed draw)."""
        x_TD = x_TD.detach() if self.detach_input else x_TD
        num_tokens = x_TD.shape[0]
        num_anchors = self.num_anchors if num_anchors is None else num_anchors
        if num_tokens < 2:
            return x_TD.new_zeros(()) + 0.0 * self.head_EH.sum()  # no negative to contrast with
        if num_tokens > num_anchors:
            if generator is None:  # drawn where the tokens are: no host-device copy on the training path
                pick = torch.randperm(num_tokens, device=x_TD.device)[:num_anchors]
            else:
                pick = torch.randperm(num_tokens, generator=generator, device=generator.device)[:num_anchors]
            x_TD = x_TD[pick.to(x_TD.device)]
        views = [self.features(F.dropout(x_TD, self.view_dropout, training=True)) for _ in range(2)]
        return info_nce_loss(views[0], views[1], self.temperature)

    def logits(self, x_TD: Tensor, dtype: torch.dtype) -> Tensor:
        self.aux_losses = {}
        if self.training and not self._frozen and not torch.is_grad_enabled() and not self._warned_no_grad:
            self._warned_no_grad = True
            warnings.warn(
                "SelfSupervisedScorer ran in training mode with gradients disabled, so it brought no pretext loss "
                "(`ssl_loss`) for that forward. Expected for a probe under torch.no_grad(); under reentrant "
                "activation checkpointing the loss is lost every step: use use_reentrant=False.", stacklevel=2)
        if self.training and torch.is_grad_enabled() and not self._frozen:
            if self.coeff > 0:
                loss = self.pretext_loss(x_TD)
                self.last_pretext_loss = loss.detach()
                self.aux_losses = {self.loss_name: self.coeff * loss}
            else:  # weighted by 0 (a schedule's warm-up): not computed, logged as 0
                self.aux_losses = {self.loss_name: x_TD.new_zeros(())}
        z_TH = self.features(x_TD, dtype)
        if self.feature_centering is not None:
            z_TH = self.feature_centering(z_TH)
        return F.linear(z_TH, self.head_EH.to(dtype))

    # -- pre-training --------------------------------------------------------------------------------

    def pretrain(
        self,
        hidden_states: Tensor,
        steps: int = 200,
        lr: float = 1e-3,
        batch_size: int | None = None,
        freeze: bool = True,
        seed: int = 0,
        progress: bool = True,
    ) -> list[float]:
        """Train the extractor alone on the pretext task; return the loss of every step.

        ``hidden_states`` (``(..., D)``, e.g. a trained model's router inputs:
        :meth:`~lightning_moe.models.MoETransformer.router_inputs`) are centred
        on their mean (which also becomes the centring's running mean, so
        evaluation centres them alike); each step draws ``batch_size`` of them (``num_anchors`` by
        default) with a generator seeded by ``seed`` and takes one Adam step (``lr``) on the extractor's
        parameters. The routing head is left alone. With ``freeze`` the extractor is frozen afterwards
        (:meth:`freeze_extractor`). A progress bar shows the steps (``progress=False`` hides it).
        """
        check_positive_int("steps", steps)
        check_positive_float("lr", lr)
        batch_size = self.num_anchors if batch_size is None else check_positive_int("batch_size", batch_size)
        x_TD = self._tokens(hidden_states)
        centred_TD = x_TD - x_TD.mean(dim=0) if self.centering is not None else x_TD
        self.freeze_extractor(False)
        optimizer = torch.optim.Adam(self.extractor_parameters(), lr=lr)
        generator = torch.Generator().manual_seed(seed)
        losses: list[float] = []
        for _ in _progress(range(steps), progress, "pretraining the router's extractor"):
            loss = self.pretext_loss(centred_TD, generator, num_anchors=max(2, batch_size))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        self._calibrate(x_TD)  # the input's mean, and the feature mean of the trained extractor
        if freeze:
            self.freeze_extractor()
        return losses

    @torch.no_grad()
    def calibrate_centering(self, hidden_states: Tensor) -> None:
        """Set the running means that evaluation centres on (the input's and, through the current extractor,
        the features') from ``hidden_states`` (``(..., D)``), as if training had seen only them.
        :meth:`pretrain` ends with it. No-op without ``center_input``."""
        self._calibrate(self._tokens(hidden_states))

    @torch.no_grad()
    def _calibrate(self, x_TD: Tensor) -> None:
        if self.centering is None:
            return
        self._set_running_mean(self.centering, x_TD.mean(dim=0))
        self._set_running_mean(self.feature_centering, self.features(x_TD - self.centering.running_mean_D).mean(dim=0))

    def _tokens(self, hidden_states: Tensor) -> Tensor:
        if hidden_states.shape[-1] != self.d_model:
            raise ValueError(f"`hidden_states` must have last dimension d_model={self.d_model}, got shape "
                             f"{tuple(hidden_states.shape)}.")
        x_TD = hidden_states.detach().reshape(-1, self.d_model).to(self.head_EH.device, torch.float32)
        if x_TD.shape[0] < 2:
            raise ValueError(f"`hidden_states` must hold at least 2 tokens, got {x_TD.shape[0]}.")
        return x_TD

    @staticmethod
    @torch.no_grad()
    def _set_running_mean(centering: InputCentering, mean_D: Tensor) -> None:
        centering.running_mean_D.copy_(mean_D)
        centering.num_batches_tracked.clamp_(min=1)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, d_feature={self.d_feature}, depth={self.depth}, "
                f"activation={self.activation!r}, temperature={self.temperature}, coeff={self.coeff}, "
                f"view_dropout={self.view_dropout}, num_anchors={self.num_anchors}, "
                f"frozen={self._frozen}")


def _progress(steps: Sequence[int] | range, enabled: bool, description: str):  # noqa: ANN202
    if not enabled:
        return steps
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with lightning
        return steps
    return tqdm(steps, desc=description, leave=False)

