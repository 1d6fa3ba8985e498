"""Cost of one activation quantizer relative to a ReLU on the same tensor, in one run.

Usage: python benchmarks/quantizer_ops.py [--shape 128 32 32 96]

Times (mean of `--repeats` calls of compiled functions) on one NHWC activation tensor:
a ReLU (one read, one write: the unit of memory traffic), TensorFlow's fused FakeQuant kernels
per tensor and per channel, and tfacd's per-channel forward, forward+backward, and
forward+backward with the SQNR statistics, each with the XLA functions and with the C++
kernels (`tfacd.kernels`).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tfacd import kernels, ops  # noqa: E402


def timed(fn, repeats, rounds=3):
    """Best over `rounds` of the mean time of `repeats` calls (after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeats):
            out = fn()
        for t in tf.nest.flatten(out):
            t.numpy()
        best = min(best, (time.perf_counter() - start) / repeats)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", type=int, nargs=4, default=[128, 32, 32, 96])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    x = tf.constant(np.random.default_rng(0).normal(size=args.shape).astype("float32"))
    channels = args.shape[-1]
    lower, upper = tf.Variable(-tf.ones([channels])), tf.Variable(tf.ones([channels]))

    def traced(function, backend):
        """`function` compiled now, with the quantizer kernels of `backend`."""
        function = tf.function(function)
        with kernels.forced(backend):
            function.get_concrete_function()
        return function

    def forward_backward(with_sqnr):
        def run():
            with tf.GradientTape() as tape:
                tape.watch(x)
                q, _, _, sqnr = ops.fake_quant_with_stats(
                    x, lower, upper, 2, axis=-1, sqnr_axis=-1 if with_sqnr else None)
            # Upstream gradients given directly: no loss ops timed besides the quantizer.
            # `q` is returned too, or TensorFlow would prune the forward pass (the backward
            # pass recomputes what it needs from `x`).
            if not with_sqnr:
                return q, tape.gradient(q, [x, lower, upper], output_gradients=x)
            return q, tape.gradient([q, sqnr], [x, lower, upper],
                                    output_gradients=[x, tf.constant(-1.0)])
        return run

    cases = {
        "ReLU": tf.function(lambda: tf.nn.relu(x)),
        "TF FakeQuant per tensor (fwd)": tf.function(
            lambda: tf.quantization.fake_quant_with_min_max_vars(x, -1.0, 1.0, num_bits=2)),
        "TF FakeQuant per channel (fwd)": tf.function(
            lambda: tf.quantization.fake_quant_with_min_max_vars_per_channel(
                x, lower, upper, num_bits=2)),
    }
    backends = ["xla"] + (["cpp"] if kernels.library() is not None else [])
    for backend in backends:
        label = {"xla": "XLA", "cpp": "C++"}[backend]
        cases[f"tfacd per channel, {label} (fwd)"] = traced(
            lambda: ops.quantize_forward(x, lower, upper, 2, axis=-1), backend)
        cases[f"tfacd per channel, {label} (fwd+bwd)"] = traced(forward_backward(False),
                                                                 backend)
        cases[f"tfacd per channel, {label} (fwd+bwd, SQNR)"] = traced(forward_backward(True),
                                                                      backend)
    relu = None
    print(f"tensor {args.shape}, best of 3 means of {args.repeats} calls, "
          f"{os.cpu_count()} CPU cores")
    for name, fn in cases.items():
        seconds = timed(fn, args.repeats)
        relu = relu or seconds
        print(f"{name:40s} {seconds * 1e3:8.1f} ms {seconds / relu:6.1f} x ReLU")
    if "cpp" not in backends:
        print("(C++ kernels unavailable here: XLA rows only)")


if __name__ == "__main__":
    main()
