"""Grouping benchmark: what prepare's near-copy groups change on real sets, and what the search costs.

    python bench/grouping_bench.py [--datasets simpsons_dev flower_photos hymenoptera dogs_vs_cats]
                                   [--sizes 10000 100000 1000000]

sets: prepare's real scan (decode check + pHash + groups + split, pipeline.prepare.scan) of each
  ../shared/datasets/<name> in place, with params.yaml's data section, once with
  data.group_hash_bits at its default and once at -1 (off). Per set: near-copy pairs (pHash within
  the default bits), how many of them lie across splits without and with groups, the groups, the
  largest, and the images that follow their group's split instead of their own; plus pairs within
  0..8 bits (where a default could sit) and the seconds of each scan.
cost: the group search alone (pipeline.data.near_copies: multi-index candidates + connected
  components) on N hashes, at each --sizes N. The hashes are real pHashes of the shared sets with
  8-24 random bits flipped (the bias of real hashes kept: their bits are not uniform, which makes
  the chunk buckets fuller than random hashes would), plus 1 % planted near-copies. Also the pHash
  itself per image (the decode is prepare's anyway), from 224-px decoded images.
"""
from __future__ import annotations

import time

import numpy as np
from benchlib import SHARED_DATASETS, bench_params, bench_parser, cpu_name, idle_check

from pipeline.core.params import parse_params
from pipeline.data.images import load_image
from pipeline.data.near_copies import DEFAULT_BITS, components, from_hex, near_copy_edges, near_pairs, phash
from pipeline.data.scanning import image_files
from pipeline.prepare import scan

DEFAULT_DATASETS = ("simpsons_dev", "flower_photos", "hymenoptera", "dogs_vs_cats")


def _cross(items, bits: int) -> tuple[int, int]:
    """(near-copy pairs within ``bits``, those whose two images are in different splits)."""
    pairs = near_pairs(from_hex([it.phash for it in items]), bits)
    return len(pairs), sum(items[i].split != items[j].split for i, j in pairs)


def sets(names: list[str]) -> list[dict]:
    rows = []
    for name in names:
        raw = SHARED_DATASETS / name
        if not raw.is_dir():
            print(f"{name}: not in {SHARED_DATASETS}, skipped")
            continue
        row = {"set": name}
        for label, bits in (("off", -1), ("on", DEFAULT_BITS)):
            params = parse_params(bench_params(raw, [f"data.group_hash_bits={bits}"])).data
            t = time.perf_counter()
            found = scan(raw, params)
            row[f"s_{label}"] = time.perf_counter() - t
            row[f"pairs_{label}"], row[f"cross_{label}"] = _cross(found.items, DEFAULT_BITS)
            if label == "on":
                row.update(images=len(found.items), groups=found.grouping.n_groups, largest=found.grouping.largest,
                           moved=found.moved_by_groups)
                h = from_hex([it.phash for it in found.items])
                row["pairs_by_bits"] = [len(near_pairs(h, k)) for k in range(9)]
        rows.append(row)
        print(f"{name}: {row['images']} images; {row['pairs_on']} near-copy pairs within {DEFAULT_BITS} bits, "
              f"across splits {row['cross_off']} without groups -> {row['cross_on']} with; {row['groups']} groups, "
              f"largest {row['largest']}, {row['moved']} images follow their group; pairs within 0..8 bits "
              f"{row['pairs_by_bits']}; scan {row['s_off']:.1f} s off / {row['s_on']:.1f} s on", flush=True)
    return rows


def _realistic_hashes(n: int, pool: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    base = pool[rng.integers(0, len(pool), n)]
    flips = np.zeros(n, np.uint64)
    for i, k in enumerate(rng.integers(8, 25, n)):
        for b in rng.choice(64, size=k, replace=False):
            flips[i] |= np.uint64(1) << np.uint64(int(b))
    h = base ^ flips
    near = rng.choice(n, size=n // 100, replace=False)  # planted near-copies of other images
    h[near] = h[rng.integers(0, n, len(near))] ^ (np.uint64(1) << rng.integers(0, 64, len(near)).astype(np.uint64))
    return h


def cost(sizes: list[int], names: list[str]) -> None:
    rng = np.random.default_rng(0)
    files = [f for name in names if (SHARED_DATASETS / name).is_dir() for f in image_files(SHARED_DATASETS / name)]
    sample = files[:: max(1, len(files) // 400)][:400]
    decoded = [load_image(f, 224) for f in sample]
    t = time.perf_counter()
    pool = np.array([phash(img) for img in decoded], np.uint64)
    per_image = (time.perf_counter() - t) / len(decoded)
    print(f"pHash of a 224-px decoded image: {per_image * 1e3:.2f} ms ({len(decoded)} images)")
    for n in sizes:
        h = _realistic_hashes(n, pool, rng)
        t = time.perf_counter()
        edges = near_copy_edges(h, DEFAULT_BITS)
        labels = components(n, edges)
        dt = time.perf_counter() - t
        sizes_ = np.bincount(labels)
        print(f"N = {n:>9,}: group search {dt:7.2f} s ({len(edges):,} edges, {int((sizes_ > 1).sum()):,} groups, "
              f"largest {int(sizes_.max())}); all pairs would be {n * (n - 1) // 2:,} comparisons", flush=True)


def main() -> None:
    ap = bench_parser(__doc__, "~2 min for the four shared sets (two prepare scans each, 2 cores) and ~1 min for "
                               "the cost at 10k, 100k and 1M hashes")
    ap.add_argument("--datasets", nargs="+", default=list(DEFAULT_DATASETS))
    ap.add_argument("--sizes", nargs="+", type=int, default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--skip-sets", action="store_true", help="only the cost of the search")
    args = ap.parse_args()
    print(f"CPU: {cpu_name()}")
    with idle_check("grouping_bench"):
        if not args.skip_sets:
            sets(args.datasets)
        cost(args.sizes, args.datasets)


if __name__ == "__main__":
    main()
