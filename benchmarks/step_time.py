"""Train-step time of tfacd's QAT variants relative to float, measured side by side in one run.

Usage: python benchmarks/step_time.py [--width 0.5] [--batch_size 128] [--steps 8] [--rounds 2]
       [--components] [--only NAME,NAME]

Each variant is built, compiled and warmed up (tracing + 2 steps); then the variants are timed
round-robin (`--rounds` rounds of `--steps` steps of `model.fit` on one cached batch, callbacks
included), so drift in machine load hits them alike. The best round of each is reported.
Targets: per-channel W2A2 + ClipDecay + SQNR <= 1.3x float and <= tfmot default QAT (issue
#2); with distillation from the float teacher added, <= 1.5x float (issue #19). The last row
adds the rest of the QAT recipe that acts per step, the clips' own learning rate.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_model_optimization as tfmot  # noqa: E402

import tfacd  # noqa: E402
from tfacd import kernels  # noqa: E402
from tfacd._keras import keras  # noqa: E402


XLA_VARIANT = "tfacd per-channel W2A2 + ACD + SQNR, XLA"
DISTILL_VARIANT = "tfacd per-channel W2A2 + ACD + SQNR + distillation"
RECIPE_VARIANT = DISTILL_VARIANT + " + clip lr"


def build_variants(width: float, components: bool = False):
    def base():
        return tfacd.mobilenet_v2_cifar(width=width, num_classes=10)

    def tfacd_variant(**kwargs):
        return lambda: tfacd.quantize_model(base(), **kwargs)

    def distilled():
        student = tfacd.quantize_model(base(), weight_bits=2, activation_bits=2,
                                       sqnr_weight=0.05)
        return tfacd.distill.Distiller(student, base(), weight=0.5, temperature=1.0)

    def constant_decay():
        # A constant schedule: the decay runs on every timed step (a cosine schedule would
        # have reached zero strength after the warm-up fit, and skip it).
        return tfacd.callbacks.ClipDecay(schedule="constant")

    variants = {
        "float": (base, []),
        "tfmot default 8-bit QAT": (lambda: tfmot.quantization.keras.quantize_model(base()), []),
        "tfacd per-layer W2A2": (tfacd_variant(weight_bits=2, activation_bits=2,
                                               granularity="per_layer"), []),
        "tfacd per-channel W2A2": (tfacd_variant(weight_bits=2, activation_bits=2), []),
        "tfacd per-channel W2A2 + ACD + SQNR": (
            tfacd_variant(weight_bits=2, activation_bits=2, sqnr_weight=0.05),
            [constant_decay]),
        # The same model with the quantizers on the XLA functions instead of the C++ kernels
        # (what tfacd falls back to without a compiler; TFACD_KERNELS=xla).
        XLA_VARIANT: (
            tfacd_variant(weight_bits=2, activation_bits=2, sqnr_weight=0.05),
            [constant_decay]),
        # The student trains; the float teacher runs a forward pass in inference mode.
        DISTILL_VARIANT: (distilled, [constant_decay]),
        # ... and the clips' own learning rate (lr / 10) inside the optimizer (see main).
        RECIPE_VARIANT: (distilled, [constant_decay]),
    }
    if components:       # what each addition costs on its own
        variants["tfacd per-channel W2A2 + SQNR loss"] = (
            tfacd_variant(weight_bits=2, activation_bits=2, sqnr_weight=0.05), [])
        variants["tfacd per-channel W2A2 + ClipDecay"] = (
            tfacd_variant(weight_bits=2, activation_bits=2), [constant_decay])
    return variants


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--only", default="", help="comma-separated variant names to run")
    parser.add_argument("--components", action="store_true",
                        help="also time per-channel + SQNR loss and + ClipDecay separately")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.batch_size, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, size=(args.batch_size,))
    data = tf.data.Dataset.from_tensors((x, y)).cache().repeat()

    runs = {}
    for name, (make, callback_types) in build_variants(args.width, args.components).items():
        if args.only and name not in args.only.split(","):
            continue
        start = time.perf_counter()
        # The quantizers' kernels are fixed when the train step is traced (the warm-up fit).
        with kernels.forced("xla" if name == XLA_VARIANT else "auto"):
            model = make()
            if name.startswith("tfacd"):
                tfacd.calibrate(model, x[:32])
            optimizer = keras.optimizers.SGD(0.01, momentum=0.9)
            if name == RECIPE_VARIANT:
                optimizer = tfacd.optimizers.with_clip_learning_rate(optimizer, model,
                                                                     multiplier=0.1)
            model.compile(optimizer=optimizer,
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
            callbacks = [make_callback() for make_callback in callback_types]
            model.fit(data, steps_per_epoch=2, epochs=1, verbose=0, callbacks=callbacks)
        print(f"built+warmed {name} in {time.perf_counter() - start:.0f} s", flush=True)
        runs[name] = (model, callbacks, [])

    for _ in range(args.rounds):
        for name, (model, callbacks, times) in runs.items():
            start = time.perf_counter()
            model.fit(data, steps_per_epoch=args.steps, epochs=1, verbose=0,
                      callbacks=callbacks)
            times.append((time.perf_counter() - start) / args.steps)

    float_time = min(runs["float"][2]) if "float" in runs else None
    print(f"\nMobileNetV2-CIFAR width {args.width}, batch {args.batch_size}, 32x32, "
          f"{args.rounds} rounds x {args.steps} steps, {os.cpu_count()} CPU cores, "
          f"tfacd quantizer kernels: {kernels.backend()}")
    print(f"{'variant':40s} {'s/step':>8s} {'img/s':>8s} {'x float':>8s}")
    for name, (_, _, times) in runs.items():
        best = min(times)
        ratio = f"{best / float_time:8.2f}" if float_time else "     n/a"
        print(f"{name:40s} {best:8.3f} {args.batch_size / best:8.1f} {ratio}")


if __name__ == "__main__":
    main()
