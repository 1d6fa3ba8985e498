"""Where a TFLite file's fixed-point runtimes part from XNNPACK: per int8 convolution, the
outputs whose fixed-point and float requantizations differ (`tfacd.export.requantization`).

    python scripts/diagnostics/requantization.py --tflite=results/RUN/model.tflite \\
        [--data=tfacd/samples/cifar10] [--split=test] [--count=5] [--every=100]

Runs the file on LiteRT's builtin kernels with every tensor kept, on `count` images of the
folder's split (every `every`-th file, class folders in order), recomputes each layer's
accumulators from its int8 inputs, and prints per layer: outputs, how many the builtin
kernels computed as the fixed-point arithmetic does, how many the float one (XNNPACK's)
would round otherwise, and the smallest right shift; then the totals.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np
from PIL import Image

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tfacd.export.requantization import requantization_check  # noqa: E402  pylint: disable=wrong-import-position


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tflite", required=True)
    parser.add_argument("--data", default=str(REPO / "tfacd" / "samples" / "cifar10"))
    parser.add_argument("--split", default="test")
    parser.add_argument("--count", type=int, default=5)
    parser.add_argument("--every", type=int, default=100)
    args = parser.parse_args()
    files = sorted((pathlib.Path(args.data) / args.split).glob("*/*"))[::args.every][:args.count]
    if not files:
        sys.exit(f"error: no images in {pathlib.Path(args.data) / args.split}")
    pixels = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    layers = requantization_check(args.tflite, pixels)
    print(f"{'op':>4s} {'kind':18s} {'outputs':>9s} {'builtin=fixed':>14s} "
          f"{'float differs':>14s} {'shift':>6s}")
    for layer in layers:
        print(f"{layer['op_index']:4d} {layer['op']:18s} {layer['outputs']:9d} "
              f"{layer['builtin_equals_fixed_point']:14d} {layer['float_differs']:14d} "
              f"{layer['right_shift']:6d}")
    total = sum(layer["outputs"] for layer in layers)
    same = sum(layer["builtin_equals_fixed_point"] for layer in layers)
    differ = sum(layer["float_differs"] for layer in layers)
    print(f"{len(files)} images: {total:,} outputs; builtin = fixed point on {same:,}; "
          f"the float requantization differs on {differ:,} ({differ / max(total, 1):.2%})")


if __name__ == "__main__":
    main()
