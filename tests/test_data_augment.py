"""Augmented views: a pure function of (image, key), cached by extract for the head, drawn per epoch by finetune."""
import hashlib

import h5py
import numpy as np
import pytest
from conftest import as_params, make_images, tiny_params

from pipeline import extract, prepare, train_head
from pipeline.backbones.build import build_backbone
from pipeline.core.manifest import SPLITS
from pipeline.core.params import AugmentParams
from pipeline.data.augment import augment, augment_uint8, view_key
from pipeline.data.images import load_image
from pipeline.extraction.features import FeatureSet
from pipeline.finetuning.recipe import build_optimizer, learning_rate_schedule
from pipeline.runtime.engines import compile_engine, has_gpu, resolve_engine


def _images(n: int, size: int = 32) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_a_view_depends_on_its_key_alone():
    x = _images(4)
    p = AugmentParams()
    keys = [view_key(bytes([i]), 0) for i in range(4)]
    whole = augment(x, p, keys).numpy()
    # The same image and key in another batch, at another position, gives the same bits.
    alone = augment(np.stack([x[2], x[0]]), p, [keys[2], view_key(b"other", 5)]).numpy()
    np.testing.assert_array_equal(whole[2], alone[0])
    assert not np.array_equal(whole[0], augment(x[:1], p, [view_key(b"\x00", 1)]).numpy()[0])
    assert whole.dtype == np.float32 and whole.shape == x.shape


def test_flip_only_mirrors_or_keeps_and_nothing_on_is_the_identity():
    x = _images(16)
    keys = [[7, i] for i in range(16)]
    flipped = augment(x, AugmentParams(flip=True, rotation=0.0, zoom=0.0, translation=0.0), keys).numpy()
    mirrored = [np.array_equal(f, x[i, :, ::-1].astype(np.float32)) for i, f in enumerate(flipped)]
    kept = [np.array_equal(f, x[i].astype(np.float32)) for i, f in enumerate(flipped)]
    assert all(m or k for m, k in zip(mirrored, kept)) and any(mirrored) and any(kept)
    off = AugmentParams(flip=False, rotation=0.0, zoom=0.0, translation=0.0)
    np.testing.assert_array_equal(augment(x, off, keys).numpy(), x.astype(np.float32))


def test_warp_keeps_the_picture_recognisable():
    """A mild warp moves pixels, it does not replace the image: the view stays close to the original."""
    grad = np.tile(np.linspace(0, 255, 64, dtype=np.float32)[None, :, None], (64, 1, 3))[None]
    view = augment(grad, AugmentParams(flip=False, rotation=0.02, zoom=0.05, translation=0.05), [[1, 2]]).numpy()
    assert 0 < np.abs(view - grad).mean() < 20


def _extract(tmp_path, raw, out, views, cache):
    params = as_params(tiny_params(str(raw), **{"extract.augmented_views": views}))
    prepare.run(raw_dir=raw, manifest=out / "manifest.csv", classes_out=out / "classes.json", params=params.data)
    outs = {s: out / f"{s}.h5" for s in SPLITS}
    m = extract.run(raw_dir=raw, manifest=out / "manifest.csv", classes_json=out / "classes.json", outs=outs,
                    params=params, metrics=out / "m.json", cache_dir=cache)
    return params, outs, m


def test_extract_caches_views_of_train_images_only_and_reuses_them(tmp_path):
    raw = make_images(tmp_path / "raw", per_class=12)
    cache = tmp_path / "cache"
    params, outs, m = _extract(tmp_path, raw, tmp_path / "a", 2, cache)
    with h5py.File(outs["train"], "r") as h5:
        feats, views, paths = h5["features"][...], h5["views"][...], [p.decode() for p in h5["paths"][...]]
        assert h5.attrs["augmented_views"] == 2 and "rotation" in h5.attrs["augment"]
    n = len(paths)
    assert views.shape == (n, 2, feats.shape[1]) and m["augmented_views_computed"] == 2 * n
    assert not np.array_equal(views[:, 0], feats) and not np.array_equal(views[:, 0], views[:, 1])
    for split in ("val", "test"):
        with h5py.File(outs[split], "r") as h5:
            assert "views" not in h5 and h5.attrs["augmented_views"] == 0
    # View k of an image is backbone(uint8(augment(image, view_key(sha256(file), k)))) on extract's engine,
    # in any batch.
    engine = resolve_engine(params.extract.engine, has_gpu())
    infer = compile_engine(build_backbone(params.backbone), 64, engine, params.extract.batch_size)
    digest = hashlib.sha256((raw / paths[3]).read_bytes()).digest()
    image = load_image(str(raw / paths[3]), 64)[None]
    again = infer(augment_uint8(np.concatenate([image, image]), params.augment,
                                [view_key(digest, 1), view_key(b"x", 0)]))[0]
    np.testing.assert_array_equal(again, views[3, 1])
    # A rerun computes nothing; one more view computes exactly that view, the first two reused as they were.
    _, _, m2 = _extract(tmp_path, raw, tmp_path / "b", 2, cache)
    assert m2["computed"] == 0 and m2["augmented_views_computed"] == 0
    _, outs3, m3 = _extract(tmp_path, raw, tmp_path / "c", 3, cache)
    assert m3["augmented_views_computed"] == n
    with h5py.File(outs3["train"], "r") as h5:
        np.testing.assert_array_equal(h5["views"][:, :2], views)


def test_head_is_fitted_on_every_image_and_its_views():
    rng = np.random.default_rng(0)
    fs = FeatureSet(rng.normal(size=(5, 3)).astype(np.float32), np.arange(5) % 2, [str(i) for i in range(5)], {},
                    views=rng.normal(size=(5, 2, 3)).astype(np.float32))
    x, y = train_head.training_rows(fs)
    assert x.shape == (15, 3) and list(y[:6]) == [0, 0, 0, 1, 1, 1]
    np.testing.assert_array_equal(x[3], fs.features[1])
    np.testing.assert_array_equal(x[5], fs.views[1, 1])
    plain = FeatureSet(fs.features, fs.labels, fs.paths, {})
    assert train_head.training_rows(plain)[0] is fs.features


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_learning_rate_warms_up_then_follows_the_schedule(schedule):
    p = as_params(tiny_params(**{"finetune.epochs": 4, "finetune.warmup_epochs": 1, "finetune.schedule": schedule,
                                 "finetune.learning_rate": 1e-3})).finetune
    lr = learning_rate_schedule(p, steps_per_epoch=10)
    values = [float(lr(step)) for step in range(41)]
    assert values[0] == 0.0 and values[5] == pytest.approx(5e-4) and values[10] == pytest.approx(1e-3)
    if schedule == "cosine":
        assert values[25] == pytest.approx(5e-4, rel=1e-3) and values[40] == pytest.approx(0.0, abs=1e-9)
        assert all(a >= b for a, b in zip(values[10:], values[11:]))
    else:
        assert values[40] == pytest.approx(1e-3)


def test_optimizer_choice():
    def opt(**kw):
        p = as_params(tiny_params(**{f"finetune.{k}": v for k, v in kw.items()})).finetune
        return build_optimizer(p, steps_per_epoch=10)
    import keras
    assert type(opt(optimizer="adam")) is keras.optimizers.Adam
    sgd = opt(optimizer="sgd", momentum=0.8)
    assert type(sgd) is keras.optimizers.SGD and sgd.momentum == 0.8
    adamw = opt(optimizer="adamw", weight_decay=0.01)
    assert type(adamw) is keras.optimizers.AdamW and adamw.weight_decay == 0.01
