"""When the Triton kernels can run, and why not when they cannot.

The kernels run on CUDA tensors, or on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1``, set before Triton is first imported): correct but slow, which is how the
tests check them on machines without a GPU. Triton is imported only here, lazily.
"""

from __future__ import annotations

import functools
import os

from torch import Tensor


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET=1``: kernels run on CPU tensors, in Python."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _import_error() -> str | None:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as error:  # ImportError, or a broken install raising something else
        return f"Triton cannot be imported ({type(error).__name__}: {error}); `pip install triton`"
    return None


def unavailable_reason(*tensors: Tensor) -> str | None:
    """``None`` if the Triton kernels can run on ``tensors``; otherwise a sentence saying why not."""
    error = _import_error()
    if error is not None:
        return error
    devices = {t.device.type for t in tensors}
    if interpreting():
        if devices - {"cpu"}:
            return f"TRITON_INTERPRET=1 runs kernels on CPU tensors only, got devices {sorted(devices)}"
        return None
    if devices != {"cuda"}:
        return (f"the Triton kernels need CUDA tensors, got devices {sorted(devices)} "
                "(set TRITON_INTERPRET=1 to run them, slowly, on CPU)")
    return None


def require_triton(*tensors: Tensor) -> None:
    """Raise ``RuntimeError`` naming the reason when the kernels cannot run on ``tensors``."""
    reason = unavailable_reason(*tensors)
    if reason is not None:
        raise RuntimeError(f"Triton kernels unavailable: {reason}.")
