import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_pipe():
    """One tiny FLUX-shaped pipeline shared by tests that only read it."""
    from diffusers_srpo.testing import tiny_flux_pipeline

    return tiny_flux_pipeline(seed=0)


@pytest.fixture
def one_thread():
    """One torch thread for the test (the toy world's small matmuls run fastest so), restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
