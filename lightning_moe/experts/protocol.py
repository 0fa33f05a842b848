"""What a dispatcher may ask of the routed experts.

Legend: ``N`` rows given to one expert, ``A`` rows of all experts sorted by expert, ``D`` model
width, ``E`` experts, ``F`` expert hidden width.

Every experts module has :class:`Experts`' three members; the ``loop`` dispatcher needs nothing
else. A module may also offer its *fused form* (:class:`FusedSwiGLU`): SwiGLU experts hand their
three grouped weights to the fast paths, which then run their own kernels. Dispatchers ask for the
capability (:func:`swiglu_weights`), never for a class, so new expert kinds that offer it run fast
and others run through ``grouped_forward``.

Expert parallelism asks for one more capability, :class:`LazyExperts`: experts built without
storage (on the meta device) that later get storage for some of their experts only, each
initialised from its *global* index. :class:`SeededExperts` implements it for grouped experts whose
expert ``e`` starts from :func:`expert_generator` ``(init_seed, e)`` alone, so the initial model is
the same whichever rows a rank holds and whatever the number of experts before ``e``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from lightning_moe._validate import check_positive_int


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


@runtime_checkable
class LazyExperts(Protocol):
    """Experts that can be built without storage and given storage later, for some experts only.

    Built inside ``torch.device("meta")`` the module allocates nothing. :meth:`materialize` then
    gives it real storage for a run of global experts and initialises each one from its global
    index, so every split of the E experts over ranks holds rows of the same whole model.
    :class:`~lightning_moe.layers.MoELayer` builds its experts so when ``expert_parallel_size`` > 1
    and the module it gets offers this; other experts are built whole and sliced when sharded.
    Until materialised, the module stays lazy through ``Module.to``, ``.half()`` and the like
    (dtype changes are kept; the device is given to :meth:`materialize`).

    Attributes:
        num_experts: experts held (E until materialised for a shard).
        first_expert: global index of the first expert held (0 until then).
    """

    num_experts: int
    first_expert: int

    def materialize(self, rows: slice, device: torch.device | str | None = None) -> None:
        """Keep only the global experts ``rows`` (consecutive, inside those held), with storage on
        ``device``, each initialised from its global index; ``num_experts`` and ``first_expert``
        follow. Expert parameters stay the same objects (an optimizer built before still holds them)."""
        ...


def expert_generator(*key: int) -> torch.Generator:
    """A CPU generator seeded from the integers ``key``, e.g. ``(init_seed, expert)``: the same stream
    for the same key in every process and on every machine, unrelated streams for different keys."""
    digest = hashlib.blake2b(",".join(str(int(k)) for k in key).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little"))


def uniform_values(shape: tuple[int, ...], bound: float, generator: torch.Generator) -> Tensor:
    """``uniform(-bound, bound)`` float32 values of ``shape`` on the CPU, drawn from ``generator``."""
    return torch.empty(shape, device="cpu").uniform_(-bound, bound, generator=generator)


class SeededExperts(nn.Module):
    """Base of grouped experts (first dimension of every parameter = expert) that are
    :class:`LazyExperts`: expert ``e`` is initialised from ``expert_generator(init_seed, e)`` alone.

    Its values depend neither on E, nor on which experts a module holds, nor on the device.
    ``init_seed`` is one integer drawn from torch's global CPU generator at construction, with an
    explicit CPU device so that a build inside ``torch.device("meta")`` draws it too: a lazy build
    (expert parallelism) and a whole one consume the global RNG alike, and every weight built after
    the experts is the same. Subclasses register their expert parameters directly on themselves (no
    submodules or buffers) and define :meth:`expert_init`.
    """

    def __init__(self, num_experts: int) -> None:
        super().__init__()
        self.num_experts = check_positive_int("num_experts", num_experts)
        self.first_expert = 0
        self.init_seed = int(torch.randint(2**62, (), device="cpu"))
        self._materialize_device: torch.device | None = None  # the last device asked for while lazy

    def expert_init(self, generator: torch.Generator) -> dict[str, Tensor]:
        """One expert's initial values by parameter name, without the expert dimension (float32, CPU),
        drawn from ``generator`` in a fixed order."""
        raise NotImplementedError

    @property
    def is_lazy(self) -> bool:
        """Whether the expert parameters have no storage yet (meta tensors)."""
        return any(p.is_meta for p in self.parameters(recurse=False))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise every expert held from its global index, ``first_expert + row``; lazy
        parameters have nothing to fill and are left as they are."""
        if self.is_lazy:
            return
        params = dict(self.named_parameters(recurse=False))
        for row in range(self.num_experts):
            for name, values in self.expert_init(expert_generator(self.init_seed, self.first_expert + row)).items():
                params[name][row].copy_(values)

    @torch.no_grad()
    def materialize(self, rows: slice, device: torch.device | str | None = None) -> None:
        """:meth:`LazyExperts.materialize`. ``device=None``: the device the module was last moved to
        while lazy, else torch's default device. On the meta device the rows stay lazy (a shard
        without storage, for ``to_empty``; then :meth:`reset_parameters`)."""
        first, last = self.first_expert, self.first_expert + self.num_experts
        if not self.is_lazy:
            raise RuntimeError(f"{type(self).__name__} already has storage for experts {first}..{last - 1}; "
                               "materialize() gives storage to lazily built (meta) experts only.")
        if (rows.step not in (None, 1) or not isinstance(rows.start, int) or not isinstance(rows.stop, int)
                or not first <= rows.start < rows.stop <= last):
            raise ValueError(f"`rows` must be a slice of consecutive experts within [{first}, {last}), got {rows}.")
        if device is None:
            device = self._materialize_device or torch.get_default_device()
        for name, param in list(self.named_parameters(recurse=False)):
            real = nn.Parameter(torch.empty((rows.stop - rows.start, *param.shape[1:]), dtype=param.dtype,
                                            device=device), requires_grad=param.requires_grad)
            real.__dict__.update(param.__dict__)  # swap_tensors swaps the attributes too: keep any marks
            try:
                torch.utils.swap_tensors(param, real)  # same Parameter object, now with storage
            except RuntimeError as error:  # weak references or an autograd graph hold it
                raise RuntimeError(f"Cannot give the lazily built expert parameter {name!r} storage in place "
                                   f"({error}); materialise the experts before using them elsewhere.") from error
        self.num_experts, self.first_expert = rows.stop - rows.start, rows.start
        self.reset_parameters()

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> SeededExperts:
        # Lazy experts have no values to convert or move: follow dtype changes (a probe shows what `fn`
        # does) and remember the device for materialize(), so `.to(device)` before sharding allocates nothing.
        if not self.is_lazy:
            return super()._apply(fn, recurse)
        for param in list(self.parameters(recurse=False)):
            start = self._materialize_device or torch.device("cpu")
            probe = fn(torch.empty(0, dtype=param.dtype, device=start))
            if probe.device != start:
                self._materialize_device = probe.device
            if probe.dtype != param.dtype:  # the same Parameter object (an optimizer may hold it), marks kept
                param.data = torch.empty_like(param, dtype=probe.dtype)
        return self
