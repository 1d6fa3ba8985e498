"""Cost of one activation quantizer relative to a ReLU on the same tensor, in one run.

Usage: python benchmarks/quantizer_ops.py [--shape 128 32 32 96]

Times (mean of `--repeats` calls of compiled functions) on one NHWC activation tensor:
a ReLU (one read, one write: the unit of memory traffic), TensorFlow's fused FakeQuant kernels
per tensor and per channel, and tfacd's per-channel forward and forward+backward.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tfacd import ops  # noqa: E402


def timed(fn, repeats):
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    for t in tf.nest.flatten(out):
        t.numpy()
    return (time.perf_counter() - start) / repeats


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", type=int, nargs=4, default=[128, 32, 32, 96])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    x = tf.constant(np.random.default_rng(0).normal(size=args.shape).astype("float32"))
    channels = args.shape[-1]
    lower, upper = tf.Variable(-tf.ones([channels])), tf.Variable(tf.ones([channels]))

    @tf.function
    def forward_backward():
        with tf.GradientTape() as tape:
            tape.watch(x)
            q = ops.fake_quant(x, lower, upper, 2, axis=-1)
        return tape.gradient(q, [x, lower, upper], output_gradients=x)

    cases = {
        "ReLU": tf.function(lambda: tf.nn.relu(x)),
        "TF FakeQuant per tensor (fwd)": tf.function(
            lambda: tf.quantization.fake_quant_with_min_max_vars(x, -1.0, 1.0, num_bits=2)),
        "TF FakeQuant per channel (fwd)": tf.function(
            lambda: tf.quantization.fake_quant_with_min_max_vars_per_channel(
                x, lower, upper, num_bits=2)),
        "tfacd per channel (fwd)": tf.function(
            lambda: ops.quantize_forward(x, lower, upper, 2, axis=-1)),
        "tfacd per channel (fwd+bwd)": forward_backward,
    }
    relu = None
    print(f"tensor {args.shape}, mean of {args.repeats} calls")
    for name, fn in cases.items():
        seconds = timed(fn, args.repeats)
        relu = relu or seconds
        print(f"{name:34s} {seconds * 1e3:8.1f} ms {seconds / relu:6.1f} x ReLU")


if __name__ == "__main__":
    main()
