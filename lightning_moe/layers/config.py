"""One MoE configuration: what every MoE layer of a model is made of, with one set of defaults.

``MoETransformer`` and ``MoELanguageModel`` take it as ``moe`` (YAML ``model.moe: {...}``, command
line ``--model.moe.num_experts 16``), ``MoELayer.from_config`` and ``DeepSpeedMoELayer.from_config``
build one layer from it, and ``HFMoEFineTune`` reads its routing part (``router``, ``balancers``,
``capacity``) for the routers it swaps into a Hugging Face model.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from lightning_moe._validate import check_non_negative_int, check_positive_int, divisors
from lightning_moe.balancing.losses import Balancer, SwitchAuxLoss, ZLoss
from lightning_moe.dispatch.registry import get_dispatcher
from lightning_moe.routing.capacity import ExpertCapacity
from lightning_moe.routing.factory import RouterFactory
from lightning_moe.routing.topk import TopKRouter


def default_balancers() -> list[Balancer]:
    """``[SwitchAuxLoss(0.01), ZLoss(0.001)]``: what ``balancers=None`` means everywhere."""
    return [SwitchAuxLoss(0.01), ZLoss(0.001)]


@dataclass(kw_only=True)
class MoEConfig:
    """The MoE layers of a model.

    Fine-grained experts (DeepSeekMoE): ``granularity = m`` splits each of the ``num_experts``
    experts of width ``expert_d_ff`` into ``m`` experts of width ``expert_d_ff / m`` and lets every
    token reach ``m`` times as many (the router's ``top_k``, or expert choice's capacity factor, is
    multiplied by ``m``), so total and active parameters stay the same. Shared experts:
    ``num_shared_experts`` experts of the (fine-grained) expert width that every token passes
    through, behind a per-token sigmoid gate (``shared_expert_gate``, Qwen2-MoE) or not (DeepSeek).

    Args:
        num_experts: experts per MoE layer before the fine-grained split, >= 1.
        expert_d_ff: hidden width of each expert before the split, >= 1, divisible by ``granularity``.
        router: router factory, called as ``router(d_model, num_experts * granularity)`` for each MoE
            layer; its experts per token are then multiplied by ``granularity``.
        balancers: auxiliary losses of every MoE layer; ``None`` means ``[SwitchAuxLoss(0.01),
            ZLoss(0.001)]``, ``[]`` none.
        capacity: expert capacity with token dropping
            (:class:`~lightning_moe.routing.ExpertCapacity`); ``None`` is dropless.
        dispatcher: a registered dispatch backend (``lightning_moe.dispatch.DISPATCHERS``): ``auto``
            (the default: ``grouped`` on CPU, ``triton`` on a GPU), ``grouped`` (fast on CPU),
            ``triton`` (GPU kernels, the expert GEMMs on the faster engine measured once;
            ``triton-kernels`` / ``triton-grouped_mm`` force our Triton GEMMs / torch's
            ``grouped_mm``; falls back to ``grouped`` with a warning where the kernels cannot run),
            ``loop`` (the reference), or one added by ``register_dispatcher``.
        granularity: fine-grained split factor m, >= 1.
        num_shared_experts: shared experts per MoE layer, >= 0, each of width ``expert_d_ff / granularity``.
        shared_expert_gate: gate the shared experts' output with a per-token sigmoid.
        expert_parallel_size: ranks each MoE layer's experts are split over (P), >= 1, dividing
            ``num_experts * granularity`` (and, when training, the number of processes). The routed
            experts are built without storage; :func:`~lightning_moe.parallel.setup_expert_parallel`
            gives each rank storage for its ``E / P`` experts only, with the values P = 1 gives for
            the same seed. With ``moe_ddp`` or ``MoEDeepSpeedStrategy`` every rank writes its own
            experts to the checkpoint, which loads at any P.
    """

    num_experts: int = 8
    expert_d_ff: int = 256
    router: RouterFactory = TopKRouter
    balancers: list[Balancer] | None = None
    capacity: ExpertCapacity | None = None
    dispatcher: str = "auto"
    granularity: int = 1
    num_shared_experts: int = 0
    shared_expert_gate: bool = False
    expert_parallel_size: int = 1

    def __post_init__(self) -> None:
        for name in ("num_experts", "expert_d_ff", "granularity", "expert_parallel_size"):
            check_positive_int(name, getattr(self, name))
        check_non_negative_int("num_shared_experts", self.num_shared_experts)
        if self.expert_d_ff % self.granularity:
            raise ValueError(f"`granularity` ({self.granularity}) must divide `expert_d_ff` ({self.expert_d_ff}); "
                             f"valid values: {divisors(self.expert_d_ff)}.")
        if self.shared_expert_gate and not self.num_shared_experts:
            raise ValueError("`shared_expert_gate=True` needs `num_shared_experts` >= 1.")
        if self.routed_experts % self.expert_parallel_size:
            raise ValueError(
                f"`expert_parallel_size`={self.expert_parallel_size} must divide the routed experts per layer, "
                f"num_experts * granularity = {self.routed_experts}; valid values are {divisors(self.routed_experts)}.")
        get_dispatcher(self.dispatcher)  # an unknown name fails here, listing the registered ones
        if self.balancers is not None:
            self.balancers = list(self.balancers)

    @property
    def routed_experts(self) -> int:
        """Experts per MoE layer after the fine-grained split, ``num_experts * granularity``."""
        return self.num_experts * self.granularity

    @property
    def routed_d_ff(self) -> int:
        """Width of each routed expert after the split, ``expert_d_ff / granularity``."""
        return self.expert_d_ff // self.granularity

    def layer_balancers(self) -> list[Balancer]:
        """The balancers every layer shares (``None`` -> :func:`default_balancers`)."""
        if self.balancers is None:
            self.balancers = default_balancers()
        return self.balancers

    def plain(self) -> dict[str, object]:
        """The fields that are plain values (numbers, strings, bools, None), for hyperparameters."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if isinstance(getattr(self, f.name), (str, int, float, bool, type(None)))}
