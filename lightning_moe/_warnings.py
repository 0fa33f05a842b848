"""Known third-party warnings that say nothing a user of this library can act on, filtered narrowly (by
message, category and the module that triggers them; never all warnings)."""

from __future__ import annotations

import warnings

#: ``(message regex, category, module regex)``: the module is the one the warning is attributed to.
KNOWN = (
    # Lightning's pytree helper builds torch's LeafSpec, deprecated in torch 2.10+, on every batch transfer.
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, r"lightning\.pytorch\.utilities\._pytree"),
)


def filter_known_warnings() -> None:
    """Ignore the :data:`KNOWN` warnings (idempotent)."""
    for message, category, module in KNOWN:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
