"""Fine-tuning speed, before vs after, side by side in one process (interleaved rounds, medians).

    python bench/finetune_speed.py --run /work/bench_base/runs/simpsons_dev --raw ../shared/datasets/simpsons_dev

``--run`` is a folder where prepare, extract and train_head have run (manifest.csv, classes.json,
head.keras, val.h5: e.g. a bench/finetune_bench.py run); its files are only read. Each round
times one epoch (``--images`` training images, then the val set) of each path on the same images:

- **before** (main at 9437c9a): the stacked model (backbone + head, top unfrozen, BN folded)
  trained on decoded images augmented in the input pipeline, every frozen layer run forward in
  every step; val on the stacked model over the val images;
- **after, new view**: the frozen bottom run once on ONNX Runtime over a view no run computed
  yet (:mod:`pipeline.finetuning.activations`), then the top trained on the stored activations; val on the
  top over cached clean activations;
- **after, cached view**: the same with the view already in the activation cache (a later epoch
  cycling back to it with ``finetune.views`` < epochs, or any later run that reuses the cache).

Then the levers measured in isolation, each interleaved with its reference: the top's training
step in mixed bfloat16 vs float32 (only where the CPU reports AVX512_BF16 or AMX; detected, never
assumed), the top at batch 32 / 64 vs 16, and the bottom on ONNX Runtime vs TensorFlow.
It prints a table and appends one JSON line to ``--out``.
"""
from __future__ import annotations

import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import keras
import numpy as np
from benchlib import ROOT, bench_parser, cpu_has_bf16, cpu_name, idle_check

from pipeline.backbones.build import backbone_provenance, build_backbone, get_base, resolve_unfreeze_from
from pipeline.backbones.registry import image_size
from pipeline.core.io import file_digests, library_versions, read_json, setup_logging
from pipeline.core.manifest import read_manifest
from pipeline.core.params import Params, load_params
from pipeline.data.augment import augment as augment_images
from pipeline.data.datasets import image_dataset
from pipeline.data.images import load_batch
from pipeline.finetuning.activations import BOTTOM_BATCH, ActivationCache, Activations, bottom_engine, cache_key
from pipeline.finetuning.cut import cut_at
from pipeline.finetuning.recipe import build_optimizer, fold_bn_scale, unfreeze_from
from pipeline.finetuning.stream import clean_dataset
from pipeline.models.heads import build_stacked, load_model
from pipeline.runtime.engines import compile_engine


def build(params: Params, run: Path, steps: int) -> tuple[keras.Model, keras.Model, object]:
    """Stacked model (top unfrozen, BN folded) and its split, both compiled as finetune compiles them."""
    head, _ = load_model(run / "head.keras")
    backbone = build_backbone(params.backbone)
    keras.utils.set_random_seed(params.seed)
    stacked = build_stacked(backbone, head)
    base = get_base(backbone)
    boundary = resolve_unfreeze_from(params.finetune.unfreeze_from, params.backbone.name)  # `auto`, as finetune
    unfreeze_from(base, boundary, params.backbone.name)
    fold_bn_scale(base)
    split = cut_at(backbone, head, boundary)
    loss = keras.losses.SparseCategoricalCrossentropy()
    for m in (stacked, split.top):
        m.compile(optimizer=build_optimizer(params.finetune, steps), loss=loss, metrics=["accuracy"])
    return stacked, split.top, split


def before_stream(paths: list[str], labels: list[int], size: int, batch: int, params: Params, epoch: int):
    """Main's (9437c9a) training stream: decode, then augment every batch keyed (seed, epoch, index)."""
    salt = params.seed % 2**32
    order = np.random.default_rng([salt, epoch]).permutation(len(paths))
    ds = image_dataset([paths[i] for i in order], size, batch, labels=[labels[i] for i in order])
    for b, (x, y) in enumerate(ds):
        keys = [[salt, epoch, int(i)] for i in order[b * batch:b * batch + len(y)]]
        yield augment_images(x, params.augment, keys), y


def epoch_before(stacked, paths, labels, val_ds, size, params, epoch) -> float:
    t0 = time.perf_counter()
    for x, y in before_stream(paths, labels, size, params.finetune.batch_size, params, epoch):
        stacked.train_on_batch(x, y)
    stacked.evaluate(val_ds, verbose=0)
    return time.perf_counter() - t0


def epoch_after(top, acts: Activations, paths, digests, labels, val_ds, params, view: int) -> float:
    t0 = time.perf_counter()
    acts.ensure(paths, digests, view)
    keys = acts.keys(digests, view)
    order = np.random.default_rng([params.seed % 2**32, view]).permutation(len(paths))
    lab = np.asarray(labels, np.int64)
    bs = params.finetune.batch_size
    for b in range(0, len(order), bs):
        rows = order[b:b + bs]
        top.train_on_batch(acts.cache.get_many([keys[i] for i in rows]), lab[rows])
    top.evaluate(val_ds, verbose=0)
    return time.perf_counter() - t0


def step_rate(model, x, y, reps: int) -> float:
    """Training images per second of ``reps`` steps on one fixed batch."""
    t0 = time.perf_counter()
    for _ in range(reps):
        model.train_on_batch(x, y)
    return reps * len(x) / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    ap = bench_parser(__doc__, "~3-5 min on the idle machine (estimate: docs/finetune.md's run, --images 256 "
                               "--rounds 3, took ~80 s a round under load 13-17, about 5x an idle machine's time; "
                               "the default is 512 images x 3 rounds, plus warm-up and the levers)")
    ap.add_argument("--run", type=Path, required=True, help="folder with manifest.csv, classes.json, head.keras")
    ap.add_argument("--raw", type=Path, required=True, help="the images the manifest's paths are relative to")
    ap.add_argument("--images", type=int, default=512, help="training images per timed epoch")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--out", type=Path, default=ROOT / ".cache" / "finetune_speed.jsonl")
    args = ap.parse_args(argv)
    setup_logging()
    load = idle_check("finetune_speed")
    params = load_params(args.params)
    size = image_size(params.backbone)
    classes = read_json(args.run / "classes.json")["classes"]
    index = {c: i for i, c in enumerate(classes)}
    train = read_manifest(args.run / "manifest.csv", splits=("train",))[:args.images]
    val = read_manifest(args.run / "manifest.csv", splits=("val",))
    paths = [str(args.raw / it.path) for it in train]
    labels = [index[it.label] for it in train]
    val_paths, val_labels = [str(args.raw / it.path) for it in val], [index[it.label] for it in val]
    digests, val_digests = file_digests(paths), file_digests(val_paths)
    steps = math.ceil(len(paths) / params.finetune.batch_size)
    stacked, top, split = build(params, args.run, steps)

    engine, desc = bottom_engine()
    key, kdesc = cache_key(backbone_provenance(params.backbone), split.boundary, desc, library_versions())
    with tempfile.TemporaryDirectory(prefix="finetune-speed-") as scratch:
        cache = ActivationCache(Path(scratch), key, kdesc, split.activation_shape)
        acts = Activations(cache, lambda: compile_engine(split.bottom, size, engine, BOTTOM_BATCH), params.augment,
                           params.seed, size, BOTTOM_BATCH)
        val_img = image_dataset(val_paths, size, params.finetune.batch_size, labels=val_labels)
        val_act = clean_dataset(acts, val_paths, val_digests, val_labels, params.finetune.batch_size)
        # Warm-up: traces, the ONNX conversion and a first cached view, outside every clock.
        epoch_before(stacked, paths[:32], labels[:32], val_img.take(1), size, params, 999)
        epoch_after(top, acts, paths, digests, labels, val_act, params, 0)
        t = {"before": [], "after_new_view": [], "after_cached_view": []}
        for r in range(args.rounds):
            t["before"].append(epoch_before(stacked, paths, labels, val_img, size, params, r))
            t["after_new_view"].append(epoch_after(top, acts, paths, digests, labels, val_act, params, r + 1))
            t["after_cached_view"].append(epoch_after(top, acts, paths, digests, labels, val_act, params, 0))
        med = {k: statistics.median(v) for k, v in t.items()}

        # Levers in isolation, on fixed batches of real activations / images.
        x_act = cache.get_many(acts.keys(digests[:64], 0))
        y = np.asarray(labels[:64], np.int64)
        bs = params.finetune.batch_size
        lever: dict[str, list[float]] = {"top fp32 b16": [], "top fp32 b32": [], "top fp32 b64": []}
        rates_bottom: dict[str, list[float]] = {"bottom onnxruntime": [], "bottom tensorflow": []}
        ort = compile_engine(split.bottom, size, "onnxruntime", BOTTOM_BATCH)
        tfb = compile_engine(split.bottom, size, "tensorflow", BOTTOM_BATCH)
        u8 = load_batch(paths[:BOTTOM_BATCH], size)
        ort(u8), tfb(u8)
        bf16 = cpu_has_bf16()
        top_bf16 = None
        if bf16:
            keras.mixed_precision.set_global_policy("mixed_bfloat16")
            _, top_bf16, _ = build(params, args.run, steps)
            keras.mixed_precision.set_global_policy("float32")
            lever["top mixed_bfloat16 b16"] = []
            top_bf16.train_on_batch(x_act[:bs], y[:bs])
        for b in (16, 32, 64):
            top.train_on_batch(x_act[:b], y[:b])
        for _ in range(args.rounds):
            for b in (16, 32, 64):
                lever[f"top fp32 b{b}"].append(step_rate(top, x_act[:b], y[:b], max(2, 96 // b)))
            if top_bf16 is not None:
                lever["top mixed_bfloat16 b16"].append(step_rate(top_bf16, x_act[:bs], y[:bs], 6))
            for name, fn in (("bottom onnxruntime", ort), ("bottom tensorflow", tfb)):
                t0 = time.perf_counter()
                fn(u8)
                rates_bottom[name].append(len(u8) / (time.perf_counter() - t0))
        lev = {k: statistics.median(v) for k, v in {**lever, **rates_bottom}.items() if v}
    load.finish()

    n = len(paths)
    views, epochs = params.finetune.views, params.finetune.epochs
    fresh = min(views, epochs)
    run_before = epochs * med["before"]
    run_after = fresh * med["after_new_view"] + (epochs - fresh) * med["after_cached_view"]
    run_cached = epochs * med["after_cached_view"]
    result = {
        "cpu": cpu_name(), "bf16_cpu": bf16, "run": str(args.run), "train_images": n, "val_images": len(val_paths),
        "rounds": args.rounds, "epoch_seconds": t, "median_epoch_seconds": med,
        "train_img_per_s": {k: n / v for k, v in med.items()},
        "levers": lev, "views": views, "epochs": epochs,
        "run_ratio_first": run_before / run_after, "run_ratio_cached": run_before / run_cached,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(result) + "\n")
    print(f"\nCPU: {result['cpu']} (AVX512_BF16/AMX: {bf16}); {n} training + {len(val_paths)} val images per epoch, "
          f"{args.rounds} interleaved rounds, medians")
    print("| path | s / epoch (train + val) | epoch images/s | speed-up |")
    print("|---|---|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v:.1f} | {n / v:.1f} | {med['before'] / v:.2f} x |")
    print(f"\n{epochs} epochs with finetune.views = {views}: first run {result['run_ratio_first']:.2f} x as fast "
          f"as before; with every view cached (a re-run) {result['run_ratio_cached']:.2f} x")
    print("\n| lever | images/s |")
    print("|---|---|")
    for k, v in lev.items():
        print(f"| {k} | {v:.1f} |")


if __name__ == "__main__":
    main()
