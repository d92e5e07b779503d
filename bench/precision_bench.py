"""Reduced-precision benchmark: speed ratio to float32 and test accuracy / log loss per precision mode.

    python bench/precision_bench.py [--sets simpsons_dev flower_photos hymenoptera] [--base /work/bench_base]
                                    [--calib 128] [--rounds 5] [--out precision.jsonl]

Modes, each against the float32 engine it reduces (all measured in this one process):

  fp32          ONNX Runtime, float32: the default engine on CPU (the reference)
  int8          ONNX Runtime static quantization (QDQ, per-channel int8 weights, uint8 activations,
                MinMax ranges calibrated on --calib training images of each set), every Conv/MatMul
  int8-keep     the same, with the stem conv, every depthwise conv and the top conv kept float32
                (the layers known to be sensitive in EfficientNets)
  tf-fp32       TensorFlow, float32 (the reference of bf16's speed; its outputs are fp32's within 1e-5)
  bf16          TensorFlow with Keras' mixed_bfloat16 policy (oneDNN's bf16 kernels; only run when
                the CPU reports avx512_bf16 or amx_bf16)

For each shared set (manifest and classes from a finished bench/finetune_bench.py run under --base:
runs/<set>/manifest.csv; images from ../shared/datasets/<set>): the clean features of every split
under each mode (no augmented views, fp32 measured the same way), a logistic-regression head fitted
as train_head does (default head params) → test accuracy and log loss; and the fine-tuned model of
that run (runs/<set>/model.keras, when present) run on the test images under each mode → test
accuracy, log loss, top-1 agreement with fp32 and max |Δp|. Speed: compute-only img/s of each mode on
one in-memory batch of real images, rounds interleaved, medians, as a ratio to its float32 engine.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
from benchlib import SHARED_DATASETS, bench_params, bench_parser, cpu_flags, cpu_has_bf16, cpu_name, idle_check

from pipeline.backbones.registry import resolve
from pipeline.core.io import read_json
from pipeline.core.manifest import read_manifest
from pipeline.core.params import parse_params
from pipeline.runtime.engines import onnx_session, session_infer
from pipeline.runtime.inference import batched_images


def decode(paths: list[str], size: int) -> np.ndarray:
    return np.concatenate([b for b, _ in batched_images(paths, size, 64, progress=False)])


def run_batches(infer, x: np.ndarray, bs: int = 32) -> np.ndarray:
    return np.concatenate([np.asarray(infer(x[i:i + bs]), np.float32) for i in range(0, len(x), bs)])


def quantize(fp32: bytes, calib: np.ndarray, keep_sensitive: bool, work: Path) -> bytes:
    """Static int8 quantization (QDQ, per-channel) of ``fp32``, ranges calibrated on ``calib`` (uint8 images)."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    src, pre, out = work / "fp32.onnx", work / "pre.onnx", work / "int8.onnx"
    src.write_bytes(fp32)
    quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
    model = onnx.load(str(pre))
    exclude: list[str] = []
    if keep_sensitive:
        convs = [n for n in model.graph.node if n.op_type == "Conv"]
        for i, n in enumerate(convs):
            group = next((a.i for a in n.attribute if a.name == "group"), 1)
            if group > 1 or i in (0, len(convs) - 1):  # depthwise, stem, top
                exclude.append(n.name)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"images": calib[i:i + 16]} for i in range(0, len(calib), 16)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=exclude,
                    extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
    return out.read_bytes()


def bf16_clone(model):
    """``model`` rebuilt under Keras' mixed_bfloat16 policy, same weights."""
    import keras

    text = model.to_json().replace('"name": "float32"', '"name": "mixed_bfloat16"')
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        clone = keras.models.model_from_json(text)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    clone.set_weights(model.get_weights())
    return clone


def tf_infer(model, size: int):
    import tensorflow as tf

    fn = tf.function(lambda x: tf.cast(model(tf.cast(x, tf.float32), training=False), tf.float32),
                     input_signature=[tf.TensorSpec((None, size, size, 3), tf.uint8)])
    return lambda x: fn(x).numpy()


def head_metrics(train, val_test: dict, seed: int, C: float) -> dict:
    """logreg head fitted as train_head does (features / RMS, L2 C) → test accuracy, log loss."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss

    from pipeline.train_head import feature_scale

    x, y = train
    scale = feature_scale(x)
    clf = LogisticRegression(C=C, max_iter=1000, random_state=seed).fit(x.astype(np.float64) / scale, y)
    xt, yt = val_test["test"]
    p = clf.predict_proba(xt.astype(np.float64) / scale)
    return {"acc": float(np.mean(p.argmax(1) == yt)),
            "loss": float(log_loss(yt, np.clip(p, 1e-7, 1), labels=list(range(p.shape[1]))))}


def prob_metrics(p: np.ndarray, y: np.ndarray, ref: np.ndarray) -> dict:
    from sklearn.metrics import log_loss

    return {"acc": float(np.mean(p.argmax(1) == y)),
            "loss": float(log_loss(y, np.clip(p, 1e-7, 1), labels=list(range(p.shape[1])))),
            "agree": float(np.mean(p.argmax(1) == ref.argmax(1))), "max_dp": float(np.max(np.abs(p - ref)))}


def speeds(infers: dict, x: np.ndarray, rounds: int, steps: int = 2) -> dict:
    for f in infers.values():
        f(x)
    got: dict[str, list[float]] = {k: [] for k in infers}
    for _ in range(rounds):
        for k, f in infers.items():
            t = time.perf_counter()
            for _ in range(steps):
                f(x)
            got[k].append(steps * len(x) / (time.perf_counter() - t))
    return {k: float(np.median(v)) for k, v in got.items()}


def main() -> None:
    ap = bench_parser(__doc__, "~5-10 min on the idle machine for the three default sets (estimate, not timed "
                               "as a whole: docs/engines.md's run was under load 13-16, where everything takes "
                               "~10x longer)")
    ap.add_argument("--sets", nargs="+", default=["simpsons_dev", "flower_photos", "hymenoptera"])
    ap.add_argument("--base", type=Path, default=Path("/work/bench_base"))
    ap.add_argument("--calib", type=int, default=128, help="training images the int8 ranges are calibrated on")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None, help="append one JSON line per set here")
    args = ap.parse_args()

    import tempfile

    import keras

    from pipeline.backbones.build import build_backbone
    from pipeline.models.heads import load_model
    from pipeline.runtime.converters import to_onnx

    params = parse_params(bench_params())
    bb = resolve(params.backbone)
    size = bb.size
    flags = cpu_flags()
    has_bf16 = cpu_has_bf16()
    load = idle_check("precision_bench")
    print(f"CPU {cpu_name()}, {len(os.sched_getaffinity(0))} cores, bf16: {has_bf16}, vnni: "
          f"{'avx512_vnni' in flags or 'avx_vnni' in flags}; backbone {bb.name} {size}px; load "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    keras.mixed_precision.set_global_policy("float32")
    backbone = build_backbone(bb)
    fp32_onnx = to_onnx(backbone, size)
    work = Path(tempfile.mkdtemp(prefix="precision-bench-"))
    speed_done = False
    for name in args.sets:
        run = args.base / "runs" / name
        if not (run / "manifest.csv").is_file():
            print(f"{name}: no {run}/manifest.csv, skipped", flush=True)
            continue
        classes = read_json(run / "classes.json")["classes"]
        index = {c: i for i, c in enumerate(classes)}
        items = read_manifest(run / "manifest.csv")
        t0 = time.perf_counter()
        split = {s: [it for it in items if it.split == s] for s in ("train", "val", "test")}
        pixels = {s: decode([str(SHARED_DATASETS / name / it.path) for it in rows], size) for s, rows in split.items()}
        labels = {s: np.array([index[it.label] for it in rows]) for s, rows in split.items()}
        rng = np.random.default_rng(0)
        calib = pixels["train"][np.sort(rng.choice(len(pixels["train"]), min(args.calib, len(pixels["train"])),
                                                   replace=False))]
        print(f"{name}: {sum(len(v) for v in pixels.values())} images decoded in {time.perf_counter() - t0:.0f}s",
              flush=True)
        modes = {"fp32": session_infer(onnx_session(fp32_onnx))}
        for mode, keep in (("int8", False), ("int8-keep", True)):
            d = work / f"{name}-{mode}"
            d.mkdir()
            modes[mode] = session_infer(onnx_session(quantize(fp32_onnx, calib, keep, d)))
        modes["tf-fp32"] = tf_infer(backbone, size)
        if has_bf16:
            modes["bf16"] = tf_infer(bf16_clone(backbone), size)
        result: dict = {"set": name, "cpu": cpu_name(), "load": round(os.getloadavg()[0], 1), "head": {},
                        "finetuned": {}}
        if not speed_done:
            s = speeds(modes, pixels["test"][:32], args.rounds)
            result["img_per_s"] = s
            print("  compute-only img/s: " + ", ".join(f"{k} {v:.1f}" for k, v in s.items()), flush=True)
            print(f"  ratios: int8 {s['int8'] / s['fp32']:.2f}x, int8-keep {s['int8-keep'] / s['fp32']:.2f}x fp32 "
                  f"(ORT); tf-fp32 {s['tf-fp32'] / s['fp32']:.2f}x fp32 (ORT)"
                  + (f"; bf16 {s['bf16'] / s['tf-fp32']:.2f}x tf-fp32, {s['bf16'] / s['fp32']:.2f}x fp32 (ORT)"
                     if "bf16" in s else ""), flush=True)
            speed_done = True
        for mode, infer in modes.items():
            if mode == "tf-fp32":  # features within 1e-5 of fp32's: its speed is what bf16 is measured against
                continue
            feats = {s: run_batches(infer, x) for s, x in pixels.items()}
            ref = None if mode == "fp32" else result["head"]["fp32"]
            m = head_metrics((feats["train"], labels["train"]), {s: (feats[s], labels[s]) for s in ("test",)},
                             params.seed, params.head.logreg.C)
            result["head"][mode] = m
            drop = "" if ref is None else f"  Δacc {100 * (m['acc'] - ref['acc']):+.2f} pts"
            print(f"  head {mode:<10} test acc {m['acc']:.4f} loss {m['loss']:.4f}{drop}", flush=True)
        if (run / "model.keras").is_file():
            model, _ = load_model(run / "model.keras")
            ft_onnx = to_onnx(model, size, output_name="probabilities")
            ft = {"fp32": session_infer(onnx_session(ft_onnx))}
            for mode, keep in (("int8", False), ("int8-keep", True)):
                d = work / f"{name}-ft-{mode}"
                d.mkdir()
                ft[mode] = session_infer(onnx_session(quantize(ft_onnx, calib, keep, d)))
            if has_bf16:
                ft["bf16"] = tf_infer(bf16_clone(model), size)
            ref_p = run_batches(ft["fp32"], pixels["test"])
            for mode, infer in ft.items():
                if mode == "tf-fp32":
                    continue
                p = ref_p if mode == "fp32" else run_batches(infer, pixels["test"])
                m = prob_metrics(p, labels["test"], ref_p)
                result["finetuned"][mode] = m
                print(f"  fine-tuned {mode:<10} test acc {m['acc']:.4f} loss {m['loss']:.4f} top-1 agreement "
                      f"{m['agree']:.4f} max |Δp| {m['max_dp']:.3f}", flush=True)
        else:
            print(f"  {name}: no fine-tuned model in {run}", flush=True)
        if args.out:
            with open(args.out, "a") as fh:
                fh.write(json.dumps(result) + "\n")
    load.finish()


if __name__ == "__main__":
    main()
