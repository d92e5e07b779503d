"""Calibration and TTA benchmark: temperature scaling and test-time augmentation on finished runs.

    python bench/calibration_bench.py --runs /work/bench_base/runs           # the four shared sets
    python bench/calibration_bench.py --runs RUNS --datasets flower_photos --boot 2000

Reads, never writes, a folder of finished runs of bench/finetune_bench.py (``RUNS/<dataset>/``:
manifest.csv, classes.json, {val,test}.h5, head.keras, model.keras, made with default params and
*without* a temperature), so no fine-tune is re-run. For each dataset and model (head, fine-tuned)
it computes the uncalibrated val and test probabilities of every view (original, hflip, and the
candidate ``zoom`` / ``zoom+hflip``: the central 7/8 of the image resized back), fits the temperature
on val exactly as train_head / finetune do (:func:`pipeline.models.calibration.fit_temperature` on the
original view; also without its prior on log T, for comparison), and prints:

1. calibration: test ECE and log loss before → after, each with a paired bootstrap 95 % interval
   of the after − before difference (test rows resampled ``--boot`` times);
   and the ECE floor: the mean ECE a perfectly calibrated model with the same confidences would show on
   this many test images (sampling noise alone);
   and, with more images, the same cross-fitted on val ∪ test (T fitted on a random half, scored on the
   other, 200 halvings, means);
2. TTA: test accuracy, log loss and ECE (calibrated) of the original view, of original + hflip (what
   ``evaluate.tta`` does, with the single-view T), of original + hflip with T refitted on TTA-averaged
   val probabilities, and of the four views.

The head's original view comes from the cached features; its other views run the frozen backbone
(ONNX Runtime) on the transformed images. Probabilities are cached in ``--work``/<dataset>.npz so a
rerun only recomputes the tables. Results also go to ``--work``/calibration_bench.json.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from benchlib import SHARED_DATASETS, bench_params, bench_parser
from PIL import Image

from pipeline.backbones.build import build_backbone, feature_provenance
from pipeline.backbones.registry import image_size
from pipeline.core.io import read_json, setup_logging
from pipeline.core.manifest import read_manifest
from pipeline.core.params import parse_params
from pipeline.extraction.features import open_features
from pipeline.models.calibration import apply_temperature, ece, fit_temperature, nll
from pipeline.models.heads import load_model, predict_features, without_temperature
from pipeline.runtime import tta
from pipeline.runtime.engines import compile_engine
from pipeline.runtime.inference import batched_images

DATASETS = ("simpsons_dev", "flower_photos", "hymenoptera", "dogs_vs_cats")
VIEWS = ("original", "hflip", "zoom", "zoom_hflip")
ZOOM = 7 / 8

log = logging.getLogger("calibration_bench")


def zoom(batch: np.ndarray) -> np.ndarray:
    """The central ZOOM of each image, resized back to its size (Pillow bilinear, as load_image)."""
    s = batch.shape[1]
    c = int(round(s * ZOOM))
    a = (s - c) // 2
    return np.stack([np.asarray(Image.fromarray(im[a:a + c, a:a + c]).resize((s, s), Image.BILINEAR))
                     for im in batch])


def all_views(batch: np.ndarray) -> list[np.ndarray]:
    original, flipped = tta.views(batch, ("original", "hflip"))
    z = zoom(batch)
    return [original, flipped, z, tta.views(z, ("original", "hflip"))[1]]


def probabilities(run: Path, raw_dir: Path, work: Path) -> dict:
    """{f"{model}_{split}": (V, N, K) float32 uncalibrated probabilities, f"y_{split}": (N,)}, cached in work."""
    cache = work / f"{run.name}.npz"
    if cache.is_file():
        return dict(np.load(cache))
    params = parse_params(bench_params(raw_dir))
    classes = read_json(run / "classes.json")["classes"]
    expected = feature_provenance(params.backbone, classes)
    # Uncalibrated outputs, whatever the run saved: models trained since calibration carry a Temperature layer.
    head = without_temperature(load_model(run / "head.keras", expected)[0])
    model = without_temperature(load_model(run / "model.keras", expected)[0])
    size = image_size(params.backbone)
    ft = compile_engine(model, size, "onnxruntime", 32)
    backbone = compile_engine(build_backbone(params.backbone), size, "onnxruntime", 32)
    index = {c: i for i, c in enumerate(classes)}
    out = {}
    for split in ("val", "test"):
        items = read_manifest(run / "manifest.csv", splits=(split,))
        with open_features(run / f"{split}.h5", expected) as ff:
            assert ff.paths == [it.path for it in items], "feature rows must follow the manifest"
            head_original = predict_features(head, ff)
        parts = {"head": [[] for _ in VIEWS], "finetuned": [[] for _ in VIEWS]}
        for images, _ in batched_images([str(raw_dir / it.path) for it in items], size, 32, desc=f"{run.name} {split}"):
            for v, view in enumerate(all_views(images)):
                parts["finetuned"][v].append(ft(view))
                if v:
                    parts["head"][v].append(head.predict_on_batch(backbone(view)))
        parts["head"][0] = [head_original]
        for name, per_view in parts.items():
            out[f"{name}_{split}"] = np.stack([np.concatenate(p) for p in per_view]).astype(np.float32)
        out[f"y_{split}"] = np.asarray([index[it.label] for it in items])
    work.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **out)
    return out


def boot_diff(fn, a: np.ndarray, b: np.ndarray, y: np.ndarray, n_boot: int, seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of fn(a) − fn(b) over paired bootstrap resamples of the rows."""
    rng = np.random.default_rng(seed)
    n = len(y)
    d = []
    for _ in range(n_boot):
        i = rng.integers(0, n, n)
        d.append(fn(a[i], y[i]) - fn(b[i], y[i]))
    lo, hi = np.percentile(d, [2.5, 97.5])
    return float(lo), float(hi)


def ece_floor(probs: np.ndarray, n_sim: int, seed: int = 0) -> float:
    """Mean ECE of a *perfectly calibrated* model with these top-label confidences on this many rows: each row
    right with probability its confidence. What ECE reads from sampling noise alone (its floor at this N)."""
    conf = probs.max(1)
    rng = np.random.default_rng(seed)
    two = np.stack([conf, 1 - conf], 1)  # top-label ECE only needs the confidence and whether row is right
    return float(np.mean([ece(two, (rng.random(len(conf)) >= conf).astype(int)) for _ in range(n_sim)]))


def acc(p: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(p.argmax(1) == y))


def analyse(probs: dict, n_boot: int) -> dict:
    res = {}
    for name in ("head", "finetuned"):
        val, test, yv, yt = probs[f"{name}_val"], probs[f"{name}_test"], probs["y_val"], probs["y_test"]
        t = fit_temperature(val[0], yv)
        before, after = test[0], apply_temperature(test[0], t)
        r = {"temperature": t, "n_val": int(len(yv)), "n_test": int(len(yt)), "accuracy": acc(before, yt),
             "ece_uncalibrated": ece(before, yt), "ece": ece(after, yt),
             "log_loss_uncalibrated": nll(before, yt), "log_loss": nll(after, yt),
             "ece_diff_ci": boot_diff(ece, after, before, yt, n_boot),
             "log_loss_diff_ci": boot_diff(nll, after, before, yt, n_boot),
             "ece_floor": ece_floor(after, n_boot)}
        t_mle = fit_temperature(val[0], yv, prior_sd=None)  # without the prior on log T, for comparison
        r["mle"] = {"temperature": t_mle, "log_loss": nll(apply_temperature(test[0], t_mle), yt),
                    "ece": ece(apply_temperature(test[0], t_mle), yt)}
        # The test split alone is small (ECE's floor is ~0.04 at 150 images): the method's effect measured on more
        # images by cross-fitting on val ∪ test, T fitted on a random half, ECE / log loss on the other half.
        pool, ypool = np.concatenate([val[0], test[0]]), np.concatenate([yv, yt])
        rng, diffs = np.random.default_rng(1), []
        for _ in range(200):
            perm = rng.permutation(len(ypool))
            a, b = perm[: len(perm) // 2], perm[len(perm) // 2:]
            tc = fit_temperature(pool[a], ypool[a])
            pb = apply_temperature(pool[b], tc)
            pm = apply_temperature(pool[b], fit_temperature(pool[a], ypool[a], prior_sd=None))
            diffs.append((ece(pool[b], ypool[b]), ece(pb, ypool[b]), nll(pool[b], ypool[b]), nll(pb, ypool[b]),
                          nll(pm, ypool[b])))
        d = np.asarray(diffs)
        r["crossfit"] = {"n_eval": int(len(ypool) - len(ypool) // 2), "ece_uncalibrated": float(d[:, 0].mean()),
                         "ece": float(d[:, 1].mean()), "log_loss_uncalibrated": float(d[:, 2].mean()),
                         "log_loss": float(d[:, 3].mean()), "ece_better_share": float(np.mean(d[:, 1] < d[:, 0])),
                         "log_loss_better_share": float(np.mean(d[:, 3] <= d[:, 2])),
                         "log_loss_mle": float(d[:, 4].mean())}
        cal = [apply_temperature(p, t) for p in test]  # every view with the single-view T (as evaluate)
        tta2 = tta.average(cal[:2])
        t2 = fit_temperature(tta.average(val[:2]), yv)  # T refitted on TTA-averaged val probabilities
        tta2_refit = apply_temperature(tta.average(test[:2]), t2)
        tta4 = tta.average(cal)
        for key, p in (("single", cal[0]), ("tta_hflip", tta2), ("tta_hflip_refit", tta2_refit), ("tta_4", tta4)):
            r[key] = {"accuracy": acc(p, yt), "log_loss": nll(p, yt), "ece": ece(p, yt)}
        r["tta_hflip"]["log_loss_diff_ci"] = boot_diff(nll, tta2, cal[0], yt, n_boot)
        r["tta_4"]["log_loss_diff_ci"] = boot_diff(nll, tta4, cal[0], yt, n_boot)
        r["tta_hflip_refit"]["temperature"] = t2
        res[name] = r
    return res


def tables(results: dict) -> str:
    lines = ["### Calibration (test; T fitted on val; Δ = after − before, paired bootstrap 95 % interval)", "",
             "| dataset | model | n test | T | ECE before → after | Δ ECE [95 % CI] | log loss before → after "
             "| Δ log loss [95 % CI] | ECE floor | T, log loss, ECE without prior |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for ds, res in results.items():
        for name, r in res.items():
            lines.append(
                f"| {ds} | {name} | {r['n_test']} | {r['temperature']:.3f} | {r['ece_uncalibrated']:.4f} → "
                f"{r['ece']:.4f} | {r['ece'] - r['ece_uncalibrated']:+.4f} [{r['ece_diff_ci'][0]:+.4f}, "
                f"{r['ece_diff_ci'][1]:+.4f}] | {r['log_loss_uncalibrated']:.4f} → {r['log_loss']:.4f} | "
                f"{r['log_loss'] - r['log_loss_uncalibrated']:+.4f} [{r['log_loss_diff_ci'][0]:+.4f}, "
                f"{r['log_loss_diff_ci'][1]:+.4f}] | {r['ece_floor']:.4f} | {r['mle']['temperature']:.3f}, "
                f"{r['mle']['log_loss']:.4f}, {r['mle']['ece']:.4f} |")
    lines += ["", "### Cross-fitted on val ∪ test (200 random halves: T fitted on one, scored on the other; means)",
              "", "| dataset | model | n scored | ECE before → after | share ECE improves | log loss before → "
              "after | share log loss not worse | log loss, T without prior |", "|---|---|---|---|---|---|---|---|"]
    for ds, res in results.items():
        for name, r in res.items():
            c = r["crossfit"]
            lines.append(f"| {ds} | {name} | {c['n_eval']} | {c['ece_uncalibrated']:.4f} → {c['ece']:.4f} | "
                         f"{c['ece_better_share']:.0%} | {c['log_loss_uncalibrated']:.4f} → {c['log_loss']:.4f} | "
                         f"{c['log_loss_better_share']:.0%} | {c['log_loss_mle']:.4f} |")
    lines += ["", "### TTA (test, calibrated; accuracy / log loss / ECE)", "",
              "| dataset | model | original | + hflip (evaluate.tta) | Δ log loss [95 % CI] | + hflip, T refitted "
              "| 4 views (+ zoom) | Δ log loss [95 % CI] |", "|---|---|---|---|---|---|---|---|"]

    def cell(m):
        return f"{m['accuracy']:.4f} / {m['log_loss']:.4f} / {m['ece']:.4f}"

    for ds, res in results.items():
        for name, r in res.items():
            d2, d4 = r["tta_hflip"], r["tta_4"]
            lines.append(
                f"| {ds} | {name} | {cell(r['single'])} | {cell(d2)} | "
                f"{d2['log_loss'] - r['single']['log_loss']:+.4f} [{d2['log_loss_diff_ci'][0]:+.4f}, "
                f"{d2['log_loss_diff_ci'][1]:+.4f}] | {cell(r['tta_hflip_refit'])} | {cell(d4)} | "
                f"{d4['log_loss'] - r['single']['log_loss']:+.4f} [{d4['log_loss_diff_ci'][0]:+.4f}, "
                f"{d4['log_loss_diff_ci'][1]:+.4f}] |")
    return "\n".join(lines)


def main() -> None:
    ap = bench_parser(__doc__, "a few minutes for the four sets on a first run (every val and test image in 4 "
                               "views through the fine-tuned model and the backbone; estimate, docs/trust.md "
                               "reports no timing); a rerun reads the cached probabilities, ~1 min of bootstrap "
                               "and cross-fitting")
    ap.add_argument("--runs", type=Path, default=Path("/work/bench_base/runs"))
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS))
    ap.add_argument("--work", type=Path, default=Path("/tmp/calibration_bench"))
    ap.add_argument("--boot", type=int, default=2000, help="bootstrap resamples")
    args = ap.parse_args()
    setup_logging()
    results = {}
    for ds in args.datasets:
        run = args.runs / ds
        if not (run / "model.keras").is_file():
            log.warning("%s: no finished run in %s, skipped", ds, run)
            continue
        results[ds] = analyse(probabilities(run, SHARED_DATASETS / ds, args.work), args.boot)
    (args.work / "calibration_bench.json").write_text(json.dumps(results, indent=1))
    print(tables(results))


if __name__ == "__main__":
    main()
