"""Stage 3: fit a classifier head on the cached features (seconds, not hours).

``head.type: logreg`` fits scikit-learn's LogisticRegression (multinomial for > 2 classes) on
features divided by one global scale (their RMS) and folds scale + coefficients into one
Keras softmax Dense layer, so the saved head returns sklearn's probabilities. L-BFGS needs the
whole training matrix in memory (N × (K + 1) × D float64). ``head.type: dense`` trains a Keras
dropout + softmax head with early stopping on val loss, streaming the features from HDF5 in
blocks (:class:`FeatureBatches`), so its memory does not grow with N: the head for millions of
images.
"""
from __future__ import annotations

import argparse
import logging
import time
import warnings
from pathlib import Path

import keras
import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, log_loss

from pipeline.backbones.build import feature_provenance
from pipeline.core.io import library_versions, read_json, setup_logging, user_errors, write_json
from pipeline.core.params import Params, as_dict, load_params
from pipeline.extraction.features import FeatureFile, FeatureSet, open_features
from pipeline.models.calibration import describe, fit_on_val
from pipeline.models.heads import build_head, logreg_to_dense_weights, predict_features, save_model, with_temperature
from pipeline.models.training import class_weights, write_history

log = logging.getLogger(__name__)

# The params this stage reads: exactly its `params:` in dvc.yaml (a test checks both agree).
PARAMS = ("seed", "backbone", "head")

# The dense head reads its training rows in blocks of this many images and shuffles WINDOW_BLOCKS
# blocks together: one window (~8 k images × (K + 1) rows × D floats, ~200 MB at K = 4, D = 1280)
# is in memory at a time, whatever N is; a split of up to one window is shuffled whole.
BLOCK_IMAGES = 1024
WINDOW_BLOCKS = 8


class FeatureBatches(keras.utils.PyDataset):
    """``(x (B, D) float32, y (B,) int64)`` batches of an open feature file, read block by block.

    Rows are every image's features followed by its K augmented views (``views=True``, as
    :func:`training_rows`). With ``seed``, epoch ``e`` visits the blocks in an order drawn from
    ``(seed, e)`` and shuffles the rows of each window of ``WINDOW_BLOCKS`` blocks with
    ``(seed, e, window)``: deterministic, and a function of the epoch alone. Without ``seed``: file order.
    """

    def __init__(self, ff: FeatureFile, batch_size: int, seed: int | None = None, views: bool = True,
                 block_images: int = BLOCK_IMAGES, window_blocks: int = WINDOW_BLOCKS):
        super().__init__()
        self.ff, self.batch_size, self.seed = ff, batch_size, seed
        self.k = ff.n_views if views else 0
        self.block_images, self.window_blocks = block_images, window_blocks
        self.epoch = 0
        self._plan()

    def _plan(self) -> None:
        blocks = self.ff.blocks(self.block_images)
        if self.seed is not None:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(blocks))
            blocks = [blocks[i] for i in order]
        self._windows = [blocks[i:i + self.window_blocks] for i in range(0, len(blocks), self.window_blocks)]
        self._batches = []  # (window, first row, end row) within the window's rows
        for w, window in enumerate(self._windows):
            rows = sum(b - a for a, b in window) * (self.k + 1)
            self._batches += [(w, r, min(r + self.batch_size, rows)) for r in range(0, rows, self.batch_size)]
        self._loaded: tuple = (None, None)

    def _window(self, w: int) -> tuple[np.ndarray, np.ndarray]:
        if self._loaded[0] != w:
            xs, ys = [], []
            for a, b in self._windows[w]:
                x, y = with_views(self.ff.features(a, b), self.ff.views(a, b) if self.k else None, self.ff.labels[a:b])
                xs.append(x)
                ys.append(y)
            x, y = np.concatenate(xs), np.concatenate(ys)
            if self.seed is not None:
                perm = np.random.default_rng([self.seed, self.epoch, w]).permutation(len(y))
                x, y = x[perm], y[perm]
            self._loaded = (w, (x, y))
        return self._loaded[1]

    def __len__(self) -> int:
        return len(self._batches)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        w, a, b = self._batches[i]
        x, y = self._window(w)
        return x[a:b], y[a:b]

    def on_epoch_end(self) -> None:
        if self.seed is not None:
            self.epoch += 1
            self._plan()


def feature_scale(features: np.ndarray) -> float:
    """One global scale (root mean square) for all feature dimensions.

    A single scalar conditions L-BFGS whatever the backbone's activation range (VGG's are in
    the hundreds, EfficientNet's below 6) without per-dimension standardization, which
    multiplies the weights of near-constant features by 1/σ: such a head is overconfident
    and turns small feature shifts during fine-tuning into large logit swings (measured on
    flowers: val log loss 0.35 standardized vs 0.25 with one scale, 4× smaller weights).
    """
    rms = float(np.sqrt(np.mean(np.square(features, dtype=np.float64))))
    return rms if rms > 0 else 1.0


def with_views(features: np.ndarray, views: "np.ndarray | None", labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each image's features (M, D) followed by its views (M, K, D) → (X (M·(K+1), D), y (M·(K+1),))."""
    if views is None or views.shape[1] == 0:
        return features, labels
    k = views.shape[1]
    x = np.concatenate([features[:, None, :], views], axis=1).reshape(-1, features.shape[1])
    return x, np.repeat(labels, k + 1)


def training_rows(train: FeatureSet) -> tuple[np.ndarray, np.ndarray]:
    """The head's training set: every image's features and those of its augmented views → (X (M, D), y (M,)).

    With ``extract.augmented_views`` = K the head sees each image K + 1 times, clean and
    augmented, as fine-tuning will. Measured on simpsons_dev: the head's val log loss 0.487 →
    0.438 with K = 4. It does not stop fine-tuning's first peak-rate epochs from raising the val
    loss (README "Fine-tuning that pays").
    """
    return with_views(train.features, train.views, train.labels)


def fit_logreg(train: FeatureSet, val: FeatureSet, n_classes: int, params: Params) -> tuple[keras.Model, list]:
    """Scaled features + LogisticRegression → an equivalent Keras head."""
    p = params.head.logreg
    x, y = training_rows(train)
    dim = x.shape[1]
    mean, scale = np.zeros(dim), np.full(dim, feature_scale(x))
    clf = LogisticRegression(C=p.C, max_iter=p.max_iter, random_state=params.seed,
                             class_weight=class_weights(y, n_classes, params.head.class_weight))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        clf.fit(x.astype(np.float64) / scale, y)
    if any(issubclass(w.category, ConvergenceWarning) for w in caught):
        log.warning("logistic regression did not converge in head.logreg.max_iter=%d iterations; raise it", p.max_iter)
    if list(clf.classes_) != list(range(n_classes)):
        raise ValueError(f"training features cover classes {list(clf.classes_)}, expected 0..{n_classes - 1}")
    head = build_head(train.features.shape[1], n_classes)
    kernel, bias = logreg_to_dense_weights(clf.coef_, clf.intercept_, mean, scale, n_classes)
    head.get_layer("probs").set_weights([kernel, bias])
    # The folded layer must reproduce sklearn, or the saved head is not the model we fit.
    ref = clf.predict_proba(val.features.astype(np.float64) / scale)
    got = head.predict_on_batch(val.features)
    diff = float(np.max(np.abs(ref - got))) if len(ref) else 0.0
    if diff > 1e-4:
        raise RuntimeError(f"Keras head differs from sklearn by {diff:.2e} (> 1e-4)")
    log.info("logreg → Dense: max |p_keras − p_sklearn| = %.2e on val", diff)
    return head, []


def fit_dense(train: FeatureFile, val: FeatureFile, n_classes: int, params: Params) -> tuple[keras.Model, list]:
    """A Keras head trained on batches streamed from the feature files (:class:`FeatureBatches`)."""
    p = params.head.dense
    keras.utils.set_random_seed(params.seed)
    head = build_head(train.dim, n_classes, p.hidden_units, p.dropout, seed=params.seed)
    head.compile(optimizer=keras.optimizers.Adam(p.learning_rate), loss="sparse_categorical_crossentropy",
                 metrics=["accuracy"])
    hist = head.fit(
        FeatureBatches(train, p.batch_size, seed=params.seed), epochs=p.epochs, verbose=2,
        validation_data=FeatureBatches(val, 1024, views=False), shuffle=False,  # FeatureBatches shuffles
        # Every image counts K + 1 times in training, so the class counts are the images' counts.
        class_weight=class_weights(train.labels, n_classes, params.head.class_weight),
        callbacks=[keras.callbacks.EarlyStopping("val_loss", patience=p.patience, restore_best_weights=True)],
    )
    h = hist.history
    rows = [(i + 1, h["loss"][i], h["accuracy"][i], h["val_loss"][i], h["val_accuracy"][i])
            for i in range(len(h["loss"]))]
    return head, rows


def split_metrics(head: keras.Model, ff: FeatureFile, n_classes: int) -> dict:
    probs = predict_features(head, ff)
    return {
        "accuracy": float(accuracy_score(ff.labels, probs.argmax(1))),
        "log_loss": float(log_loss(ff.labels, probs, labels=list(range(n_classes)))),
        "n": int(len(ff.labels)),
    }


def calibrate_head(head: keras.Model, val: FeatureFile) -> tuple[keras.Model, dict]:
    """Fit the head's temperature on the val features → (the head with its :class:`pipeline.models.heads.Temperature`
    layer, a summary: ``temperature`` and the val log loss and ECE before and after)."""
    summary = fit_on_val(predict_features(head, val), val.labels)
    log.info("head: %s", describe(summary))
    return with_temperature(head, summary["temperature"]), summary


def run(*, train_h5: Path, val_h5: Path, classes_json: Path, head_out: Path, metrics_out: Path,
        history_out: Path, params: Params) -> dict:
    """Fit the head on train features (model selection on val); returns the metrics written."""
    classes = read_json(classes_json)["classes"]
    expected = feature_provenance(params.backbone, classes)
    with open_features(train_h5, expected) as train, open_features(val_h5, expected) as val:
        t0 = time.perf_counter()
        if params.head.type == "logreg":
            head, history = fit_logreg(train.load(), val.load(), len(classes), params)
        else:
            head, history = fit_dense(train, val, len(classes), params)
        seconds = time.perf_counter() - t0
        # train/val metrics of the head as fitted (uncalibrated): the learning curve's end point. The temperature
        # is fitted on val after the fit, on probabilities nothing was selected on but the early-stopping epoch.
        metrics = {"train": split_metrics(head, train, len(classes)), "val": split_metrics(head, val, len(classes)),
                   "fit_seconds": round(seconds, 3)}
        head, metrics["calibration"] = calibrate_head(head, val)
    if not history:  # logreg has no epochs: one row, so the learning-curve plot still shows its end point
        history = [(1, metrics["train"]["log_loss"], metrics["train"]["accuracy"], metrics["val"]["log_loss"],
                    metrics["val"]["accuracy"])]
    head_params = getattr(params.head, params.head.type)
    save_model(head, head_out, {
        "kind": "head", "head_type": params.head.type, "head_params": as_dict(head_params), "seed": params.seed,
        "class_weight": params.head.class_weight, "augmented_views": int(train.attrs.get("augmented_views", 0)),
        "class_names": classes, "feature_dim": train.dim, "temperature": metrics["calibration"]["temperature"],
        "provenance": expected, "versions": library_versions(),
    })
    write_history(history_out, history)
    write_json(metrics_out, metrics)
    log.info("%s head in %.2fs: train acc %.4f, val acc %.4f, val log loss %.4f", params.head.type, seconds,
             metrics["train"]["accuracy"], metrics["val"]["accuracy"], metrics["val"]["log_loss"])
    return metrics


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("train", "val", "classes", "head", "metrics", "history"):
        ap.add_argument(f"--{name}", type=Path, required=True)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = ap.parse_args(argv)
    setup_logging()
    with user_errors():
        params = load_params(args.params, "train_head", PARAMS)
        run(train_h5=args.train, val_h5=args.val, classes_json=args.classes, head_out=args.head,
            metrics_out=args.metrics, history_out=args.history, params=params)


if __name__ == "__main__":
    main()
