import os

# Tests never reach a hub: a hub name would otherwise take ~25 s to fail.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Without a GPU the Triton kernels run under Triton's interpreter. The variable is read when a
# kernel is defined, so it is set here, before any test module imports one.
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
