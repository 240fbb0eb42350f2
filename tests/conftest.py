import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _outside_the_repository(tmp_path, monkeypatch):
    """Every test runs in its own scratch folder, as a user's command would. A Python started in the repository's
    root (``python -c``, ``python -m``, as tests start fresh processes) puts that folder first on ``sys.path`` and
    imports its ``kernels/`` folder (installed as ``diffusers_srpo.kernels``) in place of Hugging Face's ``kernels``
    library, which transformers requires and diffusers imports."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def tiny_pipe():
    """One tiny FLUX-shaped pipeline shared by tests that only read it."""
    from diffusers_srpo.testing import tiny_flux_pipeline

    return tiny_flux_pipeline(seed=0)


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """A tiny FLUX pipeline folder, a tiny open_clip reward folder and a prompt file, as a user would have them.
    Shared by the command-line tests: they read it and write their outputs elsewhere (or into new names in it)."""
    from diffusers_srpo.testing import save_open_clip_local_dir, tiny_flux_pipeline, tiny_open_clip_model

    root = tmp_path_factory.mktemp("world")
    tiny_flux_pipeline(seed=0).save_pretrained(root / "flux")
    save_open_clip_local_dir(tiny_open_clip_model(seed=0), str(root / "clip"))
    (root / "prompts.txt").write_text("a red circle\na blue square\n")
    return root


@pytest.fixture(scope="module")
def one_thread_per_module():
    """One torch thread for a whole test module of tiny models (see ``one_thread``), restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """One torch thread for the test (the toy world's small matmuls run fastest so), restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one mixed-precision setting per process: a test that trains with another setting than the
    suite's usual "no" (the default config's bf16) starts from a cleared state and clears it again for the next."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()
