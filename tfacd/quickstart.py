"""The main job: a pretrained float MobileNetV2-CIFAR -> 2-bit QAT -> a TFLite file, in minutes.

    python -m tfacd.quickstart                        # what `make train` runs
    python -m tfacd.quickstart --model_dir=runs/quickstart --steps_per_epoch=20

It starts from the float checkpoint shipped with tfacd (`tfacd/pretrained/`), quantizes it to
W2A2 with the recipe in `configs/quickstart.yaml`, trains a short QAT, re-estimates BatchNorm,
exports the TFLite file, runs it in LiteRT and prints a summary: float, QAT and TFLite
accuracy, the file's agreement with the Keras model, its size against the float file, where
the files are, and the command for the full-budget run.

Data: CIFAR-10 from tensorflow-datasets when it is prepared or can be downloaded (QAT on its
training split, accuracy on its test split). Offline it says so in one line and uses the
real CIFAR-10 sample shipped in `tfacd/samples/cifar10` (3,000 training images from the
split the float model trained on, 1,000 test images it never saw). Any flag of
`train_main.py` overrides the config (`--dataset=FOLDER` to use an image folder).
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

PACKAGE = pathlib.Path(__file__).resolve().parent
PRETRAINED = PACKAGE / "pretrained" / "mobilenet_v2_cifar10_w0.5"
SAMPLE = PACKAGE / "samples" / "cifar10"
REPO = PACKAGE.parent
DEFAULT_CONFIG = REPO / "configs" / "quickstart.yaml"
FULL_RUN = ("python train_main.py --config=configs/cifar10_w2a2_recipe.yaml "
            "--init_from=tfacd/pretrained/mobilenet_v2_cifar10_w0.5/weights "
            "--model_dir=runs/c10_w2a2_recipe")


def choose_dataset(requested: str) -> tuple[str, str]:
    """(dataset for the run, one line saying which data it is). Never a silent fallback."""
    from tfacd import data as data_lib  # pylint: disable=import-outside-toplevel
    if requested != "cifar10":
        return requested, f"data: {requested} (as requested)"
    if data_lib.tfds_prepared("cifar10"):
        return "cifar10", "data: CIFAR-10 from tensorflow-datasets (train / test splits)"
    if data_lib.online():
        return "cifar10", "data: CIFAR-10, downloaded by tensorflow-datasets"
    return str(SAMPLE), ("data: offline, CIFAR-10 cannot be downloaded; using the embedded "
                         "sample of real CIFAR-10 images (tfacd/samples/cifar10: 3,000 "
                         "train, 1,000 test)")


def float_accuracy(config, splits) -> float:
    """The float model `--init_from` holds: its top-1 on the split the QAT model is scored on."""
    from tfacd import data as data_lib  # pylint: disable=import-outside-toplevel
    from tfacd import train  # pylint: disable=import-outside-toplevel
    from tfacd._keras import keras  # pylint: disable=import-outside-toplevel
    model = train.model_of_run(config.init_from, config, splits, "--init_from")
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    x, y = train.scoring_split(splits)
    return float(model.evaluate(data_lib.pipeline(x, y, splits, config.batch_size, False),
                                verbose=0, return_dict=True)["accuracy"])


def summary(results: dict, float_top1: float, data_line: str, model_dir: pathlib.Path,
            seconds: float) -> str:
    tflite = results.get("tflite") or {}
    report = json.loads(pathlib.Path(tflite["report"]).read_text()) if tflite else {}
    float_bytes = report.get("float_file_bytes")
    scored = results.get("val_accuracy")
    if scored is None:
        scored = results.get("test_accuracy")
    config = results["config"]
    lines = [
        "",
        "=" * 78,
        f"tfacd quickstart: W{config['weight_bits']}A{config['activation_bits']} "
        f"MobileNetV2-CIFAR (width {config['width']}) in {seconds / 60:.1f} min",
        f"  {data_line}",
        f"  scored on {tflite.get('num_examples', '?')} images the models never trained on",
        f"  float accuracy          {100 * float_top1:6.2f} %   (shipped checkpoint)",
        f"  QAT accuracy (Keras)    {100 * scored:6.2f} %   after "
        f"{len(results.get('epochs') or [])} x {config['steps_per_epoch']} steps",
    ]
    if tflite and tflite.get("keras_accuracy") is not None:
        # The export moves the model's biases onto the file's int32 grid (the bias snap),
        # and the file computes that model.
        lines.append(f"    biases snapped        {100 * tflite['keras_accuracy']:6.2f} %   "
                     "(the model the file computes)")
    if tflite:
        lines += [
            f"  TFLite accuracy         {100 * tflite['accuracy']:6.2f} %   (LiteRT, XNNPACK)",
            f"  TFLite vs Keras         {100 * tflite['top1_agreement']:6.2f} %   top-1 agreement",
            f"  file size               {tflite['file_bytes']:,} bytes"
            + (f" = {tflite['file_bytes'] / float_bytes:.3f}x the float file "
               f"({float_bytes:,} bytes)" if float_bytes else ""),
            f"  files                   {model_dir}/model.tflite, model_report.json, "
            "results.json",
        ]
    lines += [
        "  A short run on few images is a demonstration, not the result. The full-budget run:",
        f"    {FULL_RUN}",
        "=" * 78,
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    from absl import flags  # pylint: disable=import-outside-toplevel
    from tfacd import cli  # pylint: disable=import-outside-toplevel
    from tfacd import data as data_lib  # pylint: disable=import-outside-toplevel
    from tfacd import train  # pylint: disable=import-outside-toplevel

    cli.define_flags()
    try:
        flags.FLAGS(list(sys.argv if argv is None else argv))
    except flags.Error as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    config = data_line = float_top1 = None

    def work():
        nonlocal config, data_line, float_top1
        config = cli.build_config(str(DEFAULT_CONFIG))
        if not config.init_from:
            config.init_from = str(PRETRAINED / "weights")
        config.dataset, data_line = choose_dataset(config.dataset)
        print(f"[tfacd] {data_line}", flush=True)
        with train.phase("float model: accuracy of the shipped checkpoint"):
            splits = data_lib.load(config.dataset, config.data_dir or None,
                                   config.val_fraction, config.split_seed)
            float_top1 = float_accuracy(config, splits)
        print(f"[tfacd] float accuracy {100 * float_top1:.2f} %", flush=True)
        return train.run(config.validate())

    results, status = cli.guarded(work)
    if status:
        return status
    print(summary(results, float_top1, data_line, pathlib.Path(config.model_dir),
                  time.perf_counter() - start))
    return 0


if __name__ == "__main__":
    sys.exit(main())
