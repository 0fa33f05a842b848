"""The dispatcher registry: names in YAML and on the command line (``--model.moe.dispatcher``) map
to dispatcher factories; a new backend is one :func:`register_dispatcher` call.

Built in: ``auto`` (the default: ``grouped`` on CPU, ``triton`` on a GPU), ``loop`` (the
reference), ``grouped``, ``triton`` (Triton permute and combine, expert
GEMMs on the engine measured fastest, :mod:`lightning_moe.dispatch.engines`), and the same with the
engine forced: ``triton-kernels`` (our Triton GEMMs) and ``triton-grouped_mm``
(``torch.nn.functional.grouped_mm``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from lightning_moe.dispatch.base import Dispatcher
from lightning_moe.dispatch.grouped import GroupedDispatcher
from lightning_moe.dispatch.loop import LoopDispatcher
from lightning_moe.dispatch.triton import AutoDispatcher, TritonDispatcher

DispatcherFactory = Callable[[], Dispatcher]

DISPATCHERS: dict[str, DispatcherFactory] = {}
"""Registered backends, ``{name: factory}``; read it, change it through :func:`register_dispatcher`."""


def register_dispatcher(name: str, factory: DispatcherFactory, *, replace: bool = False) -> DispatcherFactory:
    """Make ``name`` a dispatcher choice everywhere (``MoELayer(dispatcher=name)``, YAML, the CLI).

    ``factory()`` returns a :class:`~lightning_moe.dispatch.Dispatcher` (a subclass's class works).
    Raises ``ValueError`` if ``name`` is taken, unless ``replace=True``. Returns ``factory``, so it
    also works as a class decorator through ``functools.partial``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"A dispatcher name must be a non-empty string, got {name!r}.")
    if name in DISPATCHERS and not replace:
        raise ValueError(f"A dispatcher named {name!r} is already registered; pass replace=True to replace it.")
    if not callable(factory):
        raise TypeError(f"`factory` must be callable and return a Dispatcher, got {factory!r}.")
    DISPATCHERS[name] = factory
    return factory


def get_dispatcher(dispatcher: str | Dispatcher) -> Dispatcher:
    """A new dispatcher of the registered ``name`` (a :class:`Dispatcher` is returned as is);
    ``ValueError`` lists the valid names otherwise."""
    if isinstance(dispatcher, Dispatcher):
        return dispatcher
    try:
        factory = DISPATCHERS[dispatcher]
    except (KeyError, TypeError):
        raise ValueError(f"Unknown `dispatcher` {dispatcher!r}; valid names are {sorted(DISPATCHERS)}.") from None
    made = factory()
    if not isinstance(made, Dispatcher):
        raise TypeError(f"The factory registered as dispatcher {dispatcher!r} returned {type(made).__name__}, "
                        "not a lightning_moe.dispatch.Dispatcher.")
    return made


for _name, _factory in (
    ("auto", AutoDispatcher),  # grouped on CPU, triton (engine "auto") on a GPU
    ("loop", LoopDispatcher),
    ("grouped", GroupedDispatcher),
    ("triton", TritonDispatcher),  # engine "auto"
    ("triton-kernels", functools.partial(TritonDispatcher, engine="triton")),
    ("triton-grouped_mm", functools.partial(TritonDispatcher, engine="grouped_mm")),
):
    register_dispatcher(_name, _factory)
