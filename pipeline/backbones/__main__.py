"""``python -m pipeline.backbones NAME``: the values ``finetune.unfreeze_from`` takes for backbone NAME."""
from __future__ import annotations

import argparse

from pipeline.backbones.build import boundary_shares, count_params
from pipeline.backbones.registry import REGISTRY, get_spec


def main(argv: list[str] | None = None) -> None:
    """``python -m pipeline.backbones NAME``: the values ``finetune.unfreeze_from`` takes for backbone NAME."""
    ap = argparse.ArgumentParser(description="List a backbone's block boundaries (the values finetune.unfreeze_from "
                                             "takes) and the share of its weights each one trains")
    ap.add_argument("name", choices=list(REGISTRY))
    args = ap.parse_args(argv)
    spec = get_spec(args.name)
    base = spec.build(None, (spec.default_size, spec.default_size, 3))  # random init: only the shapes matter
    shares = boundary_shares(base, args.name)
    width = max(28, *(len(name) for name, _ in shares))  # ConvNeXt's layer names are long
    print(f"{args.name}: {count_params(base.weights):,} weights; native size {spec.default_size} px, smallest "
          f"{spec.min_size}\n{'finetune.unfreeze_from':{width + 2}s} share of the weights it trains")
    for name, share in shares:
        print(f"  {name:{width}s} {share:6.1%}" + ("   <- auto (the default)" if name == spec.unfreeze_from else ""))


if __name__ == "__main__":
    main()
