"""``Schedule``: a value as a function of the optimizer step, for coefficients and update rates."""

from __future__ import annotations

import math
from typing import Literal

from lightning_moe._validate import (
    check_non_negative,
    check_non_negative_int,
    check_positive_float,
    check_positive_int,
)

ScheduleKind = Literal["constant", "linear", "cosine", "step"]
SCHEDULE_KINDS = ("constant", "linear", "cosine", "step")


class Schedule:
    """``schedule(step) -> float``, a pure function of the optimizer step (so resuming is exact).

    Kinds:
        ``constant``: ``value`` at every step.
        ``linear``: linear warm-up from ``start_value`` at step 0 to ``value`` at ``warmup_steps``,
            then ``value``.
        ``cosine``: the linear warm-up, then a half-cosine from ``value`` down to ``final_value``
            reached at ``total_steps`` and held afterwards.
        ``step``: ``value * gamma ** (step // step_size)``.

    Args:
        kind: one of ``constant``, ``linear``, ``cosine``, ``step``.
        value: the target (peak) value, >= 0.
        start_value: value at step 0 of the warm-up, >= 0.
        final_value: value at the end of the cosine, >= 0.
        warmup_steps: warm-up length, >= 0 (``linear`` needs >= 1).
        total_steps: last step of the cosine, > ``warmup_steps`` (``cosine`` only).
        step_size: steps between multiplications by ``gamma``, >= 1 (``step`` only).
        gamma: factor applied every ``step_size`` steps, > 0 (``step`` only).
    """

    def __init__(
        self,
        kind: ScheduleKind = "constant",
        value: float = 1e-3,
        start_value: float = 0.0,
        final_value: float = 0.0,
        warmup_steps: int = 0,
        total_steps: int | None = None,
        step_size: int = 1000,
        gamma: float = 0.5,
    ) -> None:
        if kind not in SCHEDULE_KINDS:
            raise ValueError(f"`kind` must be one of {SCHEDULE_KINDS}, got {kind!r}.")
        self.kind = kind
        self.value = check_non_negative("value", value)
        self.start_value = check_non_negative("start_value", start_value)
        self.final_value = check_non_negative("final_value", final_value)
        self.warmup_steps = check_non_negative_int("warmup_steps", warmup_steps)
        if kind == "linear" and warmup_steps < 1:
            raise ValueError("`kind='linear'` needs `warmup_steps` >= 1.")
        if kind == "cosine":
            if total_steps is None:
                raise ValueError("`kind='cosine'` needs `total_steps`.")
            check_positive_int("total_steps", total_steps)
            if total_steps <= warmup_steps:
                raise ValueError(f"`total_steps` ({total_steps}) must exceed `warmup_steps` ({warmup_steps}).")
        self.total_steps = total_steps
        self.step_size = check_positive_int("step_size", step_size)
        self.gamma = check_positive_float("gamma", gamma)

    def __call__(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"`step` must be >= 0, got {step}.")
        if self.kind == "constant":
            return self.value
        if self.kind == "step":
            return self.value * self.gamma ** (step // self.step_size)
        if step < self.warmup_steps:
            return self.start_value + (self.value - self.start_value) * step / self.warmup_steps
        if self.kind == "linear":
            return self.value
        assert self.total_steps is not None
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return self.final_value + 0.5 * (self.value - self.final_value) * (1.0 + math.cos(math.pi * progress))

    def __repr__(self) -> str:
        fields = {"constant": ["value"], "linear": ["value", "start_value", "warmup_steps"],
                  "cosine": ["value", "start_value", "final_value", "warmup_steps", "total_steps"],
                  "step": ["value", "step_size", "gamma"]}[self.kind]
        args = ", ".join(f"{name}={getattr(self, name)!r}" for name in fields)
        return f"Schedule(kind={self.kind!r}, {args})"


def as_schedule(value: float | Schedule, name: str) -> Schedule:
    """A float becomes a constant schedule; a :class:`Schedule` is returned as it is."""
    if isinstance(value, Schedule):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"`{name}` must be a float >= 0 or a Schedule, got {value!r}.")
    return Schedule("constant", value=check_non_negative(name, value))
