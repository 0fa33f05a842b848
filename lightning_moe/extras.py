"""Optional dependencies: the ``pip install`` extra that brings each, and a check that names it."""

from __future__ import annotations

import importlib.util
import sys

#: ``extra: modules it installs`` (pyproject.toml's ``[project.optional-dependencies]``).
EXTRAS = {
    "hf": ("transformers", "peft"),
    "deepspeed": ("deepspeed",),
}


def missing(extra: str, modules: tuple[str, ...] | None = None) -> list[str]:
    """The modules of ``extra`` (or those of them in ``modules``) that are not installed."""
    if extra not in EXTRAS:
        raise ValueError(f"`extra` must be one of {sorted(EXTRAS)}, got {extra!r}.")
    wanted = EXTRAS[extra] if modules is None else modules
    unknown = sorted(set(wanted) - set(EXTRAS[extra]))
    if unknown:
        raise ValueError(f"`modules` {unknown} are not in the `{extra}` extra {list(EXTRAS[extra])}.")
    return [name for name in wanted if importlib.util.find_spec(name) is None]


def require(extra: str, what: str | None = None, modules: tuple[str, ...] | None = None) -> None:
    """Exit with status 1 and one line naming the extra and its install command when ``extra`` (or the
    ``modules`` of it the caller uses) is not installed (for scripts and examples: call it before importing
    them)."""
    absent = missing(extra, modules)
    if absent:
        needs = what or sys.argv[0] or "this script"
        print(f"{needs} needs the `{extra}` extra ({', '.join(absent)} not installed): pip install -e '.[{extra}]' "
              f"(from the repository root; or pip install 'lightning_moe[{extra}]').", file=sys.stderr)
        raise SystemExit(1)
