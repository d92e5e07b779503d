"""Stage audit: what is wrong with the data, from the cached features alone (the backbone never runs).

Four reports, every row naming the image path (relative to ``data.raw_dir``) and its split:

- **label issues**: out-of-fold probabilities of a logistic-regression head (k-fold over train +
  val, stratified, so every image is scored by a model that did not see it; test images by the
  mean of the k fold models, none of which saw them; features standardized), scored by cleanlab
  (:func:`cleanlab.filter.find_label_issues`, confident learning) → the images whose given label
  the data contradict, most suspect first, with the label the model suggests and a tier:
  ``likely`` when the out-of-fold probability of the given label is at most
  :data:`LIKELY_MAX_PROBABILITY`, else ``possible`` (on planted flips in three photo sets, 70-81 %
  of the likely and 26-48 % of the possible ones were wrong labels). The fold models' out-of-fold
  accuracy is reported with them: the weaker the features separate the classes, the more of the
  flags are the features' confusions, and below :data:`WEAK_MODEL_ACCURACY` the log says so. Each
  fold model is trained on the cached augmented views of its training images too, and its
  prediction for a train image is averaged over the image and its views (``audit.views``; val
  and test images have no cached views and are scored on the image alone);
- **near-duplicates**: pairs of images far closer to each other than to the rest of their
  neighbourhood. With d = 1 - cosine of the clean features and r_i image i's d to its
  ``audit.duplicate_neighbors``-th nearest other image, a pair is flagged when
  d <= ``audit.duplicate_ratio`` · min(r_i, r_j), or when their perceptual hashes (prepare's, in
  the manifest: :mod:`pipeline.data.near_copies`) differ in at most ``audit.duplicate_hash_bits``
  bits and d <= min(r_i, r_j) (each among the other's k nearest); most similar first. A pair in
  two splits is leakage (the test image was, in effect, trained on) and is counted apart. The
  rule is relative because an absolute cosine does not carry across datasets and backbones: the
  demo's distinct synthetic images of one class sit above cosine 0.9 from each other. The two
  signals fail differently: features see a resized or heavily re-encoded copy of a busy photo as
  no closer than another photo of the same scene, while the hash barely moves under either, and
  the hash is blind to a mirror image or a crop that the features still see;
- **outliers**: images unlike any other image of the dataset, by cleanlab's
  :class:`cleanlab.outlier.OutOfDistribution` (mean cosine distance to the k nearest neighbours
  in feature space), flagged beyond Tukey's far-out fence of that distance;
- **class imbalance**: images per class and split; a class with fewer training images than
  ``audit.imbalance_ratio`` times the largest class's is flagged.

``--metrics`` gets the counts (a DVC metric), ``--gallery-dir`` one contact sheet per image
issue type. The audit never changes the data: the user acts through the exclude list that
prepare reads (``data/exclude.txt``), a reviewed commit.
"""
from __future__ import annotations

import argparse
import logging
import os
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from joblib import Parallel, delayed
from PIL import Image, ImageDraw, ImageFont
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from threadpoolctl import threadpool_limits

from pipeline.core.io import PipelineError, atomic_path, read_json, setup_logging, user_errors, write_csv, write_json
from pipeline.core.manifest import SPLITS, read_manifest
from pipeline.core.params import AuditParams, Params, load_params
from pipeline.data.images import ImageDecodeError, load_image
from pipeline.data.near_copies import from_hex
from pipeline.extraction.features import FeatureSet, read_features

log = logging.getLogger(__name__)

# The params this stage reads: exactly its `params:` in dvc.yaml (a test checks both agree).
PARAMS = ("seed", "audit")

LABEL_ISSUES_HEADER = ("path", "split", "given_label", "suggested_label", "score", "tier")
DUPLICATES_HEADER = ("path_a", "path_b", "split_a", "split_b", "similarity", "hash_bits")
OUTLIERS_HEADER = ("path", "split", "given_label", "score")
IMBALANCE_HEADER = ("label", "train", "val", "test", "total", "train_share_of_largest", "flagged")

# Rows of the similarity matrix computed at a time: a (BLOCK, N) float32 block, 16 MB at N = 4,000.
BLOCK = 1024
# A flagged label whose out-of-fold probability is at most this is a "likely" issue: on planted 5 %
# flips in simpsons_dev, flower_photos and hymenoptera, 70 %, 81 % and 78 % of these were flips,
# against 26-48 % of the other flagged images (docs/benchmarks/audit.md).
LIKELY_MAX_PROBABILITY = 0.02
# Feature distance (1 - cosine) at or below which two images are copies whatever their neighbourhood: an
# image with more than duplicate_neighbors exact copies has its k-th neighbour among them, and the relative
# rule alone would flag none of them. Distinct images never come this close; re-saved copies often do.
SAME_FEATURES = 1e-4
# Out-of-fold accuracy below which the log warns that most flags are the features' confusions: the
# demo's frozen features reach 0.75 and flag 70 of its 400 correctly labelled images.
WEAK_MODEL_ACCURACY = 0.8


@dataclass
class Pool:
    """Every image of the three splits in one place: clean features (N, D), labels (N,), paths, splits,
    and the augmented views (N, K, D) with ``has_views`` (N,) saying which rows have them (train)."""

    features: np.ndarray
    labels: np.ndarray
    paths: list[str]
    splits: list[str]
    views: np.ndarray | None
    has_views: np.ndarray


@dataclass
class AuditResult:
    """What :func:`run` found: the pooled images, their out-of-fold probabilities (N, C) and label
    quality (N,), the flagged rows of each report, and the counts written as the metric."""

    pool: Pool
    probs: np.ndarray
    quality: np.ndarray
    label_issues: np.ndarray
    pairs: list[tuple[int, int, float, int]]
    outliers: np.ndarray
    metrics: dict


def pool_splits(sets: dict[str, FeatureSet]) -> Pool:
    feats = np.concatenate([sets[s].features for s in SPLITS]).astype(np.float32)
    labels = np.concatenate([sets[s].labels for s in SPLITS]).astype(np.int64)
    paths = [p for s in SPLITS for p in sets[s].paths]
    splits = [s for s in SPLITS for _ in sets[s].paths]
    k = max((sets[s].views.shape[1] for s in SPLITS if sets[s].views is not None), default=0)
    has = np.concatenate([np.full(len(sets[s].paths), sets[s].views is not None and k > 0) for s in SPLITS])
    views = None
    if k:
        views = np.zeros((len(paths), k, feats.shape[1]), np.float32)
        start = 0
        for s in SPLITS:
            n = len(sets[s].paths)
            if sets[s].views is not None:
                if sets[s].views.shape[1] != k:
                    raise PipelineError(f"{s} features have {sets[s].views.shape[1]} views, train {k}; "
                                        "re-run `dvc repro extract`")
                views[start:start + n] = sets[s].views
            start += n
    return Pool(feats, labels, paths, splits, views, has)


def _fit(x: np.ndarray, y: np.ndarray, params: AuditParams, seed: int) -> tuple[LogisticRegression, tuple]:
    """A logistic-regression fold model → (classifier, (mean, scale) the features are normalized by).

    ``audit.standardize``: each feature dimension to zero mean and unit variance over the fold's
    training rows (L-BFGS then converges in ~6-10x less time than on RMS-scaled features, at the
    same label-issue recall, docs/benchmarks/audit.md); else one global RMS scale, as train_head's logreg head.
    """
    x = x.astype(np.float64)
    if params.standardize:
        mean, scale = x.mean(0), x.std(0)
        scale[scale == 0] = 1.0
    else:
        mean, scale = np.zeros(x.shape[1]), np.full(x.shape[1], np.sqrt(np.mean(np.square(x))) or 1.0)
    clf = LogisticRegression(C=params.C, max_iter=params.max_iter, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit((x - mean) / scale, y)
    return clf, (mean, scale)


def _proba(clf: LogisticRegression, norm: tuple, x: np.ndarray, n_classes: int) -> np.ndarray:
    """Probabilities (M, n_classes); a class absent from the fold's training rows gets 0."""
    p = clf.predict_proba((x - norm[0]) / norm[1])
    if p.shape[1] == n_classes:
        return p
    out = np.zeros((len(x), n_classes))
    out[:, clf.classes_] = p
    return out


def out_of_fold_probs(pool: Pool, n_classes: int, params: AuditParams, seed: int) -> tuple[np.ndarray, int]:
    """(N, C) probabilities: train + val rows out-of-fold, test rows the mean of the fold models.

    Returns the probabilities and the number of folds used (``audit.folds``, fewer when the
    smallest class of train + val has fewer images).
    """
    fit_rows = np.array([s != "test" for s in pool.splits])
    idx = np.flatnonzero(fit_rows)
    test = np.flatnonzero(~fit_rows)
    y = pool.labels[idx]
    smallest = int(np.bincount(y, minlength=n_classes).min())
    folds = min(params.folds, smallest)
    if folds < 2:
        raise PipelineError(f"audit: a class has {smallest} train + val image(s); out-of-fold scoring needs at least "
                            "2 per class: add images")
    use_views = params.views and pool.views is not None
    splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)

    def one_fold(tr: np.ndarray, te: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int]:
        x, yy = pool.features[tr], pool.labels[tr]
        if use_views:
            v = tr[pool.has_views[tr]]
            x = np.concatenate([x, pool.views[v].reshape(-1, x.shape[1])])
            yy = np.concatenate([yy, np.repeat(pool.labels[v], pool.views.shape[1])])
        clf, norm = _fit(x, yy, params, seed)
        p = _proba(clf, norm, pool.features[te], n_classes)
        hv = pool.has_views[te] if use_views else np.zeros(len(te), bool)
        if hv.any():  # a train image's prediction: the mean over the image and its K views (val: the image alone)
            k = pool.views.shape[1]
            pv = _proba(clf, norm, pool.views[te[hv]].reshape(-1, x.shape[1]), n_classes)
            p[hv] = (p[hv] + pv.reshape(-1, k, n_classes).sum(1)) / (k + 1)
        return te, p, _proba(clf, norm, pool.features[test], n_classes) if len(test) else None, len(yy)

    # Folds in parallel threads, one BLAS thread each: these matrices are too small for BLAS threads to pay,
    # and on a busy machine they spin (one fold measured 25x slower with 2 BLAS threads under load).
    with threadpool_limits(limits=1, user_api="blas"):
        done = Parallel(n_jobs=min(folds, os.cpu_count() or 1), prefer="threads")(
            delayed(one_fold)(idx[tr], idx[te]) for tr, te in splitter.split(idx, y))
    probs = np.zeros((len(pool.labels), n_classes))
    for f, (te, p, ptest, rows) in enumerate(done):
        probs[te] = p
        if ptest is not None:
            probs[test] += ptest / folds
        log.info("fold %d/%d: %d training rows, held-out accuracy %.3f", f + 1, folds, rows,
                 float(np.mean(p.argmax(1) == pool.labels[te])))
    return probs, folds


def label_issues(pool: Pool, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cleanlab's confident-learning filter → (flagged row indices, most suspect first; quality score (N,)).

    The score is cleanlab's self-confidence, the probability of the given label: low = suspect.
    """
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cleanlab warns about classes with few examples; the counts say so
        ranked = find_label_issues(pool.labels, probs, return_indices_ranked_by="self_confidence")
    scores = get_label_quality_scores(pool.labels, probs, method="self_confidence")
    return np.asarray(ranked, dtype=np.int64), scores


def unit_rows(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(n > 0, n, 1.0)


def kth_neighbor_distance(u: np.ndarray, k: int) -> np.ndarray:
    """Each row's cosine distance to its ``k``-th nearest other row of the unit rows ``u`` (N, D) → (N,)."""
    n = len(u)
    k = max(1, min(k, n - 1))
    out = np.full(n, np.inf, np.float32)
    if n < 2:
        return out
    for a in range(0, n, BLOCK):
        d = 1.0 - u[a:a + BLOCK] @ u.T
        d[np.arange(len(d)), np.arange(a, a + len(d))] = np.inf  # not its own neighbour
        out[a:a + BLOCK] = np.partition(d, k - 1, axis=1)[:, k - 1]
    return out


def near_duplicates(features: np.ndarray, neighbors: int, ratio: float, hashes: np.ndarray | None = None,
                    max_bits: int = -1) -> list[tuple[int, int, float, int]]:
    """Pairs (i < j) far closer than their neighbourhoods → [(i, j, cosine similarity, differing hash bits or -1
    without hashes)], most similar first.

    With d = 1 - cosine of ``features`` (N, D) and r the distance of each image to its ``neighbors``-th
    nearest: d_ij <= ``ratio`` · min(r_i, r_j) (or <= :data:`SAME_FEATURES`), or ``hashes`` (N,) uint64
    within ``max_bits`` bits and d_ij <= min(r_i, r_j). Two passes over row blocks (r, then pairs): memory
    (BLOCK, N), not N². Inside a cluster of more than ``neighbors`` near (not exact) copies the features'
    rule sees fewer pairs, the hash's most of them.
    """
    u = unit_rows(features.astype(np.float32))
    r = kth_neighbor_distance(u, neighbors)
    use_hash = hashes is not None and max_bits >= 0
    pairs = []
    for a in range(0, len(u), BLOCK):
        sim = u[a:a + BLOCK] @ u.T
        dist, ref = 1.0 - sim, np.minimum(r[a:a + BLOCK, None], r[None, :])
        hit = dist <= np.maximum(ratio * ref, SAME_FEATURES)
        if use_hash:
            bits = np.bitwise_count(hashes[a:a + BLOCK, None] ^ hashes[None, :])
            hit |= (bits <= max_bits) & (dist <= ref)
        rows, cols = np.nonzero(hit)
        keep = cols > rows + a
        pairs += [(int(i + a), int(j), float(sim[i, j]), int(bits[i, j]) if use_hash else -1)
                  for i, j in zip(rows[keep], cols[keep])]
    pairs.sort(key=lambda t: (-t[2], t[0], t[1]))
    return pairs


def manifest_hashes(manifest: Path, pool: Pool) -> np.ndarray:
    """The perceptual hash prepare recorded for each pooled image → (N,) uint64."""
    by_key = {(it.path, it.split): it.phash for it in read_manifest(manifest)}
    texts = [by_key.get((q, s), "") for q, s in zip(pool.paths, pool.splits)]
    if not all(texts):
        raise PipelineError(f"{manifest} has no perceptual hashes (written before prepare recorded them); "
                            "re-run `dvc repro prepare`")
    return from_hex(texts)


def outliers(features: np.ndarray, params: AuditParams) -> tuple[np.ndarray, np.ndarray]:
    """cleanlab's kNN out-of-distribution score of every image among all the others → (flagged rows,
    most unusual first; score (N,) in (0, 1], low = unlike its neighbours).

    Flagged: a mean kNN distance beyond Tukey's far-out fence (Q3 + 3 IQR) of all images' distances,
    so a dataset without outliers flags none (a fixed share would always flag some).
    """
    from cleanlab.outlier import OutOfDistribution

    k = max(1, min(params.outlier_neighbors, len(features) - 1))
    ood = OutOfDistribution(params={"k": k, "t": 1})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scores = ood.fit_score(features=unit_rows(features), verbose=False)
    dist = -np.log(np.clip(scores, 1e-300, None))  # score = exp(-t · scaled mean kNN distance): monotone
    q1, q3 = np.percentile(dist, [25, 75])
    flagged = np.flatnonzero(dist > q3 + 3.0 * (q3 - q1))
    return flagged[np.argsort(scores[flagged], kind="stable")], scores


def imbalance(manifest: Path, classes: list[str], ratio: float) -> list[tuple]:
    """Images per class and split, and whether the class's train count is below ``ratio`` × the largest's."""
    counts = Counter((it.label, it.split) for it in read_manifest(manifest))
    largest = max(counts[(c, "train")] for c in classes) or 1
    rows = []
    for c in classes:
        n = [counts[(c, s)] for s in SPLITS]
        share = n[0] / largest
        rows.append((c, *n, sum(n), round(share, 4), share < ratio))
    return rows


def _font(size: int = 12) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def contact_sheet(out: Path, raw_dir: Path, tiles: list[tuple[list[str], list[tuple[str, str]]]], empty: str,
                  thumb: int = 160) -> None:
    """A PNG grid: each tile is one or more images side by side (relative paths) over caption lines
    ``(text, colour)``, the first one per image its path. An image that no longer decodes is drawn grey."""
    per = max((len(t[0]) for t in tiles), default=1)
    cols = max(1, min(4 if per == 1 else 2, len(tiles)))
    lines = max((len(t[1]) for t in tiles), default=1)
    cap = 6 + 15 * lines
    w, h = max(per * thumb, 240), thumb + cap  # room for a path and a long class name under one thumbnail
    rows = max(1, -(-len(tiles) // cols))
    sheet = Image.new("RGB", (cols * w + (cols - 1) * 8, rows * h), "white")
    draw = ImageDraw.Draw(sheet)
    font = _font()
    if not tiles:
        draw.text((8, 8), empty, fill="black", font=font)
    for n, (paths, caption) in enumerate(tiles):
        x, y = (n % cols) * (w + 8), (n // cols) * h
        for k, rel in enumerate(paths):
            try:
                img = Image.fromarray(load_image(str(raw_dir / rel), thumb))
            except ImageDecodeError:
                img = Image.new("RGB", (thumb, thumb), (200, 200, 200))
            sheet.paste(img, (x + k * thumb, y))
        for i, (text, colour) in enumerate(caption):
            text = _fit_text(draw, text, w - 8, font, keep_end=i < len(paths))  # a path keeps its file name
            draw.text((x + 4, y + thumb + 2 + 15 * i), text, fill=colour, font=font)
    with atomic_path(out) as tmp:
        sheet.save(tmp, format="PNG")


def _fit_text(draw: ImageDraw.ImageDraw, text: str, width: int, font: ImageFont.ImageFont,
              keep_end: bool = False) -> str:
    """``text`` shortened with '…' until it fits ``width`` pixels: from the left with ``keep_end``, else the right."""
    if draw.textlength(text, font=font) <= width:
        return text
    while len(text) > 1 and draw.textlength(text + "…", font=font) > width:
        text = text[1:] if keep_end else text[:-1]
    return "…" + text if keep_end else text + "…"


@dataclass
class _Findings:
    """What the galleries show: flagged label rows with their tiers, suggested labels and scores (N,);
    near-duplicate pairs and those across splits; outlier rows and scores (N,)."""

    flagged: np.ndarray
    tiers: list[str]
    suggested: np.ndarray
    quality: np.ndarray
    pairs: list[tuple[int, int, float, int]]
    cross: list[tuple[int, int, float, int]]
    odd: np.ndarray
    ood_scores: np.ndarray


def _galleries(gallery_dir: Path, raw_dir: Path, n: int, classes: list[str], pool: Pool, f: _Findings) -> None:
    """The three contact sheets, the first ``n`` rows of each: label issues, near-duplicate pairs (cross-split
    first), outliers."""
    flagged, tiers, suggested, quality = f.flagged, f.tiers, f.suggested, f.quality
    cross, pairs, odd, ood_scores = f.cross, f.pairs, f.odd, f.ood_scores
    contact_sheet(gallery_dir / "label_issues.png", raw_dir, [
        ([pool.paths[i]], [(pool.paths[i], "black"), (f"{pool.splits[i]}, given: {classes[pool.labels[i]]}", "black"),
                           (f"suggested: {classes[suggested[i]]}", "red"), (f"score {quality[i]:.4f}, {tier}", "red")])
        for i, tier in zip(flagged[:n], tiers)], "no label issues found")
    contact_sheet(gallery_dir / "near_duplicates.png", raw_dir, [
        ([pool.paths[i], pool.paths[j]], [(pool.paths[i], "black"), (pool.paths[j], "black"),
                                          (f"{pool.splits[i]} / {pool.splits[j]}, similarity {sim:.4f}"
                                           + ("" if bits < 0 else f", hash {bits} bits"),
                                           "red" if pool.splits[i] != pool.splits[j] else "black")])
        for i, j, sim, bits in (cross + [t for t in pairs if pool.splits[t[0]] == pool.splits[t[1]]])[:n]],
        "no near-duplicates found")
    contact_sheet(gallery_dir / "outliers.png", raw_dir, [
        ([pool.paths[i]], [(pool.paths[i], "black"), (f"{pool.splits[i]}, {classes[pool.labels[i]]}", "black"),
                           (f"outlier score {ood_scores[i]:.3f}", "red")])
        for i in odd[:n]], "no outliers found")


def run(*, raw_dir: Path, manifest: Path, classes_json: Path, features: dict[str, Path], label_issues_out: Path,
        duplicates_out: Path, outliers_out: Path, imbalance_out: Path, metrics_out: Path, gallery_dir: Path,
        params: Params) -> AuditResult:
    """Audit the cached features of every split; write the four CSV reports, the galleries and the counts.

    ``features``: split → feature file (train, val, test). Returns what was found (the counts written
    to ``metrics_out`` in ``.metrics``).
    """
    t0 = time.perf_counter()
    p = params.audit
    classes = read_json(classes_json)["classes"]
    sets = {s: read_features(features[s]) for s in SPLITS}
    for s in SPLITS:
        if sets[s].attrs.get("class_names") != classes:
            raise PipelineError(f"{features[s]}: class names {sets[s].attrs.get('class_names')} differ from "
                                f"{classes_json}'s {classes}; re-run `dvc repro extract`")
    in_manifest = {(it.path, it.split) for it in read_manifest(manifest)}
    pool = pool_splits(sets)
    missing = [f"{s}:{q}" for q, s in zip(pool.paths, pool.splits) if (q, s) not in in_manifest]
    if missing or len(in_manifest) != len(pool.paths):
        raise PipelineError(f"the feature files and {manifest} list different images (e.g. {missing[:3]}); "
                            "re-run `dvc repro extract`")
    n_classes = len(classes)

    probs, folds = out_of_fold_probs(pool, n_classes, p, params.seed)
    flagged, quality = label_issues(pool, probs)
    suggested = probs.argmax(1)
    tiers = ["likely" if quality[i] <= LIKELY_MAX_PROBABILITY else "possible" for i in flagged]
    write_csv(label_issues_out, LABEL_ISSUES_HEADER, [
        (pool.paths[i], pool.splits[i], classes[pool.labels[i]], classes[suggested[i]], round(float(quality[i]), 6),
         tier) for i, tier in zip(flagged, tiers)])

    hashes = manifest_hashes(manifest, pool) if p.duplicate_hash_bits >= 0 else None
    pairs = near_duplicates(pool.features, p.duplicate_neighbors, p.duplicate_ratio, hashes, p.duplicate_hash_bits)
    write_csv(duplicates_out, DUPLICATES_HEADER, [
        (pool.paths[i], pool.paths[j], pool.splits[i], pool.splits[j], round(sim, 6), "" if bits < 0 else bits)
        for i, j, sim, bits in pairs])
    cross = [t for t in pairs if pool.splits[t[0]] != pool.splits[t[1]]]

    odd, ood_scores = outliers(pool.features, p)
    write_csv(outliers_out, OUTLIERS_HEADER, [
        (pool.paths[i], pool.splits[i], classes[pool.labels[i]], round(float(ood_scores[i]), 6)) for i in odd])

    counts = imbalance(manifest, classes, p.imbalance_ratio)
    write_csv(imbalance_out, IMBALANCE_HEADER, counts)

    _galleries(gallery_dir, raw_dir, p.gallery_size, classes, pool,
               _Findings(flagged, tiers, suggested, quality, pairs, cross, odd, ood_scores))

    flagged_splits = Counter(pool.splits[i] for i in flagged)
    oof = _oof_accuracy(pool, suggested)
    metrics = {
        "images": len(pool.paths),
        "folds": folds,
        "out_of_fold_accuracy": round(oof, 4),
        "label_issues": len(flagged),
        "label_issues_likely": tiers.count("likely"),
        "label_issues_by_split": {s: flagged_splits[s] for s in SPLITS},
        "near_duplicate_pairs": len(pairs),
        "cross_split_duplicate_pairs": len(cross),
        "outliers": len(odd),
        "imbalanced_classes": sum(1 for r in counts if r[-1]),
    }
    write_json(metrics_out, metrics)
    log.info("audit of %d images in %.1fs: %d label issues, %d near-duplicate pairs (%d across splits), "
             "%d outliers, %d imbalanced classes", len(pool.paths), time.perf_counter() - t0, len(flagged),
             len(pairs), len(cross), len(odd), metrics["imbalanced_classes"])
    _log_label_reliability(oof, len(flagged), tiers.count("likely"))
    return AuditResult(pool, probs, quality, flagged, pairs, odd, metrics)


def _log_label_reliability(oof: float, flagged: int, likely: int) -> None:
    """Say how far to trust the label issues: the tiers, and the fold models' out-of-fold accuracy."""
    log.info("label issues: %d likely (given label's out-of-fold probability <= %s), %d possible; the fold models "
             "get %.0f %% of train + val right out of fold", likely, LIKELY_MAX_PROBABILITY, flagged - likely,
             100 * oof)
    if oof < WEAK_MODEL_ACCURACY and flagged:
        log.warning("the frozen features separate these classes poorly (out-of-fold accuracy %.2f < %s): most "
                    "'possible' label issues are the features' confusions, not wrong labels. Review the 'likely' "
                    "ones; for the rest, trust the fine-tuned model's mistakes (reports/mistakes.png) more",
                    oof, WEAK_MODEL_ACCURACY)


def _oof_accuracy(pool: Pool, suggested: np.ndarray) -> float:
    fit = np.array([s != "test" for s in pool.splits])
    return float(np.mean(suggested[fit] == pool.labels[fit]))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("raw-dir", "manifest", "classes", "train", "val", "test", "label-issues", "near-duplicates",
                 "outliers", "imbalance", "metrics", "gallery-dir"):
        ap.add_argument(f"--{name}", type=Path, required=True)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = ap.parse_args(argv)
    setup_logging()
    with user_errors():
        params = load_params(args.params, "audit", PARAMS)
        run(raw_dir=args.raw_dir, manifest=args.manifest, classes_json=args.classes,
            features={"train": args.train, "val": args.val, "test": args.test}, label_issues_out=args.label_issues,
            duplicates_out=args.near_duplicates, outliers_out=args.outliers, imbalance_out=args.imbalance,
            metrics_out=args.metrics, gallery_dir=args.gallery_dir, params=params)


if __name__ == "__main__":
    main()
