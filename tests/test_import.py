"""Importing diffusers_srpo needs no network and no CUDA, and CPU work never launches a Triton kernel."""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import socket

    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled by the test")

    socket.socket.connect = refuse
    socket.create_connection = refuse

    # The interpreter would happily run a kernel on CPU tensors: count every launch.
    import triton.runtime.interpreter as interpreter
    import triton.runtime.jit as jit

    launches = []
    for cls in (jit.JITFunction, interpreter.InterpretedFunction):
        original = cls.run
        def run(self, *args, _original=original, **kwargs):
            launches.append(getattr(self, "__name__", repr(self)))
            return _original(self, *args, **kwargs)
        cls.run = run

    import torch
    import diffusers_srpo
    import diffusers_srpo.kernels
    from diffusers_srpo import ops
    from diffusers_srpo.testing import tiny_flux_pipeline

    assert not torch.cuda.is_available()
    x0, noise, v = torch.randn(3, 2, 16, 64).unbind(0)
    sigma = torch.tensor([0.9, 0.8])
    x = ops.add_noise_prior(x0, noise, sigma)
    ops.step_and_recover(v, x, sigma, sigma - 0.1, noise)
    ops.srp_score(torch.randn(2, 8), torch.randn(2, 8), torch.randn(2, 8), torch.tensor([0.1, 0.2]))
    pipe = tiny_flux_pipeline()
    pipe("a red circle", height=32, width=32, num_inference_steps=2, max_sequence_length=16, output_type="np")

    assert not launches, f"Triton kernels launched on CPU: {launches}"
    assert not attempts, f"network used: {attempts}"
    print("OK", diffusers_srpo.__version__)
    """
)


def test_import_offline_without_cuda_and_no_triton_launch_on_cpu():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1", HF_HUB_OFFLINE="0")
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK" in result.stdout


def test_kernels_subpackage_is_not_top_level(tmp_path):
    import diffusers_srpo.kernels

    assert diffusers_srpo.kernels.__name__ == "diffusers_srpo.kernels"
    # Hugging Face's `kernels` library may be installed, and transformers probes for it by name: the
    # installed project must never be what answers to `import kernels`. Ask from outside the source tree.
    probe = "import importlib.util; spec = importlib.util.find_spec('kernels'); print(spec.origin if spec else None)"
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True)
    origin = result.stdout.strip()
    ours = os.path.dirname(diffusers_srpo.kernels.__file__)
    assert origin == "None" or os.path.dirname(origin) != ours, origin


def test_regular_install_ships_kernels_inside_the_package(tmp_path):
    """A non-editable install (a built wheel) carries kernels/ as diffusers_srpo.kernels, and the toy world's
    weights, and imports from there."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", root, "-w", str(tmp_path / "wheel")],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = (tmp_path / "wheel").glob("diffusers_srpo-*.whl")
    target = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True, timeout=300)
    assert not (target / "kernels").exists(), "the wheel installs a top-level `kernels` package"
    shipped = target / "diffusers_srpo" / "toyworld" / "weights"
    assert (shipped / "pipeline" / "model_index.json").is_file() and (shipped / "reward").is_dir()
    probe = "import diffusers_srpo.kernels as k, diffusers_srpo.kernels.flow; print(k.__file__)"
    env = dict(os.environ, PYTHONPATH=str(target))
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, check=True, timeout=300
    )
    assert result.stdout.strip().startswith(str(target / "diffusers_srpo" / "kernels")), result.stdout
