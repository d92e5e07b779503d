"""The backbone registry (pipeline/backbones/registry.py): the one list of backbone names, each entry's input
sizes and default fine-tune boundary, and how ``backbone`` params resolve to a weights file and its digest.

Since params.py no longer imports backbone code, the registry is where an unknown ``backbone.name`` or a too
small ``backbone.image_size`` is refused: the message must name the key and list what is allowed.
"""
import hashlib
import os

import pytest
from conftest import ROOT

from pipeline.backbones.registry import (
    REGISTRY,
    BackboneError,
    get_spec,
    image_size,
    resolve,
)
from pipeline.core.params import BackboneParams, FinetuneParams, load_params, parse_params


def test_the_repo_default_is_auto_and_lite0_keeps_its_measured_boundary():
    assert load_params(ROOT / "params.yaml").finetune.unfreeze_from == "auto" == FinetuneParams().unfreeze_from
    assert REGISTRY["efficientnet_lite0"].unfreeze_from == "block6a_expand_conv"


@pytest.mark.parametrize("ask", [get_spec, lambda name: image_size(BackboneParams(name=name)),
                                 lambda name: resolve(BackboneParams(name=name, weights="none"))],
                         ids=["get_spec", "image_size", "resolve"])
def test_an_unknown_name_names_the_key_and_lists_every_backbone(ask):
    with pytest.raises(BackboneError) as exc:
        ask("resnet18")
    msg = str(exc.value)
    assert msg.startswith("backbone.name: unknown backbone 'resnet18'"), msg
    assert msg.endswith("use one of: " + ", ".join(REGISTRY)), msg  # every name, in the registry's order


@pytest.mark.parametrize("name, smallest", [("inception_v3", 75), ("xception", 71), ("mobilenet_v2", 32)])
def test_an_image_size_below_the_architectures_smallest_names_the_key_and_the_least_allowed(name, smallest):
    with pytest.raises(BackboneError) as exc:
        image_size(BackboneParams(name=name, image_size=smallest - 1))
    msg = str(exc.value)
    assert msg.startswith(f"backbone.image_size: {smallest - 1} is below the smallest input {name} accepts "
                          f"({smallest} px)"), msg
    assert f"use at least {smallest}, or null for its native size" in msg
    assert image_size(BackboneParams(name=name, image_size=smallest)) == smallest  # the bound itself is allowed
    assert image_size(BackboneParams(name=name)) == REGISTRY[name].default_size  # null: the native size


def test_resolve_hashes_a_weights_file_and_hashes_it_again_when_it_changes(tmp_path):
    path = tmp_path / "my.weights.h5"
    path.write_bytes(b"first weights")
    b = resolve(BackboneParams(name="mobilenet_v2", weights=str(path), image_size=64))
    assert (b.weights_arg, b.weights_id, b.size) == (str(path), "file:my.weights.h5", 64)
    assert b.weights_sha256 == hashlib.sha256(b"first weights").hexdigest()
    assert b.provenance() == {"backbone": "mobilenet_v2", "weights_id": "file:my.weights.h5",
                              "weights_sha256": b.weights_sha256, "image_size": 64, "pooling": "avg",
                              "preprocessing": "pillow-rgb-exif-bilinear-squash;tf"}
    # Other bytes under the same name (same size, a later mtime): another digest, not the remembered one.
    path.write_bytes(b"other weights")
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    again = resolve(BackboneParams(name="mobilenet_v2", weights=str(path), image_size=64))
    assert again.weights_sha256 == hashlib.sha256(b"other weights").hexdigest() != b.weights_sha256
    # Random init is one reproducible backbone, named by its seed, with no file to hash.
    none = resolve(BackboneParams(name="mobilenet_v2", weights="none"))
    assert (none.weights_arg, none.weights_id, none.provenance()["weights_sha256"]) == (None, "none:seed0", "")


def test_imagenet_weights_missing_from_keras_cache_say_where_to_put_them(tmp_path, monkeypatch):
    # An empty Keras home, whatever this machine's ~/.keras holds (Keras reads KERAS_HOME once, at import).
    from keras.src.backend import config

    monkeypatch.setattr(config, "_KERAS_DIR", str(tmp_path / "keras_home"))
    params = parse_params({"backbone": {"name": "xception", "weights": "imagenet"}})
    with pytest.raises(BackboneError) as exc:
        resolve(params.backbone)
    msg = str(exc.value)
    assert "xception_weights_tf_dim_ordering_tf_kernels_notop.h5" in msg
    assert str(tmp_path / "keras_home" / "models") in msg and "KERAS_HOME" in msg


def test_a_weights_value_that_is_no_file_says_what_it_may_be(tmp_path):
    with pytest.raises(BackboneError, match=r"backbone.weights: '.*missing.h5' is neither 'imagenet', 'none' nor an "
                                            r"existing file"):
        resolve(BackboneParams(weights=str(tmp_path / "missing.h5")))


def test_convnext_depthwise_convs_are_depthwise_layers_computing_what_keras_grouped_convs_compute():
    """keras.applications' ConvNeXt writes its depthwise convs as Conv2D(groups=channels), which only an XLA call
    runs on CPU and tf2onnx cannot convert; the registry's ConvNeXt has DepthwiseConv2D layers of the same names
    and the same outputs."""
    import keras
    import numpy as np

    from pipeline.backbones.registry import _depthwise_convs

    keras.utils.set_random_seed(0)
    original = keras.applications.ConvNeXtTiny(include_top=False, weights=None, input_shape=(32, 32, 3))
    # Keras initialises LayerScale at 1e-6, which would hide any error of the depthwise branch: make it count.
    rng = np.random.default_rng(1)
    for layer in original.layers:
        if layer.name.endswith("_layer_scale"):
            layer.set_weights([rng.uniform(0.5, 1.5, w.shape).astype(np.float32) for w in layer.get_weights()])
    rewritten = _depthwise_convs(original)
    grouped = [layer.name for layer in original.layers if isinstance(layer, keras.layers.Conv2D) and layer.groups > 1]
    assert len(grouped) == 18  # 3 + 3 + 9 + 3 blocks
    assert all(type(rewritten.get_layer(name)) is keras.layers.DepthwiseConv2D for name in grouped)
    assert [layer.name for layer in rewritten.layers[1:]] == [layer.name for layer in original.layers[1:]]
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(rewritten.predict_on_batch(x), original.predict_on_batch(x), rtol=1e-5, atol=1e-5)
    built = REGISTRY["convnext_tiny"].build(None, (32, 32, 3))
    assert not any(isinstance(layer, keras.layers.Conv2D) and layer.groups > 1 for layer in built.layers)
