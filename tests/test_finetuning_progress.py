"""What a fine-tune shows while it runs (pipeline/finetuning/progress.py): a bar of each epoch's batches on a
terminal only, and dvclive's steps: epoch 0 the head-only model, then one per epoch, a resumed run's restored
epochs logged again."""
from __future__ import annotations

import csv
import time

import keras
import numpy as np
import pytest

from pipeline.finetuning.progress import BatchProgress, Clock, live_callbacks, log_history, start_live


@pytest.mark.parametrize("enabled", [True, False])
def test_fine_tune_epochs_show_their_batches_on_a_terminal_only(capfd, enabled):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")])
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    x, y = np.zeros((12, 4), np.float32), np.zeros(12, np.int64)
    progress = BatchProgress(steps=3, epochs=2, enabled=enabled)
    model.fit(x, y, batch_size=4, epochs=2, verbose=0, callbacks=[progress])
    err = capfd.readouterr().err
    for epoch in (1, 2):
        assert (f"fine-tune epoch {epoch}/2" in err) == enabled, err
    assert progress.bar is None  # closed at the end of each epoch


def _series(live_dir, name: str) -> list[tuple[int, float]]:
    with open(live_dir / "plots" / "metrics" / f"{name}.tsv", newline="") as fh:
        return [(int(r["step"]), float(r[name.split("/")[-1]])) for r in csv.DictReader(fh, delimiter="\t")]


def test_dvclive_has_the_head_only_model_at_step_0_and_restored_epochs_after_it(tmp_path):
    live = start_live(tmp_path / "live", 0.9, 0.5)
    log_history(live, [[1, 0.8, 0.6, 0.7, 0.65], [2, 0.6, 0.7, 0.75, 0.6]])  # what a resumed run restored
    live.end()
    assert _series(tmp_path / "live", "eval/loss") == [(0, 0.9), (1, 0.7), (2, 0.75)]
    assert _series(tmp_path / "live", "eval/accuracy") == [(0, 0.5), (1, 0.65), (2, 0.6)]
    assert _series(tmp_path / "live", "train/loss") == [(1, 0.8), (2, 0.6)]
    assert live_callbacks(None) == [] and log_history(None, [[1, 0.1, 0.2, 0.3, 0.4]]) is None



def test_the_clock_adds_up_each_part_and_calls_the_rest_setup():
    clock = Clock()
    for _ in range(2):
        with clock.part("train"):
            time.sleep(0.05)
    clock.begin("finish")
    time.sleep(0.05)
    clock.end("finish")
    clock.end("never begun")  # nothing
    time.sleep(0.05)
    parts = clock.by_part(("train", "validate", "finish"))
    assert list(parts) == ["setup", "train", "validate", "finish"]
    assert parts["train"] == pytest.approx(0.1, abs=0.05) and parts["validate"] == 0.0
    assert parts["finish"] == pytest.approx(0.05, abs=0.05) and parts["setup"] == pytest.approx(0.05, abs=0.05)
