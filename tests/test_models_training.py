"""What both training stages share (pipeline/models/training.py): balanced class weights and the history CSV."""
import csv

import numpy as np
import pytest

from pipeline.models.training import HISTORY_HEADER, class_weights, write_history


def test_balanced_class_weights_follow_sklearns_formula():
    from sklearn.utils.class_weight import compute_class_weight

    y = np.array([0] * 30 + [1] * 10 + [2] * 5)
    got = class_weights(y, 3, "balanced")
    np.testing.assert_allclose([got[i] for i in range(3)], compute_class_weight("balanced", classes=np.arange(3), y=y))
    assert got[2] == pytest.approx(45 / (3 * 5))
    assert class_weights(y, 3, "none") is None
    with pytest.raises(ValueError, match=r"class indices \[3\] have no training image"):
        class_weights(y, 4, "balanced")


def test_history_rows_keep_epoch_0s_empty_training_cells(tmp_path):
    rows = [[0, "", "", 0.9, 0.5], [1, 0.7, 0.6, 0.8, 0.55]]
    write_history(tmp_path / "h.csv", rows)
    with open(tmp_path / "h.csv", newline="") as fh:
        read = list(csv.reader(fh))
    assert tuple(read[0]) == HISTORY_HEADER == ("epoch", "loss", "accuracy", "val_loss", "val_accuracy")
    assert read[1:] == [["0", "", "", "0.9", "0.5"], ["1", "0.7", "0.6", "0.8", "0.55"]]
