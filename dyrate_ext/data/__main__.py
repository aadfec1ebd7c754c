"""`python -m dyrate_ext.data`: export a split of the procedural captions in COCO format.

    python -m dyrate_ext.data --split test --style dense --n 200 --out data/test_dense
    # -> data/test_dense/images/<id>.png and data/test_dense/annotations.json

The folder is what `python -m dyrate_ext.evaluate --data` and `load_coco` read.
"""

from __future__ import annotations

import argparse
import sys

from .captions import STYLES
from .dataset import DEFAULT_SIZES, export_coco, load_split


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    ap = argparse.ArgumentParser(prog="python -m dyrate_ext.data", description=__doc__)
    ap.add_argument("--split", choices=tuple(DEFAULT_SIZES), default="test")
    ap.add_argument("--style", choices=STYLES, default="redundant")
    ap.add_argument("--n", type=int, help="images (default: the split's size)")
    ap.add_argument("--image-size", type=int, default=112)
    ap.add_argument("--out", required=True, help="output folder")
    args = ap.parse_args(argv)
    samples = load_split(args.split, args.n, args.style, image_size=args.image_size)
    path = export_coco(samples, args.out, progress=True)
    print(f"wrote {len(samples)} images and {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
