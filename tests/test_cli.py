import subprocess
import sys

from PIL import Image


def _cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "diffusers_srpo", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_demo_writes_an_image(tmp_path):
    result = _cli("demo", "--output-dir", "out", "--resolution", "32", "--steps", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    image = Image.open(tmp_path / "out" / "sample.png")
    assert image.size == (32, 32)
    assert len(set(image.getdata())) > 1
    assert "out/sample.png" in result.stdout


def test_demo_rejects_bad_resolution_before_writing(tmp_path):
    result = _cli("demo", "--output-dir", "out", "--resolution", "30", cwd=tmp_path)
    assert result.returncode == 2
    assert "--resolution" in result.stderr and "30" in result.stderr
    assert not (tmp_path / "out").exists()
