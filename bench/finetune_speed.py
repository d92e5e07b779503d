"""Fine-tuning speed: the whole finetune stage against TensorFlow's forward-only ceiling, with where its seconds go.

    python bench/finetune_speed.py --run <finetune_bench work>/runs/simpsons_dev --raw ../shared/datasets/simpsons_dev

``--run`` is a folder where prepare, extract and train_head have run (manifest.csv, classes.json,
head.keras, val.h5: e.g. a bench/finetune_bench.py run); its files are only read. In one process:

1. **ceiling**: TensorFlow's forward pass of the whole network (backbone + head, inference) over
   decoded training images in memory, batch 32, median of ``--rounds``: images/s. No fine-tune can
   beat it by running the network as inference does, so it is the yardstick the throughput is
   divided by (measured again at the end; the mean of both is used, and both are printed).
2. **first run**: the real finetune stage (``pipeline.finetune.run``, params.yaml) with an empty
   activation cache: every view's bottom is computed. **re-run**: the same with that cache warm.
   Each prints its wall seconds by part (the stage's own ``seconds_by_part``: setup, bottom, train,
   validate, checkpoint, finish) and its throughput = training image-epochs / stage seconds ÷ the ceiling.
3. ``--overlap``: a third first run with the bottom of each view started while the epoch before
   trains (the stream without its :class:`pipeline.finetuning.stream.EpochGate`, as before the gate),
   to see whether overlapping the two pays on this machine's cores.
4. ``--levers``: the top's training step in images/s at batch 16, 32 and 64 (float32), interleaved rounds.

It prints tables and appends one JSON line to ``--out``.
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
from benchlib import ROOT, bench_parser, cpu_name, idle_check

from pipeline import finetune
from pipeline.backbones.build import build_backbone, feature_provenance, resolve_unfreeze_from
from pipeline.backbones.registry import image_size
from pipeline.core.io import read_json, setup_logging
from pipeline.core.manifest import read_manifest
from pipeline.core.params import Params, load_params
from pipeline.data.images import load_batch
from pipeline.finetuning import stream, trainer
from pipeline.finetuning.recipe import build_optimizer
from pipeline.models.heads import build_stacked, load_model, without_temperature

PARTS = ("setup", "bottom", "train", "validate", "checkpoint", "finish")


def ceiling(params: Params, run: Path, images: np.ndarray, rounds: int) -> float:
    """TensorFlow forward of backbone + head over ``images`` (N, S, S, 3) float32 at batch 32 → median images/s."""
    head, _ = load_model(run / "head.keras")
    model = build_stacked(build_backbone(params.backbone), without_temperature(head))
    model.predict(images[:32], batch_size=32, verbose=0)  # trace outside the clock
    rates = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        model.predict(images, batch_size=32, verbose=0)
        rates.append(len(images) / (time.perf_counter() - t0))
    return statistics.median(rates)


class _NoGate(stream.EpochGate):
    """The stream as before the gate: the next view's bottom starts as soon as prefetch asks for it."""

    def wait(self, epoch: int) -> bool:
        return True


def stage(params: Params, run: Path, raw: Path, cache: Path, scratch: Path, tag: str) -> dict:
    """One real finetune stage → its metrics, plus the training image-epochs it ran."""
    out = scratch / tag
    out.mkdir()
    m = finetune.run(raw_dir=raw, manifest=run / "manifest.csv", classes_json=run / "classes.json",
                     val_features=run / "val.h5", head_path=run / "head.keras", model_out=out / "model.keras",
                     history_out=out / "history.csv", metrics_out=out / "metrics.json", params=params,
                     activation_cache=cache)
    epochs = len((out / "history.csv").read_text().splitlines()) - 2  # header and epoch 0
    m["image_epochs"] = epochs * len(read_manifest(run / "manifest.csv", splits=("train",)))
    return m


def levers(params: Params, run: Path, raw: Path, rounds: int) -> dict[str, float]:
    """The top's training step, images/s at batch 16 / 32 / 64, on the clean activations of 64 train images."""
    classes = read_json(run / "classes.json")["classes"]
    boundary = resolve_unfreeze_from(params.finetune.unfreeze_from, params.backbone.name)
    # The stage's own steps: backbone + head, unfrozen from the boundary, BatchNorm folded, cut there.
    stacked = finetune.stack_head(params, run / "head.keras", run / "val.h5", raw,
                                  feature_provenance(params.backbone, classes), boundary)
    cut, _ = finetune.trainable_top(stacked, params.finetune, boundary, params.backbone.name, steps=1, replicas=1)
    items = read_manifest(run / "manifest.csv", splits=("train",))[:64]
    index = {c: i for i, c in enumerate(classes)}
    x = cut.bottom.predict(load_batch([str(raw / it.path) for it in items], image_size(params.backbone))
                           .astype(np.float32), verbose=0)
    y = np.asarray([index[it.label] for it in items], np.int64)
    tops = {}
    for b in (16, 32, 64):
        top = keras.models.clone_model(cut.top)
        top.set_weights(cut.top.get_weights())
        top.compile(optimizer=build_optimizer(params.finetune, math.ceil(len(items) / b)),
                    loss=keras.losses.SparseCategoricalCrossentropy(), metrics=["accuracy"])
        top.train_on_batch(x[:b], y[:b])
        tops[b] = top
    rates: dict[str, list[float]] = {f"top step fp32 b{b}": [] for b in tops}
    for _ in range(rounds):
        for b, top in tops.items():
            reps = max(3, 192 // b)
            t0 = time.perf_counter()
            for _ in range(reps):
                top.train_on_batch(x[:b], y[:b])
            rates[f"top step fp32 b{b}"].append(reps * b / (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in rates.items()}


def main(argv: list[str] | None = None) -> None:
    ap = bench_parser(__doc__, "~6 min on the idle machine for simpsons_dev (904 train images, 8 epochs: a first "
                               "run ~2 min, a re-run ~1.5 min, the ceiling twice); --overlap adds a first run, "
                               "--levers ~1 min")
    ap.add_argument("--run", type=Path, required=True, help="folder with manifest.csv, classes.json, head.keras")
    ap.add_argument("--raw", type=Path, required=True, help="the images the manifest's paths are relative to")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the ceiling (and of --levers)")
    ap.add_argument("--ceiling-images", type=int, default=256)
    ap.add_argument("--overlap", action="store_true", help="also a first run without the epoch gate")
    ap.add_argument("--levers", action="store_true", help="also the top's step rate at batch 16/32/64")
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--out", type=Path, default=ROOT / ".cache" / "finetune_speed.jsonl")
    args = ap.parse_args(argv)
    setup_logging()
    load = idle_check("finetune_speed")
    params = load_params(args.params)
    train = read_manifest(args.run / "manifest.csv", splits=("train",))[:args.ceiling_images]
    images = load_batch([str(args.raw / it.path) for it in train], image_size(params.backbone)).astype(np.float32)
    ceil = [ceiling(params, args.run, images, args.rounds)]
    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="finetune-speed-") as scratch:
        cache = Path(scratch) / "acts"
        runs["first run"] = stage(params, args.run, args.raw, cache, Path(scratch), "first")
        runs["re-run"] = stage(params, args.run, args.raw, cache, Path(scratch), "rerun")
        if args.overlap:
            gate = trainer.EpochGate
            trainer.EpochGate = _NoGate
            try:
                runs["first run, overlapped"] = stage(params, args.run, args.raw, Path(scratch) / "acts2",
                                                      Path(scratch), "overlap")
            finally:
                trainer.EpochGate = gate
    lev = levers(params, args.run, args.raw, args.rounds) if args.levers else {}
    ceil.append(ceiling(params, args.run, images, args.rounds))
    load.finish()
    c = statistics.mean(ceil)
    result = {"cpu": cpu_name(), "run": str(args.run), "ceiling_img_per_s": ceil, "levers": lev,
              "runs": {k: {"seconds": m["seconds"], "seconds_by_part": m["seconds_by_part"],
                           "image_epochs": m["image_epochs"], "bottom_images_computed": m["bottom_images_computed"],
                           "ratio_to_ceiling": m["image_epochs"] / m["seconds"] / c} for k, m in runs.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(result) + "\n")
    print(f"\nCPU: {result['cpu']}; ceiling (TensorFlow forward, whole network, batch 32): "
          f"{ceil[0]:.1f} / {ceil[1]:.1f} img/s (start / end)")
    print("| run | s | " + " | ".join(PARTS) + " | image-epochs/s | ÷ ceiling |")
    print("|---|---|" + "---|" * len(PARTS) + "---|---|")
    for k, r in result["runs"].items():
        parts = " | ".join(f"{r['seconds_by_part'].get(p, 0.0):.1f}" for p in PARTS)
        print(f"| {k} | {r['seconds']:.1f} | {parts} | {r['image_epochs'] / r['seconds']:.1f} | "
              f"{r['ratio_to_ceiling']:.2f} x |")
    if lev:
        print("\n| lever | images/s |\n|---|---|")
        for k, v in lev.items():
            print(f"| {k} | {v:.1f} |")


if __name__ == "__main__":
    main()
