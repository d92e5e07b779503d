"""Fitting the top (pipeline/finetuning/trainer.py): epoch 0 is the head-only model; a run resumes from a checkpoint
of this very run (and, finished there, does not fit again); each epoch is checkpointed; early stopping ends it."""
import keras
import numpy as np
import pytest
from conftest import ACTIVATION_SHAPE, StandInBottom, as_params, make_images, stand_in_activations, tiny_params

from pipeline.core.io import file_digests
from pipeline.finetuning.recipe import compile_top
from pipeline.finetuning.stream import TrainData, clean_dataset
from pipeline.finetuning.trainer import RunCheckpoint, fit_top, initial_state

FINETUNE = {"finetune.epochs": 3, "finetune.views": 2, "finetune.ema": 0.0, "finetune.batch_size": 4,
            "finetune.patience": 5, "finetune.learning_rate": 0.05, "finetune.warmup_epochs": 0.0}


@pytest.fixture
def data(tmp_path):
    raw = make_images(tmp_path / "raw", per_class=4, size=20)
    paths = sorted(str(p) for p in raw.rglob("*.png"))
    labels = [("circle", "square", "stripes").index(p.split("/")[-2]) for p in paths]
    val = paths[::4]
    bottom = StandInBottom()
    acts = stand_in_activations(tmp_path / "cache", bottom)
    val_set = clean_dataset(acts, val, file_digests(val), labels[::4], batch_size=4)
    return TrainData(acts, paths, file_digests(paths), labels, 3, val_set), bottom


def _top(params, steps):
    keras.utils.set_random_seed(0)
    top = keras.Sequential([keras.Input(ACTIVATION_SHAPE), keras.layers.Flatten(),
                            keras.layers.Dense(3, activation="softmax")])
    compile_top(top, params.finetune, steps, 1)
    return top


def _start(params, data):
    top = _top(params, 3)
    loss, acc = top.evaluate(data.val, verbose=0)
    return top, initial_state(loss, acc, top.get_weights())


def test_epoch_0_is_the_head_only_model_with_its_val_metrics():
    state = initial_state(0.7, 0.5, [np.ones(2)])
    assert state.rows == [[0, "", "", 0.7, 0.5]] and state.best_loss == 0.7
    assert (state.epoch, state.best_epoch, state.wait, state.stopped) == (0, 0, 0, False)


def test_a_run_checkpoints_each_epoch_and_a_rerun_of_the_finished_run_does_not_fit_again(tmp_path, data):
    data, bottom = data
    params = as_params(tiny_params(**FINETUNE))
    ckpt = RunCheckpoint(tmp_path / "ckpt.h5", "fp")
    top, state = _start(params, data)
    state, fitted, _ = fit_top(top, state, params, data, ckpt, None, replicas=1)
    assert fitted and state.epoch == 3 and [r[0] for r in state.rows] == [0, 1, 2, 3]
    assert ckpt.path.is_file() and bottom.images == 3 + 2 * 12  # val once, two views of every train image
    # The same run again: resumed after its last epoch, nothing left to fit.
    again, again_state = _start(params, data)
    again_state, fitted, _ = fit_top(again, again_state, params, data, ckpt, None, replicas=1)
    assert not fitted and again_state.rows == state.rows and again_state.best_epoch == state.best_epoch
    for a, b in zip(again.get_weights(), top.get_weights()):
        np.testing.assert_array_equal(a, b)
    # finetune.resume off, or another run (another fingerprint): trained from epoch 0 (each run then overwrites
    # the checkpoint with its own).
    for other, p in ((ckpt, as_params(tiny_params(**{**FINETUNE, "finetune.resume": False}))),
                     (RunCheckpoint(ckpt.path, "other"), params)):
        top3, state3 = _start(p, data)
        state3, fitted, _ = fit_top(top3, state3, p, data, other, None, replicas=1)
        assert fitted and state3.rows[1:] == state.rows[1:]


def test_early_stopping_ends_the_run_after_patience_epochs_without_improvement(data):
    data, bottom = data
    params = as_params(tiny_params(**{**FINETUNE, "finetune.patience": 1}))
    top, state = _start(params, data)
    state.best_loss = -1.0  # no epoch can beat it
    state, fitted, _ = fit_top(top, state, params, data, RunCheckpoint(None, ""), None, replicas=1)
    assert fitted and state.stopped and state.epoch == 1 and len(state.rows) == 2


def test_an_early_stopped_run_computes_no_view_it_does_not_train_on(data):
    data, bottom = data
    params = as_params(tiny_params(**{**FINETUNE, "finetune.patience": 1}))
    top, state = _start(params, data)
    state.best_loss = -1.0
    _, _, seconds = fit_top(top, state, params, data, RunCheckpoint(None, ""), None, replicas=1)
    assert bottom.images == 3 + 12  # val, and view 0 of the one epoch trained
    assert set(seconds) == {"bottom", "validate", "checkpoint", "train"} and min(seconds.values()) >= 0
