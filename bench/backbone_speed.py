"""CPU speed of every registered backbone, side by side in one process (interleaved rounds, medians).

    python bench/backbone_speed.py                                   # every backbone in the registry
    python bench/backbone_speed.py --names efficientnet_lite0 efficientnet_lite1 efficientnet_lite2

Each backbone is built as the stages build it (``pipeline.backbones.build.build_backbone``) at its native size
with random weights (``backbone.weights: none``: no download needed; dense CPU arithmetic does not depend on the
values, unless they reach the subnormal range, which is slow on x86: each backbone's outputs are checked for
subnormal values, and a warning names any backbone that has them), then timed on random uint8 images:

- **extract**: the backbone on ONNX Runtime (extract's CPU engine), batches of ``extract.batch_size``: images/s;
- **fine-tune bottom**: the frozen part below ``finetune.unfreeze_from: auto`` on ONNX Runtime, run once per
  view of each training image: images/s;
- **fine-tune top**: one training step of the part above the boundary + a dense head (BN folded, the recipe's
  optimizer, ``finetune.batch_size``) on activations of that shape: images/s;
- **fine-tune, new view**: ``1 / (1/bottom + 1/top)``: training images per second of an epoch whose view is not
  cached yet (the first epochs); an epoch on a cached view runs at the top's rate.

Every figure is also printed as a ratio to ``efficientnet_lite0`` measured side by side: Lite0 stays built and
each other backbone is built in turn (all at once would not fit in 24 GiB), timed in rounds alternating with Lite0
(the order swapping each round), then freed. One JSON line per run is appended to ``--out``.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import logging
import statistics
import time
from pathlib import Path

import numpy as np
from benchlib import ROOT, bench_parser, cpu_name, idle_check

from pipeline.backbones.build import build_backbone, count_params, get_base
from pipeline.backbones.registry import REGISTRY, image_size
from pipeline.core.io import setup_logging
from pipeline.core.params import Params, load_params
from pipeline.finetuning.cut import cut_at
from pipeline.finetuning.recipe import compile_top, fold_bn_scale, unfreeze_from
from pipeline.models.heads import build_head
from pipeline.runtime.engines import compile_onnx

REFERENCE = "efficientnet_lite0"
log = logging.getLogger("backbone_speed")


class Timed:
    """One backbone, built once: its ONNX engines and its compiled top, ready to time."""

    def __init__(self, name: str, params: Params):
        bp = dataclasses.replace(params.backbone, name=name, weights="none", image_size=None)
        self.name, self.size = name, image_size(bp)
        backbone = build_backbone(bp)
        base = get_base(backbone)
        self.params = count_params(base.weights)
        self.extract = compile_onnx(backbone, self.size)
        head = build_head(int(backbone.output.shape[-1]), 5)
        boundary = REGISTRY[name].unfreeze_from
        unfreeze_from(base, boundary, name)
        fold_bn_scale(base)
        cut = cut_at(backbone, head, boundary)
        self.bottom = compile_onnx(cut.bottom, self.size)
        self.top = cut.top
        compile_top(self.top, params.finetune, steps_per_epoch=100, replicas=1)
        rng = np.random.default_rng(0)
        self.images = rng.integers(0, 256, (params.extract.batch_size, self.size, self.size, 3), dtype=np.uint8)
        bs = params.finetune.batch_size
        self.acts = rng.standard_normal((bs, *cut.activation_shape)).astype(np.float32)
        self.labels = rng.integers(0, 5, bs)
        outputs = [self.extract(self.images), self.bottom(self.images)]  # warm-up: first calls allocate
        self.top.train_on_batch(self.acts, self.labels)
        tiny = [float(np.mean((o != 0) & (np.abs(o) < np.finfo(np.float32).tiny))) for o in outputs]
        if not all(np.isfinite(o).all() for o in outputs) or max(tiny) > 0:
            log.warning("%s: non-finite or subnormal outputs (subnormal share: extract %.2g, bottom %.2g): "
                        "its speed figures may not be what trained weights give", name, *tiny)

    def rates(self, seconds: float) -> dict[str, float]:
        """Images per second of each part, each timed for about ``seconds``."""
        extract = _rate(lambda: self.extract(self.images), len(self.images), seconds)
        bottom = _rate(lambda: self.bottom(self.images), len(self.images), seconds)
        top = _rate(lambda: self.top.train_on_batch(self.acts, self.labels), len(self.acts), seconds)
        return {"extract": extract, "bottom": bottom, "top": top, "new_view": 1 / (1 / bottom + 1 / top)}


def _rate(call, n: int, seconds: float) -> float:
    done, t0 = 0, time.perf_counter()
    while True:
        call()
        done += n
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return done / elapsed


def main(argv: list[str] | None = None) -> None:
    ap = bench_parser(__doc__, "~1-1.5 min a backbone with --rounds 3 --seconds 1 (building, two ONNX conversions, "
                               "then 2 x rounds x 3 parts x --seconds), ~25-30 min for all 23. Memory grows ~1 GB a "
                               "backbone (TensorFlow keeps some of each graph): with 24 GiB, split the list over "
                               "2-3 runs with --names (each run times its own Lite0)")
    ap.add_argument("--names", nargs="+", default=list(REGISTRY), choices=list(REGISTRY), metavar="NAME")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=3.0, help="time per part per round")
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--out", type=Path, default=ROOT / ".cache" / "backbone_speed.jsonl")
    args = ap.parse_args(argv)
    setup_logging()
    params = load_params(args.params)
    names = [REFERENCE] + [n for n in args.names if n != REFERENCE]
    parts = ("extract", "bottom", "top", "new_view")
    medians, ratios, sizes, weights = {}, {}, {}, {}
    with idle_check("backbone_speed"):
        ref = Timed(REFERENCE, params)
        for n in names:
            other = ref if n == REFERENCE else Timed(n, params)
            mine, theirs = [], []
            for r in range(args.rounds):  # side by side with Lite0, the order swapping each round
                pair = (other, ref) if r % 2 == 0 else (ref, other)
                got = {t.name: t.rates(args.seconds) for t in pair}
                mine.append(got[n])
                theirs.append(got[REFERENCE] if n != REFERENCE else got[n])
            medians[n] = {p: statistics.median(m[p] for m in mine) for p in parts}
            ratios[n] = {p: statistics.median(m[p] / t[p] for m, t in zip(mine, theirs)) for p in parts}
            sizes[n], weights[n] = other.size, other.params
            print(f"{n}: " + ", ".join(f"{p} {medians[n][p]:.1f} img/s (×{ratios[n][p]:.2f})" for p in parts),
                  flush=True)
            del other
            gc.collect()
    print(f"\nCPU: {cpu_name()}; native sizes, random weights, extract batch {params.extract.batch_size}, "
          f"fine-tune batch {params.finetune.batch_size}; img/s (× {REFERENCE}, median of {args.rounds} rounds)")
    print("| backbone | size | weights | extract | fine-tune bottom | fine-tune top | fine-tune, new view |")
    print("|---|---|---|---|---|---|---|")
    for n in names:
        cells = " | ".join(f"{medians[n][p]:.0f} (×{ratios[n][p]:.2f})" for p in parts)
        print(f"| `{n}` | {sizes[n]} | {weights[n] / 1e6:.1f} M | {cells} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps({"cpu": cpu_name(), "rounds": args.rounds, "seconds": args.seconds,
                            "extract_batch": params.extract.batch_size, "finetune_batch": params.finetune.batch_size,
                            "sizes": sizes, "weights": weights,
                            "medians": medians, "ratios": ratios}) + "\n")


if __name__ == "__main__":
    main()
