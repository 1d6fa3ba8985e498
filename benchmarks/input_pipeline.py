"""Input-pipeline throughput next to training throughput, measured in one run.

Usage: python benchmarks/input_pipeline.py [--dataset ../shared/data/cifar10-jpeg] [--width 0.5]

The training pipeline (shuffle, pad-4 random crop, flip, normalize, batch, prefetch) is drained
for `--pipeline_batches` batches on its own; then float MobileNetV2-CIFAR trains for `--steps`
steps on the same pipeline. Target (issue #3): pipeline img/s >= 5x training img/s, so the
input never starves training on 2 cores. Without --dataset, CIFAR-shaped random images are used.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

import tfacd  # noqa: E402
from tfacd import data  # noqa: E402
from tfacd._keras import keras  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="")
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--pipeline_batches", type=int, default=100)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()

    start = time.perf_counter()
    if args.dataset:
        splits = data.load(args.dataset, val_fraction=0.1, seed=0)
    else:
        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, size=(20000, 32, 32, 3), dtype=np.uint8)
        y = rng.integers(0, 10, size=20000)
        splits = data.Splits(x, y, x[:0], y[:0], None, None, [str(i) for i in range(10)],
                             x.reshape(-1, 3).mean(0).astype("float32"),
                             x.reshape(-1, 3).std(0).astype("float32"))
    print(f"loaded {len(splits.x_train)} training images in {time.perf_counter() - start:.1f} s")
    train = data.pipeline(splits.x_train, splits.y_train, splits, args.batch_size, True).repeat()

    iterator = iter(train)
    next(iterator)
    start = time.perf_counter()
    for _ in range(args.pipeline_batches):
        next(iterator)
    pipeline_rate = args.pipeline_batches * args.batch_size / (time.perf_counter() - start)

    model = tfacd.mobilenet_v2_cifar(width=args.width, num_classes=splits.num_classes)
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(train, steps_per_epoch=2, epochs=1, verbose=0)
    start = time.perf_counter()
    model.fit(train, steps_per_epoch=args.steps, epochs=1, verbose=0)
    train_rate = args.steps * args.batch_size / (time.perf_counter() - start)

    print(f"{'input pipeline':30s} {pipeline_rate:10.0f} img/s")
    print(f"{'float training (width %g)' % args.width:30s} {train_rate:10.0f} img/s")
    print(f"{'ratio':30s} {pipeline_rate / train_rate:10.1f} x  (target >= 5x)")


if __name__ == "__main__":
    main()
