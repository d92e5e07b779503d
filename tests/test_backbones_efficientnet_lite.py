"""The Keras EfficientNet-Lite0/1/2 (pipeline/backbones/efficientnet_lite.py): layer names, block boundaries, the
scaled channel and block counts against the shipped checkpoints, their torch weights assigned one by one, Lite0's
reference logits, and real photos landing in the right ImageNet classes. The checkpoint reader has its own tests
(test_backbones_torch_legacy.py)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from pipeline.backbones.efficientnet_lite import (
    BLOCK_BOUNDARIES,
    VARIANTS,
    EfficientNetLite,
    EfficientNetLite0,
    block_boundaries,
    load_torch_weights,
    round_filters,
)
from pipeline.backbones.registry import REGISTRY
from pipeline.backbones.torch_legacy import load_legacy_state_dict
from pipeline.backbones.weights import lite_weights_path
from pipeline.data.images import load_image

DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


# ---------------------------------------------------------------------------------------
# Model

@pytest.fixture(scope="module")
def state_dict() -> dict[str, np.ndarray]:
    return load_legacy_state_dict(lite_weights_path("efficientnet_lite0"))


@pytest.fixture(scope="module")
def imagenet_model():
    return EfficientNetLite0(include_top=True, weights="imagenet")


def test_every_lite_variant_is_registered_at_its_native_size() -> None:
    assert {n: REGISTRY[n].default_size for n in VARIANTS} == {
        "efficientnet_lite0": 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260}
    assert all(REGISTRY[n].preprocessing == "tf" for n in VARIANTS)


def test_round_filters_follows_the_original_rule() -> None:
    # Lite2's width 1.1 on Lite0's stage channels: 16 24 40 80 112 192 320 → the published 16 24 48 88 120 208 352.
    assert [round_filters(c, 1.1) for c in (16, 24, 40, 80, 112, 192, 320)] == [16, 24, 48, 88, 120, 208, 352]
    assert [round_filters(c, 1.0) for c in (16, 24, 40, 80, 112, 192, 320)] == [16, 24, 40, 80, 112, 192, 320]


@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_scaled_variant_matches_its_checkpoint_block_for_block(name) -> None:
    """Depth and width scaling read off the shipped checkpoint itself: block count, each block's kernel and
    output channels, stem and head unscaled; then every array lands, none left at its initial value."""
    sd = load_legacy_state_dict(lite_weights_path(name))
    n_blocks = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("_blocks."))
    boundaries = block_boundaries(VARIANTS[name])
    assert n_blocks == 21 == len(boundaries) - 1  # stages of 1, 3, 3, 4, 4, 5, 1 blocks
    assert boundaries[-2:] == ["block7a_expand_conv", "top_conv"] and "block6e_expand_conv" in boundaries
    model = EfficientNetLite(name, include_top=True, input_shape=(VARIANTS[name].size,) * 2 + (3,))
    for i, layer in enumerate(b.removesuffix("expand_conv").removesuffix("dwconv") for b in boundaries[:-1]):
        project = sd[f"_blocks.{i}._project_conv.weight"]
        assert model.get_layer(layer + "project_conv").kernel.shape[-1] == project.shape[0], layer
        assert model.get_layer(layer + "dwconv").kernel.shape[0] == sd[f"_blocks.{i}._depthwise_conv.weight"].shape[-1]
    assert model.get_layer("stem_conv").kernel.shape[-1] == 32 and model.get_layer("top_conv").kernel.shape[-1] == 1280
    before = [w.copy() for w in model.get_weights()]
    load_torch_weights(model, sd, name)
    assert all(not np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    assert model.count_params() == sum(v.size for k, v in sd.items() if not k.endswith("num_batches_tracked"))


def test_a_checkpoint_of_another_variant_is_refused_by_name() -> None:
    model = EfficientNetLite("efficientnet_lite1", input_shape=(64, 64, 3))
    with pytest.raises(ValueError, match=r"not EfficientNet-Lite1.*unexpected|not EfficientNet-Lite1.*missing"):
        load_torch_weights(model, load_legacy_state_dict(lite_weights_path("efficientnet_lite0")), "efficientnet_lite1")


def test_layer_names_and_boundaries() -> None:
    model = EfficientNetLite0(input_shape=(224, 224, 3))
    names = {layer.name for layer in model.layers}
    assert len(BLOCK_BOUNDARIES) == 17 and BLOCK_BOUNDARIES[-1] == "top_conv"
    assert BLOCK_BOUNDARIES[0] == "block1a_dwconv"
    assert set(BLOCK_BOUNDARIES) <= names
    assert {"block6a_expand_conv", "stem_conv", "block2a_dwconv_pad", "block2b_add",
            "top_activation"} <= names
    assert "block2a_add" not in names  # stride-2 blocks have no residual
    assert model.output.shape == (None, 7, 7, 1280)
    assert model.count_params() == 4_694_024 - 1280 * 1000 - 1000  # Lite0 without the fc


def test_load_assigns_every_weight(state_dict) -> None:
    model = EfficientNetLite0(include_top=True, input_shape=(224, 224, 3))
    before = [w.copy() for w in model.get_weights()]
    load_torch_weights(model, state_dict)
    after = model.get_weights()
    n_state = sum(v.size for k, v in state_dict.items() if not k.endswith("num_batches_tracked"))
    assert sum(w.size for w in after) == n_state
    changed = [not np.array_equal(a, b) for a, b in zip(before, after)]
    assert all(changed), f"{changed.count(False)} weights kept their initial values"

    def kernel(name: str) -> np.ndarray:
        return model.get_layer(name).get_weights()[0]

    np.testing.assert_array_equal(kernel("stem_conv"),
                                  state_dict["_conv_stem.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(kernel("block6a_dwconv"),
                                  state_dict["_blocks.11._depthwise_conv.weight"].transpose(2, 3, 0, 1))
    np.testing.assert_array_equal(kernel("block7a_project_conv"),
                                  state_dict["_blocks.15._project_conv.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(kernel("predictions"), state_dict["_fc.weight"].T)
    gamma, beta, mean, var = model.get_layer("top_bn").get_weights()
    np.testing.assert_array_equal(mean, state_dict["_bn1.running_mean"])
    np.testing.assert_array_equal(var, state_dict["_bn1.running_var"])


def test_load_rejects_wrong_state_dicts(state_dict) -> None:
    model = EfficientNetLite0(input_shape=(224, 224, 3))
    before = model.get_weights()

    wrong_shape = dict(state_dict)
    wrong_shape["_blocks.3._project_conv.weight"] = np.zeros((24, 144, 3, 3), np.float32)
    with pytest.raises(ValueError, match=r"not EfficientNet-Lite0.*_blocks\.3\._project_conv"):
        load_torch_weights(model, wrong_shape)

    missing = {k: v for k, v in state_dict.items() if k != "_blocks.5._bn1.running_var"}
    with pytest.raises(ValueError, match=r"missing.*_blocks\.5\._bn1\.running_var"):
        load_torch_weights(model, missing)

    extra = dict(state_dict, **{"_blocks.16._bn0.weight": np.ones(8, np.float32)})
    with pytest.raises(ValueError, match=r"unexpected.*_blocks\.16\._bn0\.weight"):
        load_torch_weights(model, extra)

    # A rejected file leaves the model untouched (all checks run before any assignment).
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))


def _test_pattern(size: int = 224) -> np.ndarray:
    """A deterministic smooth input in [-1, 1], float32 (1, size, size, 3)."""
    i = np.arange(size, dtype=np.float32)[:, None, None]
    j = np.arange(size, dtype=np.float32)[None, :, None]
    c = np.arange(3, dtype=np.float32)[None, None, :]
    return (np.sin(i * 0.05 + c) * np.cos(j * 0.07 - 2 * c)).astype(np.float32)[None]


# Logits of _test_pattern() from an independent forward pass written with
# torch.nn.functional on the same state dict (symmetric k//2 padding, BN eps 1e-3), computed
# once with torch 2.13 CPU. They pin padding, BN epsilon, residuals and weight layouts, which
# a loose accuracy threshold would not.
TORCH_REFERENCE_LOGITS = {906: 6.1845, 772: 5.9447, 885: 5.8728, 782: 5.3872, 902: 5.1821,
                          0: 0.7421, 151: -1.0449, 281: -0.6753, 999: -1.2969}


def test_matches_torch_reference_logits(imagenet_model) -> None:
    import keras

    pooled = keras.Model(imagenet_model.input, imagenet_model.get_layer("avg_pool").output)
    kernel, bias = imagenet_model.get_layer("predictions").get_weights()
    logits = pooled.predict_on_batch(_test_pattern())[0] @ kernel + bias
    assert list(np.argsort(-logits)[:5]) == [906, 772, 885, 782, 902]
    for cls, want in TORCH_REFERENCE_LOGITS.items():
        assert abs(logits[cls] - want) < 2e-3, (cls, float(logits[cls]), want)


@pytest.mark.realdata
@pytest.mark.parametrize("name", list(VARIANTS))
def test_imagenet_superclasses_on_dogs_vs_cats(name) -> None:
    """Real-data proof that the converted weights work: cats/dogs land in the right
    ImageNet super-class (dogs 151..268, domestic cats 281..285), each variant at its native size."""
    root = DATASETS / "dogs_vs_cats"
    if not root.is_dir():
        pytest.skip("../shared/datasets/dogs_vs_cats not found: real-data test needs the "
                    "shared datasets")
    size = VARIANTS[name].size
    model = EfficientNetLite(name, include_top=True, weights="imagenet", input_shape=(size, size, 3))
    paths, is_dog = [], []
    for cls in ("cats", "dogs"):
        names = sorted(n for n in os.listdir(root / cls) if not n.startswith("."))[:400]
        assert len(names) == 400, f"expected at least 400 images in {root / cls}"
        paths += [root / cls / n for n in names]
        is_dog += [cls == "dogs"] * len(names)
    is_dog = np.array(is_dog)

    top1 = []
    for start in range(0, len(paths), 32):
        batch = np.stack([load_image(str(p), size) for p in paths[start:start + 32]])
        x = batch.astype(np.float32) / 127.5 - 1.0
        top1.append(model.predict_on_batch(x).argmax(axis=1))
    top1 = np.concatenate(top1)
    right = np.where(is_dog, (top1 >= 151) & (top1 <= 268), (top1 >= 281) & (top1 <= 285))
    fraction = float(right.mean())
    print(f"\n{name} ImageNet super-class accuracy on {len(right)} dogs_vs_cats "
          f"images: {fraction:.4f} (cats {right[~is_dog].mean():.3f}, "
          f"dogs {right[is_dog].mean():.3f})")
    assert fraction >= 0.85
