"""Fine-tuning's per-epoch checkpoint (pipeline/finetuning/checkpoint.py): resumed only when its fingerprint says
it belongs to this very run, and then every variable, the optimizer's included, and the kept epoch come back."""
import logging

import h5py
import keras
import numpy as np
from conftest import as_params, tiny_params

from pipeline.finetuning.checkpoint import TrainState, fingerprint, restore_checkpoint, save_checkpoint

PROVENANCE = {"backbone": "efficientnet_lite0", "image_size": 64, "class_names": ["circle", "square"]}
ENGINE = {"engine": "onnxruntime", "engine_version": "x", "batch_shape": "any"}
ITEMS = [("circle/a.png", "circle", "train", b"\x01" * 32), ("square/b.png", "square", "train", b"\x02" * 32),
         ("square/c.png", "square", "val", b"\x03" * 32)]


def test_the_fingerprint_follows_what_shapes_training_and_nothing_else(tmp_path):
    head = tmp_path / "head.keras"
    head.write_bytes(b"head v1")

    def fp(items=ITEMS, replicas=1, unfreeze=None, **overrides):
        return fingerprint(as_params(tiny_params(**overrides)), PROVENANCE, head, items, ENGINE, replicas, unfreeze)

    base = fp()
    assert fp(**{"finetune.resume": False}) == base  # resuming or not is the same run
    # More epochs continue the same run under a constant rate; under cosine they change the curve.
    assert fp(**{"finetune.schedule": "constant", "finetune.epochs": 3}) == \
        fp(**{"finetune.schedule": "constant", "finetune.epochs": 9})
    assert fp(**{"finetune.schedule": "cosine", "finetune.epochs": 3}) != \
        fp(**{"finetune.schedule": "cosine", "finetune.epochs": 9})
    assert fp(items=ITEMS[::-1]) == base  # the images as a set
    others = [fp(**{"finetune.learning_rate": 3e-4}), fp(**{"finetune.augment.flip": False}), fp(seed=7),
              fp(items=[*ITEMS[:2], ("square/c.png", "square", "val", b"\x04" * 32)]),
              fp(items=[*ITEMS[:2], ("square/c.png", "square", "train", b"\x03" * 32)]),
              fp(replicas=2), fp(unfreeze="block5a_expand_conv")]
    assert len({base, *others}) == 1 + len(others)
    head.write_bytes(b"head v2")
    assert fp() != base
    assert fp(replicas=1) == fp()  # one device is the default


def _tiny_model(seed: int):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4,))
    x = keras.layers.Dropout(0.2, seed=seed)(keras.layers.Dense(8, activation="relu")(inputs))
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x))
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss="sparse_categorical_crossentropy")
    return model


def test_the_kept_epochs_weights_come_back_from_where_they_were_kept(tmp_path):
    x = np.random.default_rng(0).normal(size=(16, 4)).astype("float32")
    y = (x[:, 0] > 0).astype("int64")
    a = _tiny_model(1)
    initial = a.get_weights()
    a.fit(x, y, epochs=1, verbose=0)
    rows = [[0, "", "", 1.0, 0.5], [1, 0.9, 0.6, 0.8, 0.6]]
    for best_epoch, want in ((1, a.get_weights()), (0, initial)):
        ckpt = tmp_path / f"best{best_epoch}.h5"
        save_checkpoint(ckpt, "fp", TrainState(epoch=1, rows=rows, best_loss=0.8, best_epoch=best_epoch,
                                               best_weights=want), a)
        with h5py.File(ckpt) as h5:  # the current weights, or epoch 0's (rebuilt every run): not stored twice
            assert "best" not in h5
        b = _tiny_model(2)
        got = restore_checkpoint(ckpt, "fp", b, initial, max_epochs=3)
        assert got.best_epoch == best_epoch
        for w, v in zip(got.best_weights, want):
            np.testing.assert_array_equal(w, v)



def test_checkpoint_round_trip_and_refusals(tmp_path, caplog):
    x = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")
    y = (x[:, 0] > 0).astype("int64")
    a = _tiny_model(1)
    initial = a.get_weights()
    a.fit(x, y, epochs=2, verbose=0)
    state = TrainState(epoch=2, rows=[[0, "", "", 1.0, 0.5], [1, 0.9, 0.6, 0.8, 0.6], [2, 0.7, 0.7, 0.9, 0.6]],
                       best_loss=0.8, best_epoch=1, wait=1, best_weights=[w * 0 + 1 for w in initial])
    ckpt = tmp_path / "ckpt.h5"
    save_checkpoint(ckpt, "fp-A", state, a)

    b = _tiny_model(2)
    got = restore_checkpoint(ckpt, "fp-A", b, b.get_weights(), max_epochs=5)
    assert (got.epoch, got.best_epoch, got.wait, got.rows) == (2, 1, 1, state.rows)
    for va, vb in zip(a.variables + a.optimizer.variables, b.variables + b.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(va), np.asarray(vb), err_msg=va.path)  # incl. dropout seed state
    assert all((w == 1).all() for w in got.best_weights)
    # Continuing training from the restored model equals continuing the original.
    a.fit(x, y, epochs=1, verbose=0, shuffle=False)
    b.fit(x, y, epochs=1, verbose=0, shuffle=False)
    for wa, wb in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_array_equal(wa, wb)

    c = _tiny_model(3)
    untouched = [w.copy() for w in c.get_weights()]
    with caplog.at_level(logging.INFO, logger="pipeline.finetuning.checkpoint"):
        assert restore_checkpoint(ckpt, "fp-B", c, untouched, max_epochs=5) is None
        assert "belongs to another run" in caplog.text
        assert restore_checkpoint(ckpt, "fp-A", c, untouched, max_epochs=1) is None
        assert "beyond finetune.epochs = 1" in caplog.text
        ckpt.write_bytes(b"garbage, not HDF5")
        assert restore_checkpoint(ckpt, "fp-A", c, untouched, max_epochs=5) is None
        assert "cannot resume from" in caplog.text
    for w, u in zip(c.get_weights(), untouched):
        np.testing.assert_array_equal(w, u)
