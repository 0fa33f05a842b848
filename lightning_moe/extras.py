"""Optional dependencies: the ``pip install`` extra that brings each, and a check that names it."""

from __future__ import annotations

import importlib.util
import sys

#: ``extra: modules it installs`` (pyproject.toml's ``[project.optional-dependencies]``).
EXTRAS = {
    "hf": ("transformers", "peft"),
    "deepspeed": ("deepspeed",),
}


def missing(extra: str) -> list[str]:
    """The modules of ``extra`` that are not installed."""
    if extra not in EXTRAS:
        raise ValueError(f"`extra` must be one of {sorted(EXTRAS)}, got {extra!r}.")
    return [name for name in EXTRAS[extra] if importlib.util.find_spec(name) is None]


def require(extra: str, what: str | None = None) -> None:
    """Exit with status 1 and one line naming the extra and its install command when ``extra`` is not
    installed (for scripts and examples: call it before importing the modules)."""
    absent = missing(extra)
    if absent:
        needs = what or sys.argv[0] or "this script"
        print(f"{needs} needs the `{extra}` extra ({', '.join(absent)} not installed): pip install -e '.[{extra}]' "
              f"(from the repository root; or pip install 'lightning_moe[{extra}]').", file=sys.stderr)
        raise SystemExit(1)
