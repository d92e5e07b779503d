"""Cold one-image predict: wall time and peak RSS of a fresh process, the old path vs the new one.

    python bench/predict_bench.py --keras models/model.keras [--onnx models/model.onnx] [--image IMG]
                                  [--rounds 7]

- old: ``pipeline/predict.py`` as of commit 9437c9a (``git show``), run as a script against this
  tree's library modules (its imports pointed at where the sub-package regroup moved them):
  imports TensorFlow, loads the .keras model and converts it to ONNX on every call (its default
  engine on CPU);
- new: ``python -m pipeline.predict`` on the exported ``model.onnx`` (+ ``serving.json``):
  ONNX Runtime, Pillow and NumPy only;
- floor: ``python -c "import onnxruntime, PIL.Image, numpy"``, what any ONNX predictor pays.

Each round runs the three in a fresh process, in an order that rotates every round (so the
machine's load drifts evenly over them); wall time is measured around the process, peak RSS
is the child's ``ru_maxrss`` (``os.wait4``). Medians over rounds, ratios old/new printed. Both
predict paths must agree on the image's probabilities (to 1e-5), or the benchmark stops.
Without ``--onnx`` the .keras model is exported first (``pipeline.export``, into a temp folder).
"""
from __future__ import annotations

import csv
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchlib import ROOT, bench_parser, child_env, cpu_name, idle_check, run_child

OLD_COMMIT = "9437c9a"
# The modules the old script imports, and where the sub-package regroup (fda7efe) moved them.
MOVED = {"pipeline.engines": "pipeline.runtime.engines", "pipeline.images": "pipeline.data.images",
         "pipeline.inference": "pipeline.runtime.inference", "pipeline.io_utils": "pipeline.core.io",
         "pipeline.models": "pipeline.models.heads", "pipeline.scanning": "pipeline.data.scanning"}


def old_predict_source() -> str:
    """``pipeline/predict.py`` at OLD_COMMIT, its ``from pipeline.X import`` lines pointed at today's modules."""
    text = subprocess.run(["git", "show", f"{OLD_COMMIT}:pipeline/predict.py"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout
    for old, new in MOVED.items():
        text = text.replace(f"from {old} import ", f"from {new} import ")
    return text


def probs_of(csv_path: Path) -> list[float]:
    with open(csv_path, newline="", encoding="utf-8") as fh:
        row = next(csv.DictReader(fh))
    return [float(v) for k, v in row.items() if k.startswith("prob_")]


def export(keras: Path, work: Path, env: dict) -> tuple[Path, Path]:
    out = work / "export"
    out.mkdir()
    subprocess.run([sys.executable, "-m", "pipeline.export", "--model", str(keras), "--out", str(out / "serving"),
                    "--meta", str(out / "serving.json"), "--onnx", str(out / "model.onnx")],
                   cwd=ROOT, env=env, check=True)
    return out / "model.onnx", out / "serving.json"


def main() -> None:
    ap = bench_parser(__doc__, "~1-2 min on a quiet machine: 7 rounds of three fresh processes, the old path ~9 s a "
                               "call (docs/predict.md), plus an export first without --onnx; ~6 min under heavy load "
                               "(the old path 47 s a call at load 14)")
    ap.add_argument("--keras", type=Path, required=True, help="fine-tuned .keras model (+ its .json sidecar)")
    ap.add_argument("--onnx", type=Path, default=None, help="its export (default: export it first)")
    ap.add_argument("--meta", type=Path, default=None, help="the export's serving.json (default: beside --onnx)")
    ap.add_argument("--image", type=Path, default=None, help="the image (default: a generated 640x480 JPEG)")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()

    env = child_env(ROOT)
    with tempfile.TemporaryDirectory(prefix="predict-bench-") as tmp:
        work = Path(tmp)
        old = work / "old_predict.py"
        old.write_text(old_predict_source())
        onnx, meta = (args.onnx, args.meta) if args.onnx else export(args.keras.resolve(), work, env)
        image = args.image
        if image is None:
            import numpy as np
            from PIL import Image

            image = work / "one.jpg"
            Image.fromarray(np.random.default_rng(0).integers(0, 256, (480, 640, 3), np.uint8)).save(image)
        image = Path(image).resolve()
        cmds = {
            "old (.keras, TF + convert per call)": [sys.executable, str(old), str(image), "--model",
                                                    str(args.keras.resolve()), "--out", str(work / "old.csv")],
            "new (.onnx on ONNX Runtime)": [sys.executable, "-m", "pipeline.predict", str(image), "--model",
                                            str(Path(onnx).resolve()), "--out", str(work / "new.csv"),
                                            *(["--meta", str(Path(meta).resolve())] if meta else [])],
            "floor (import onnxruntime, PIL, numpy)": [sys.executable, "-c",
                                                       "import onnxruntime, PIL.Image, numpy"],
        }
        names = list(cmds)
        results: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
        with idle_check("predict_bench") as load:
            for r in range(args.rounds):
                order = names[r % len(names):] + names[:r % len(names)]
                for n in order:
                    results[n].append(run_child(cmds[n], ROOT, env))
                print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n.split()[0]} {results[n][-1][0]:.2f}s"
                                                                   for n in names), file=sys.stderr, flush=True)
        diff = max(abs(a - b) for a, b in zip(probs_of(work / "old.csv"), probs_of(work / "new.csv")))
        if not diff <= 1e-5:
            raise SystemExit(f"old and new predict disagree on {image}: max |Δp| = {diff:.2e}")

    med = {n: (statistics.median(w for w, _ in results[n]), statistics.median(m for _, m in results[n]))
           for n in names}
    old_n, new_n = names[0], names[1]
    print(f"CPU: {cpu_name()}, {len(os.sched_getaffinity(0))} cores; load average {load.start[0]:.1f} at start, "
          f"{load.end[0]:.1f} at end; Python {platform.python_version()}; {args.rounds} interleaved rounds, medians")
    print(f"model: {args.keras} (image {image.name}); old vs new probabilities: max |Δp| = {diff:.1e}")
    print("| path | cold wall (s) | peak RSS (MiB) |")
    print("|---|---:|---:|")
    for n in names:
        print(f"| {n} | {med[n][0]:.2f} | {med[n][1]:.0f} |")
    print(f"| ratio old / new | {med[old_n][0] / med[new_n][0]:.1f}x | {med[old_n][1] / med[new_n][1]:.1f}x |")


if __name__ == "__main__":
    main()
