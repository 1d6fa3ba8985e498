"""Where a run's TFLite file departs from its Keras model: Keras vs the baked TensorFlow
graph (before conversion) vs the LiteRT interpreter (XNNPACK and reference kernels).

    python scripts/export_diff.py --model_dir=RUN [--count=300]

Prints, on the first `count` validation images of the run's split, the top-1 agreement and
largest logit difference of each pair, and each one's top-1 accuracy. A difference between
Keras and the baked graph is the bake's (or float rounding's); one between the baked graph
and the interpreter is the converter's or the kernels'.

One more row measures how much agreement any export can hope for: "keras perturbed" is the
same Keras model with every BatchNorm gamma multiplied by `1 + perturbation` (default 1e-6,
the size of the float32 rounding differences that folding BatchNorm or reordering a sum
makes). A low-bit model whose rounding decisions flip under that is chaotic: no export that
does not reproduce Keras's float arithmetic bit for bit can agree with it better.

`--layers` adds, for every quantized activation in graph order, the fraction of its values
that differ between Keras and the baked graph by more than a tenth of that tensor's
quantization step (a rounding decision that went the other way), and the largest
difference in steps: the first layer with flips is where the two part.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _layer_differences(model, normalized, pixels, splits, args):
    """Prints, per quantized activation, how many values Keras and the baked graph round
    differently."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    from tfacd import export  # pylint: disable=import-outside-toplevel
    from tfacd._keras import keras  # pylint: disable=import-outside-toplevel
    tapped = export.bake(model, splits.mean, splits.std, args.activation_policy, taps=True)
    baked = tapped.function(tf.constant(pixels))
    plans = {plan.name: plan for plan in tapped.activations}
    names = [layer.name for layer in model.layers if layer.name in plans]
    keras_outputs = keras.Model(model.inputs, [model.get_layer(n).output for n in names])(
        normalized, training=False)
    print("layer, values rounded differently (> 0.1 step), largest difference in steps")
    for name, keras_value in zip(names, keras_outputs):
        plan = plans[name]
        step = np.reshape((plan.upper - plan.lower) / (2 ** plan.bits - 1), -1)
        difference = np.abs(keras_value.numpy() - baked[name].numpy()) / np.maximum(step, 1e-12)
        print(f"  {name:40s} {np.mean(difference > 0.1):8.5f} {difference.max():8.2f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--activation_policy", default="clamp")
    parser.add_argument("--perturbation", type=float, default=1e-6,
                        help="relative change of every BatchNorm gamma for the "
                             "'keras perturbed' row")
    parser.add_argument("--layers", action="store_true",
                        help="per quantized activation: where Keras and the baked graph differ")
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
    gammas = [w for w in model.weights if w.name.split("/")[-1].startswith("gamma")]
    originals = [w.numpy() for w in gammas]
    for weight, value in zip(gammas, originals):
        weight.assign(value * (1.0 + args.perturbation))
    logits["keras perturbed"] = model(normalized, training=False).numpy()
    for weight, value in zip(gammas, originals):
        weight.assign(value)
    print(f"perturbed {len(gammas)} BatchNorm gammas by a factor 1 + {args.perturbation:g}")
    baked = export.bake(model, splits.mean, splits.std, args.activation_policy)
    logits["baked graph"] = baked.function(tf.constant(pixels)).numpy()
    content = export.convert._convert(baked, "uint8")  # pylint: disable=protected-access
    for name, delegates in (("tflite xnnpack", True), ("tflite reference", False)):
        runner = export.interpreter(content, delegates=delegates)
        detail = runner.get_input_details()[0]
        runner.resize_tensor_input(detail["index"], pixels.shape)
        runner.allocate_tensors()
        runner.set_tensor(detail["index"],
                          export.runtime._to_input(pixels, runner.get_input_details()[0]))  # pylint: disable=protected-access
        runner.invoke()
        out = runner.get_output_details()[0]
        logits[name] = export.runtime._from_output(runner.get_tensor(out["index"]), out)  # pylint: disable=protected-access
    if args.layers:
        _layer_differences(model, normalized, pixels, splits, args)
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
