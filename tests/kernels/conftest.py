"""Kernel tests: without Triton the whole folder is skipped.

``TRITON_INTERPRET=1`` (kernels on CPU tensors, in Python) is set by ``tests/conftest.py`` when
there is no GPU, before any kernel module is imported.
"""

import pytest

pytest.importorskip("triton", reason="the kernel tests need Triton")
