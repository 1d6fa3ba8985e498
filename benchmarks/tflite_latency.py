"""Batch-1 latency of an exported int8 tfacd model vs the float TFLite model, in one run.

Usage:
    python benchmarks/tflite_latency.py --model_dir RUN      # a QAT run with model.tflite
    python benchmarks/tflite_latency.py --model_dir RUN --tflite FILE   # another export of it
    python benchmarks/tflite_latency.py                      # a fresh MobileNetV2-CIFAR

Both files are run by the same interpreter with the same settings (`--threads`; `--runtime`:
xnnpack, LiteRT with XNNPACK as users get it by default; builtin, LiteRT's builtin kernels;
micro, the TensorFlow Lite Micro interpreter, single-threaded), on the same random pixels,
alternating rounds so that machine noise hits both alike. Without `--model_dir` the script
quantizes an untrained MobileNetV2-CIFAR (`--width`, W`--bits`A`--bits`, `--granularity`,
`--activation_granularity`, `--symmetric_weights`, `--weight_storage`, calibrated on random
pixels):
latency does not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import tempfile
import time

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

import tfacd  # noqa: E402
from tfacd import export  # noqa: E402


def latency(path, pixels, threads: int, repeats: int, runtime: str = "xnnpack") -> float:
    if runtime == "micro":
        runner = export.micro_interpreter(path)
        detail = export.runtime._micro_detail(runner.get_input_details(0))  # pylint: disable=protected-access
        runner.set_input(export.runtime._to_input(pixels, detail), 0)  # pylint: disable=protected-access
    else:
        runner = export.interpreter(path, num_threads=threads, delegates=runtime == "xnnpack")
        detail = runner.get_input_details()[0]
        runner.resize_tensor_input(detail["index"], pixels.shape)
        runner.allocate_tensors()
        runner.set_tensor(detail["index"], export.runtime._to_input(  # pylint: disable=protected-access
            pixels, runner.get_input_details()[0]))
    for _ in range(5):
        runner.invoke()
    start = time.perf_counter()
    for _ in range(repeats):
        runner.invoke()
    return (time.perf_counter() - start) / repeats


def build_files(args, folder: pathlib.Path):
    if args.model_dir:
        int8 = pathlib.Path(args.tflite) if args.tflite else \
            pathlib.Path(args.model_dir) / "model.tflite"
        if not int8.is_file():
            raise SystemExit(f"error: {int8} not found (run train_main.py --mode=export first)")
        # The float file of the same run: the same weights, unquantized, BN folded.
        from tfacd import train  # pylint: disable=import-outside-toplevel
        model, splits, _ = train._rebuild(  # pylint: disable=protected-access
            pathlib.Path(args.model_dir), "benchmark")
        float_file = export.export_float_tflite(model, folder / "float.tflite",
                                                input_mean=splits.mean, input_std=splits.std)
        return int8, float_file, splits.image_shape
    shape = (32, 32, 3)
    model = tfacd.mobilenet_v2_cifar(width=args.width, num_classes=10, input_shape=shape)
    pixels = np.random.default_rng(0).integers(0, 256, (64, *shape)).astype("float32")
    mean, std = np.full(3, 127.5), np.full(3, 64.0)
    qat = tfacd.quantize_model(model, weight_bits=args.bits, activation_bits=args.bits,
                               granularity=args.granularity,
                               activation_granularity=args.activation_granularity or None,
                               symmetric_weights=args.symmetric_weights)
    tfacd.calibrate(qat, (pixels - mean) / std)
    int8 = export.export_tflite(qat, folder / "int8.tflite", input_mean=mean, input_std=std,
                                input_type="uint8", float_reference=False, verbose=False,
                                weight_storage=args.weight_storage)
    float_file = export.export_float_tflite(model, folder / "float.tflite", input_mean=mean,
                                            input_std=std)
    return int8, float_file, shape


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model_dir", default="")
    parser.add_argument("--tflite", default="",
                        help="with --model_dir: another export of that run than model.tflite "
                             "(e.g. one written with another --activation_policy)")
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--granularity", default="per_channel",
                        choices=("per_channel", "per_layer"))
    parser.add_argument("--activation_granularity", default="",
                        choices=("", "per_channel", "per_layer"),
                        help="the fresh model's activations, when unlike its weights")
    parser.add_argument("--symmetric_weights", action="store_true",
                        help="the fresh model's weights on the symmetric grid (int4 at 4 bits)")
    parser.add_argument("--weight_storage", default="int8", choices=("int8", "int4"),
                        help="weight storage of the fresh model's file (without --model_dir)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runtime", default="xnnpack", choices=export.RUNTIMES)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        int8, float_file, shape = build_files(args, pathlib.Path(tmp))
        support = export.runtime_support(int8)[args.runtime]
        if not support["runs"]:
            raise SystemExit(f"error: {int8} cannot run on {args.runtime}: {support['why']}")
        pixels = np.random.default_rng(1).integers(0, 256, (1, *shape)).astype("float32")
        int8_times, float_times = [], []
        for _ in range(args.rounds):
            float_times.append(latency(float_file, pixels, args.threads, args.repeats,
                                       args.runtime))
            int8_times.append(latency(int8, pixels, args.threads, args.repeats, args.runtime))
        int8_bytes = pathlib.Path(int8).read_bytes()
        int8_size, float_size = len(int8_bytes), float_file.stat().st_size
    best_int8, best_float = min(int8_times), min(float_times)
    interpreter = {"xnnpack": "ai_edge_litert, XNNPACK default delegate",
                   "builtin": "ai_edge_litert, builtin kernels",
                   "micro": "TensorFlow Lite Micro"}[args.runtime]
    print(f"interpreter: {interpreter}, {args.threads} thread(s), "
          f"batch 1, best of {args.rounds} rounds x {args.repeats} invokes")
    print(f"float TFLite: {best_float * 1e3:8.3f} ms/image   {float_size:,} bytes")
    # The file's own storage (a run's model.tflite may be an int4 export).
    label = "int4" if export.size_breakdown(int8_bytes)["int4_tensors"] else "int8"
    print(f"{label} TFLite:  {best_int8 * 1e3:8.3f} ms/image   {int8_size:,} bytes")
    weights = export.weight_tensors(int8_bytes)
    in_float = sum(entry["dequantized"] for entry in weights)
    if in_float:
        # The `float` activation policy: those layers keep int8 filters but compute in float.
        print(f"  ({in_float} of {len(weights)} weight layers compute in float on their "
              "int8 filters: per-channel activations, activation_policy='float')")
        label = f"{label}-weight"
    print(f"{label} / float latency: {best_int8 / best_float:.3f}x   "
          f"size: {int8_size / float_size:.3f}x")


if __name__ == "__main__":
    main()
