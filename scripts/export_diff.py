"""Where a run's TFLite file departs from its Keras model: Keras vs the baked TensorFlow
graph (before conversion) vs the LiteRT interpreter (XNNPACK and reference kernels).

    python scripts/export_diff.py --model_dir=RUN [--count=300]

Prints, on the first `count` validation images of the run's split, the top-1 agreement and
largest logit difference of each pair, and each one's top-1 accuracy. A difference between
Keras and the baked graph is the bake's (or float rounding's); one between the baked graph
and the interpreter is the converter's or the kernels'.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--activation_policy", default="clamp")
    args = parser.parse_args(argv)
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    from tfacd import export, train  # pylint: disable=import-outside-toplevel
    from tfacd.config import ConfigError  # pylint: disable=import-outside-toplevel
    try:
        model, splits, _ = train._rebuild(pathlib.Path(args.model_dir), "--model_dir")  # pylint: disable=protected-access
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    pixels = splits.x_val[:args.count].astype(np.float32)
    labels = np.asarray(splits.y_val[:args.count]).reshape(-1)
    normalized = ((pixels - splits.mean) / splits.std).astype(np.float32)
    logits = {"keras": model(normalized, training=False).numpy()}
    baked = export.bake(model, splits.mean, splits.std, args.activation_policy)
    logits["baked graph"] = baked.function(tf.constant(pixels)).numpy()
    content = export._convert(baked, "uint8")  # pylint: disable=protected-access
    for name, delegates in (("tflite xnnpack", True), ("tflite reference", False)):
        runner = export.interpreter(content, delegates=delegates)
        detail = runner.get_input_details()[0]
        runner.resize_tensor_input(detail["index"], pixels.shape)
        runner.allocate_tensors()
        runner.set_tensor(detail["index"],
                          export._to_input(pixels, runner.get_input_details()[0]))  # pylint: disable=protected-access
        runner.invoke()
        out = runner.get_output_details()[0]
        logits[name] = export._from_output(runner.get_tensor(out["index"]), out)  # pylint: disable=protected-access
    for name, values in logits.items():
        print(f"{name:18s} top-1 {np.mean(values.argmax(1) == labels):.4f}")
    names = list(logits)
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            a, b = logits[first], logits[second]
            print(f"{first} vs {second}: agreement {np.mean(a.argmax(1) == b.argmax(1)):.4f}, "
                  f"max logit difference {np.abs(a - b).max():.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
