"""The fine-tune recipe (pipeline/finetuning/recipe.py): what trains (from the boundary up, BatchNorm frozen, BN
scales folded into the convs), how fast (warm-up, then cosine or constant), and which epoch is kept (the lowest val
loss, epoch 0 included, measured on the EMA weights, which are swapped in and back out bit for bit)."""
import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import as_params, tiny_params

from pipeline.backbones.build import block_boundaries, build_backbone, get_base
from pipeline.core.params import parse_params
from pipeline.finetuning.checkpoint import TrainState, restore_checkpoint
from pipeline.finetuning.recipe import (
    Tracker,
    build_optimizer,
    fold_bn_scale,
    learning_rate_schedule,
    replica_lr_scale,
    unfreeze_from,
)


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

    assert type(opt(optimizer="adam")) is keras.optimizers.Adam
    sgd = opt(optimizer="sgd", momentum=0.8)
    assert type(sgd) is keras.optimizers.SGD and sgd.momentum == 0.8
    adamw = opt(optimizer="adamw", weight_decay=0.01)
    assert type(adamw) is keras.optimizers.AdamW and adamw.weight_decay == 0.01


@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "mobilenet_v2"])
def test_fold_bn_scale_keeps_the_function_and_folds_only_the_unfrozen_convs(backbone):
    # efficientnet_lite0 with its real ImageNet weights (BN scales far from 1); mobilenet_v2 from
    # keras.applications (random weights, offline): the conv → BN lookup on another graph.
    weights = "imagenet" if backbone == "efficientnet_lite0" else "none"
    params = parse_params(tiny_params(**{"backbone.name": backbone, "backbone.weights": weights}))
    model = build_backbone(params.backbone)
    base = get_base(model)
    x = np.random.default_rng(0).uniform(0, 255, (4, 64, 64, 3)).astype(np.float32)
    before = model(x, training=False).numpy()
    frozen_before = {layer.name: [w.copy() for w in layer.get_weights()] for layer in base.layers
                     if isinstance(layer, keras.layers.BatchNormalization)}
    boundary = block_boundaries(base, backbone)[-3]
    unfreeze_from(base, boundary, backbone)
    folded = fold_bn_scale(base)
    after = model(x, training=False).numpy()
    assert folded > 0
    scale = np.abs(before).max()
    assert np.max(np.abs(after - before)) <= 1e-5 * max(scale, 1.0), "folding changed the backbone's output"
    n_unit = 0
    for layer in base.layers:
        if not isinstance(layer, keras.layers.BatchNormalization):
            continue
        gamma, _, _, var = layer.get_weights()
        conv = layer._inbound_nodes[0].parent_nodes[0].operation
        if conv.trainable and isinstance(conv, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)):
            assert np.allclose(gamma / np.sqrt(var + layer.epsilon), 1.0, atol=1e-6)
            n_unit += 1
        else:  # below the unfrozen blocks: untouched
            for w, w0 in zip(layer.get_weights(), frozen_before[layer.name]):
                np.testing.assert_array_equal(w, w0)
    assert n_unit == folded


def test_ema_tracker_measures_and_keeps_the_average_and_resumes_bit_exact(tmp_path):
    # finetune.ema: val is measured on the optimizer's moving average, the kept epoch is the average, the
    # trained weights go on untouched, and a run resumed from the checkpoint equals an uninterrupted one.
    x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype("int64")
    val = tf.data.Dataset.from_tensor_slices((x[:16], y[:16])).batch(16)  # as finetune's val dataset

    def start(seed):
        model = _toy(seed, ema=True)
        loss, acc = model.evaluate(val, verbose=0)
        return model, TrainState(epoch=0, rows=[[0, "", "", loss, acc]], best_loss=float("inf"),
                                 best_weights=model.get_weights())

    def fit(model, state, ckpt, first, last):
        tracker = Tracker(state, patience=5, checkpoint=ckpt, fp="fp", ema_val=val)
        model.fit(x, y, batch_size=16, initial_epoch=first, epochs=last, verbose=0, shuffle=False, callbacks=[tracker])
        return tracker.state

    ref, ref_state = start(1)
    ref_state = fit(ref, ref_state, tmp_path / "ref.h5", 0, 3)
    assert ref_state.best_epoch == 3  # a separable toy: every epoch improves
    average = [np.asarray(a) for a in ref.optimizer._model_variables_moving_average]
    for w, a in zip(ref_state.best_weights, average):  # the kept weights are the average...
        np.testing.assert_array_equal(w, a)
    with h5py.File(tmp_path / "ref.h5", "r") as h5:  # ...while the checkpoint's model holds the trained ones
        trained = [h5["model"][str(i)][...] for i in range(len(average))]
        best = [h5["best"][str(i)][...] for i in range(len(average))]
    assert max(float(np.max(np.abs(a - t))) for a, t in zip(average, trained)) > 1e-3
    for b, a in zip(best, average):
        np.testing.assert_array_equal(b, a)
    # The logged val loss is the average's.
    assert ref_state.rows[-1][3] == pytest.approx(ref.evaluate(val, verbose=0)[0], abs=1e-6)

    # Interrupted after epoch 2, resumed into a fresh model: the same rows, state and best weights, bit for bit.
    part, part_state = start(1)
    fit(part, part_state, tmp_path / "part.h5", 0, 2)
    fresh, fresh_state = start(7)
    restored = restore_checkpoint(tmp_path / "part.h5", "fp", fresh, fresh_state.best_weights, max_epochs=3)
    assert restored is not None and restored.epoch == 2 and restored.best_epoch == 2
    restored = fit(fresh, restored, tmp_path / "part.h5", 2, 3)
    assert restored.rows == ref_state.rows
    for a, b in zip(restored.best_weights, ref_state.best_weights):
        np.testing.assert_array_equal(a, b)


def _lr(steps_per_epoch=10, scale=1.0, **finetune):
    p = as_params(tiny_params(**{f"finetune.{k}": v for k, v in finetune.items()})).finetune
    lr = learning_rate_schedule(p, steps_per_epoch, scale)
    return [float(lr(step)) for step in range(p.epochs * steps_per_epoch + 1)]


def test_a_run_no_longer_than_the_warm_up_is_all_warm_up_and_no_warm_up_starts_at_the_peak():
    short = _lr(epochs=1, warmup_epochs=2.0, learning_rate=1e-3)
    assert short[0] == 0.0 and short[5] == pytest.approx(5e-4) and short[10] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(short, short[1:]))
    none = _lr(epochs=2, warmup_epochs=0.0, learning_rate=1e-3)
    assert none[0] == pytest.approx(1e-3) and none[10] == pytest.approx(5e-4) and none[20] == pytest.approx(0, abs=1e-9)
    # Several replicas: the peak scaled (linearly for SGD, by the square root for Adam), the same curve.
    scaled = _lr(epochs=2, warmup_epochs=0.5, learning_rate=1e-3, scale=replica_lr_scale("sgd", 4))
    np.testing.assert_allclose(scaled, 4 * np.asarray(_lr(epochs=2, warmup_epochs=0.5, learning_rate=1e-3)),
                               rtol=1e-5, atol=1e-12)
    assert (replica_lr_scale("sgd", 1), replica_lr_scale("adam", 4), replica_lr_scale("adamw", 9)) == (1.0, 2.0, 3.0)


def test_unfreeze_from_trains_from_the_boundary_up_and_leaves_batchnorm_frozen():
    base = get_base(build_backbone(parse_params({"backbone": {"name": "mobilenet_v2", "weights": "none",
                                                             "image_size": 32}}).backbone))
    n = unfreeze_from(base, "auto", "mobilenet_v2")  # auto: the registry's boundary, block_13_expand
    start = [layer.name for layer in base.layers].index("block_13_expand")
    assert base.trainable and n == len(base.trainable_weights) > 0
    for i, layer in enumerate(base.layers):
        is_bn = isinstance(layer, keras.layers.BatchNormalization)
        assert layer.trainable == (i >= start and not is_bn), layer.name
    bn_vars = {id(v) for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization)
               for v in layer.weights}
    assert not any(id(v) in bn_vars for v in base.trainable_weights)
    assert any(isinstance(layer, keras.layers.BatchNormalization) for layer in base.layers[start:])


def _toy(seed=0, ema=False):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(keras.layers.Dense(8, "relu")(inputs)))
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9, use_ema=ema, ema_momentum=0.9),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def _epoch(tracker, epoch, val_loss, weights=None):
    """One epoch's end as Keras reports it, with ``weights`` (a fill value) in the model."""
    if weights is not None:
        tracker.model.set_weights([np.full_like(w, weights) for w in tracker.model.get_weights()])
    tracker.on_epoch_end(epoch, {"loss": 1.0, "accuracy": 0.5, "val_loss": val_loss, "val_accuracy": 0.5})


def test_the_tracker_keeps_the_head_only_epoch_when_no_epoch_beats_it_and_stops_after_patience(tmp_path):
    model = _toy()
    head_only = model.get_weights()
    state = TrainState(epoch=0, rows=[[0, "", "", 0.5, 0.6]], best_loss=0.5, best_weights=head_only)
    tracker = Tracker(state, patience=2, checkpoint=tmp_path / "ckpt.h5", fp="fp")
    tracker.set_model(model)
    _epoch(tracker, 0, 0.6, weights=1.0)
    assert (state.epoch, state.wait, state.stopped, model.stop_training) == (1, 1, False, False)
    with h5py.File(tmp_path / "ckpt.h5") as h5:  # checkpointed after every epoch
        assert h5.attrs["fingerprint"] == "fp" and '"epoch": 1' in h5.attrs["state"]
    _epoch(tracker, 1, 0.5, weights=2.0)  # equal is no improvement
    assert (state.epoch, state.wait, state.stopped, model.stop_training) == (2, 2, True, True)
    assert state.best_epoch == 0 and state.best_loss == 0.5 and state.best_weights is head_only
    assert [r[0] for r in state.rows] == [0, 1, 2] and [r[3] for r in state.rows] == [0.5, 0.6, 0.5]


def test_the_tracker_keeps_the_weights_of_the_lowest_val_loss_and_waits_from_there():
    model = _toy()
    state = TrainState(epoch=0, rows=[[0, "", "", 0.5, 0.6]], best_loss=0.5, best_weights=model.get_weights())
    tracker = Tracker(state, patience=2, checkpoint=None, fp="")
    tracker.set_model(model)
    _epoch(tracker, 0, 0.4, weights=1.0)
    _epoch(tracker, 1, 0.45, weights=2.0)
    assert (state.best_epoch, state.best_loss, state.wait) == (1, 0.4, 1)
    assert all((w == 1.0).all() for w in state.best_weights)  # epoch 1's weights, not the model's now
    _epoch(tracker, 2, 0.3, weights=3.0)
    assert (state.best_epoch, state.wait, state.stopped) == (3, 0, False)
    assert all((w == 3.0).all() for w in state.best_weights)


def test_the_ema_swap_measures_the_average_and_gives_the_trained_weights_back_bit_exact():
    x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
    y = (x[:, 0] > 0).astype("int64")
    val = tf.data.Dataset.from_tensor_slices((x[:16], y[:16])).batch(16)
    model = _toy(ema=True)
    for i in range(8):  # steps without fit's end-of-training swap: the average trails the trained weights
        model.train_on_batch(x[8 * i:8 * i + 8], y[8 * i:8 * i + 8])
    trained = [v.numpy().copy() for v in model.trainable_variables]
    average = [np.asarray(a).copy() for a in model.optimizer._model_variables_moving_average]
    assert max(float(np.abs(t - a).max()) for t, a in zip(trained, average)) > 1e-4
    reference = _toy(seed=5)
    reference.set_weights(average)
    state = TrainState(epoch=0, rows=[[0, "", "", 9.0, 0.0]], best_loss=9.0)
    tracker = Tracker(state, patience=3, checkpoint=None, fp="", ema_val=val)
    tracker.set_model(model)
    logs = {"loss": 1.0, "accuracy": 0.5}
    tracker.on_epoch_end(0, logs)
    for v, t in zip(model.trainable_variables, trained):  # training goes on from exactly where it was
        np.testing.assert_array_equal(v.numpy(), t)
    for kept, a in zip(state.best_weights, average):  # the epoch kept is the average
        np.testing.assert_array_equal(kept, a)
    assert logs["val_loss"] == pytest.approx(reference.evaluate(val, verbose=0)[0], abs=1e-6)
    assert state.rows[-1][3] == logs["val_loss"]
