import os

# Tests never reach a hub: a hub name would otherwise take ~25 s to fail.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Without a GPU the Triton kernels run under Triton's interpreter. The variable is read when a
# kernel is defined, so it is set here, before any test module imports one.
import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def one_thread():  # noqa: ANN201
    """Tiny models run fastest on one thread, and OpenMP threads spin-wait badly when other jobs share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Every test that starts several processes is slow too: `-m 'not slow'` leaves them out (README).
    for item in items:
        if item.get_closest_marker("distributed") and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)
