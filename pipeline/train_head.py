"""Stage 3: fit a classifier head on the cached features (seconds, not hours).

``head.type: logreg`` fits scikit-learn's LogisticRegression (multinomial for > 2 classes) on
features divided by one global scale (their RMS) and folds scale + coefficients into one
Keras softmax Dense layer, so the saved head returns sklearn's probabilities. ``head.type: dense`` trains a Keras
dropout + softmax head with early stopping on val loss.
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

from pipeline.backbones import feature_provenance
from pipeline.features import FeatureSet, read_features
from pipeline.io_utils import library_versions, read_json, setup_logging, user_errors, write_json
from pipeline.models import build_head, class_weights, logreg_to_dense_weights, save_model, write_history
from pipeline.params import Params, as_dict, load_params

log = logging.getLogger(__name__)

# The params this stage reads: exactly its `params:` in dvc.yaml (a test checks both agree).
PARAMS = ("seed", "backbone", "head")


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


def training_rows(train: FeatureSet) -> tuple[np.ndarray, np.ndarray]:
    """The head's training set: every image's features and those of its augmented views → (X (M, D), y (M,)).

    With ``extract.augmented_views`` = K the head sees each image K + 1 times, clean and
    augmented, as fine-tuning will. Measured on simpsons_dev: the head's val log loss 0.487 →
    0.438 with K = 4. It does not stop fine-tuning's first peak-rate epochs from raising the val
    loss (README "Fine-tuning that pays").
    """
    if train.views is None or train.views.shape[1] == 0:
        return train.features, train.labels
    k = train.views.shape[1]
    x = np.concatenate([train.features[:, None, :], train.views], axis=1).reshape(-1, train.features.shape[1])
    return x, np.repeat(train.labels, k + 1)


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


def fit_dense(train: FeatureSet, val: FeatureSet, n_classes: int, params: Params) -> tuple[keras.Model, list]:
    p = params.head.dense
    keras.utils.set_random_seed(params.seed)
    x, y = training_rows(train)
    head = build_head(x.shape[1], n_classes, p.hidden_units, p.dropout, seed=params.seed)
    head.compile(optimizer=keras.optimizers.Adam(p.learning_rate), loss="sparse_categorical_crossentropy",
                 metrics=["accuracy"])
    hist = head.fit(
        x, y, validation_data=(val.features, val.labels), epochs=p.epochs,
        batch_size=p.batch_size, shuffle=True, verbose=2,
        class_weight=class_weights(y, n_classes, params.head.class_weight),
        callbacks=[keras.callbacks.EarlyStopping("val_loss", patience=p.patience, restore_best_weights=True)],
    )
    h = hist.history
    rows = [(i + 1, h["loss"][i], h["accuracy"][i], h["val_loss"][i], h["val_accuracy"][i])
            for i in range(len(h["loss"]))]
    return head, rows


def split_metrics(head: keras.Model, fs: FeatureSet, n_classes: int) -> dict:
    probs = head.predict(fs.features, batch_size=1024, verbose=0) if len(fs.labels) else np.zeros((0, n_classes))
    return {
        "accuracy": float(accuracy_score(fs.labels, probs.argmax(1))),
        "log_loss": float(log_loss(fs.labels, probs, labels=list(range(n_classes)))),
        "n": int(len(fs.labels)),
    }


def run(*, train_h5: Path, val_h5: Path, classes_json: Path, head_out: Path, metrics_out: Path,
        history_out: Path, params: Params) -> dict:
    """Fit the head on train features (model selection on val); returns the metrics written."""
    classes = read_json(classes_json)["classes"]
    expected = feature_provenance(params.backbone, classes)
    train = read_features(train_h5, expected)
    val = read_features(val_h5, expected)
    t0 = time.perf_counter()
    fit = fit_logreg if params.head.type == "logreg" else fit_dense
    head, history = fit(train, val, len(classes), params)
    seconds = time.perf_counter() - t0
    metrics = {"train": split_metrics(head, train, len(classes)), "val": split_metrics(head, val, len(classes)),
               "fit_seconds": round(seconds, 3)}
    if not history:  # logreg has no epochs: one row, so the learning-curve plot still shows its end point
        history = [(1, metrics["train"]["log_loss"], metrics["train"]["accuracy"], metrics["val"]["log_loss"],
                    metrics["val"]["accuracy"])]
    head_params = getattr(params.head, params.head.type)
    save_model(head, head_out, {
        "kind": "head", "head_type": params.head.type, "head_params": as_dict(head_params), "seed": params.seed,
        "class_weight": params.head.class_weight, "augmented_views": int(train.attrs.get("augmented_views", 0)),
        "class_names": classes, "feature_dim": int(train.features.shape[1]),
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
