import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    # Seeds fixed for every test. Tiny tensors gain nothing from intra-op threads, and on a busy
    # 2-core machine OpenMP threads contending with other processes made a ResNet-50 step ~20x slower.
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
