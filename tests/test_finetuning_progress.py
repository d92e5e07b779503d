"""No silent minutes: the steps that grow with the image count show a tqdm bar on stderr."""
from __future__ import annotations

import keras
import numpy as np
import pytest
from conftest import make_images

from pipeline.core.io import file_digests, sha256_digest
from pipeline.finetuning.progress import BatchProgress


def test_hashing_images_before_extract_shows_a_bar(tmp_path, capfd):
    raw = make_images(tmp_path / "raw", per_class=3)
    paths = sorted(str(p) for p in raw.rglob("*.png"))
    assert file_digests(paths) == [sha256_digest(p) for p in paths]
    err = capfd.readouterr().err
    assert "hash images" in err and "9/9" in err


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
