"""Kernel tests: without Triton the whole folder is skipped.

``TRITON_INTERPRET=1`` (kernels on CPU tensors, in Python) is set by ``tests/conftest.py`` when
there is no GPU, before any kernel module is imported. With a GPU, tensors that the tests make
without naming a device are made on it, so the same tests check the compiled kernels.
"""

import pytest
import torch

pytest.importorskip("triton", reason="the kernel tests need Triton")


@pytest.fixture(autouse=True)
def _kernel_device():
    if not torch.cuda.is_available():
        yield
        return
    with torch.device("cuda"):
        yield
