"""Ships a float run as the pretrained checkpoint the main job starts from.

    python scripts/ship_pretrained.py --model_dir=RUNS/c10_float

Writes `tfacd/pretrained/mobilenet_v2_cifar10_w<width>/`: `weights.*` (a TF checkpoint of the
model's weights only, no optimizer state) and `README.md` with its provenance: the command
and config that trained it, its validation top-1 (from the run's results.json) and the
epochs' curve.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tfacd import config as config_lib  # noqa: E402  pylint: disable=wrong-import-position
from tfacd import train  # noqa: E402  pylint: disable=wrong-import-position


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model_dir", required=True, help="a finished float run")
    parser.add_argument("--output", default="", help="default: tfacd/pretrained/<name>")
    args = parser.parse_args(argv)
    run = pathlib.Path(args.model_dir)
    saved = train._saved_config(run)  # pylint: disable=protected-access
    if saved is None or saved.mode != "float":
        print(f"error: {run} holds no finished float run (results.json)", file=sys.stderr)
        return 2
    results = json.loads((run / train.RESULTS).read_text())
    import numpy as np  # pylint: disable=import-outside-toplevel
    from tfacd import data as data_lib  # pylint: disable=import-outside-toplevel
    # Only the shapes matter for rebuilding the model: 10 classes of 32x32x3 images.
    splits = data_lib.Splits(np.zeros((1, 32, 32, 3), np.uint8), np.zeros(1, np.int64),
                             np.zeros((0, 32, 32, 3), np.uint8), np.zeros(0, np.int64),
                             None, None, [str(i) for i in range(10)],
                             np.zeros(3, np.float32), np.ones(3, np.float32))
    try:
        model = train.model_of_run(str(run), saved, splits, "--model_dir")
    except config_lib.ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    name = f"mobilenet_v2_cifar10_w{saved.width:g}"
    output = pathlib.Path(args.output or REPO / "tfacd" / "pretrained" / name)
    output.mkdir(parents=True, exist_ok=True)
    for stale in output.glob("weights.*"):
        stale.unlink()
    model.save_weights(str(output / "weights"))
    (output / "checkpoint").unlink(missing_ok=True)
    curve = ", ".join(f"{100 * e['val_accuracy']:.1f}" for e in results.get("epochs", []))
    hours = (results.get("train_seconds_total") or results.get("train_seconds") or 0) / 3600
    config = {k: v for k, v in results["config"].items()
              if k not in ("model_dir", "dataset", "data_dir", "overwrite")}
    (output / "README.md").write_text(
        f"# {name}: float MobileNetV2-CIFAR, CIFAR-10\n\n"
        f"The float model tfacd's CIFAR-10 results and `make train` start from. Validation "
        f"top-1 **{100 * results['val_accuracy']:.2f}%** on the fixed validation split (5,000 "
        "images: `tfacd.data.stratified_split`, fraction 0.1, seed 0), which it never "
        "trained on.\n\n"
        "Trained on the other 45,000 CIFAR-10 training images (a JPEG re-encode of the "
        "dataset, read as an image folder) by\n\n"
        "    python train_main.py --config=configs/cifar10_float.yaml "
        "--dataset=CIFAR10_FOLDER --model_dir=runs/c10_float\n\n"
        f"in {hours:.2f} hours on 2 CPU cores, and shipped by\n\n"
        "    python scripts/ship_pretrained.py --model_dir=runs/c10_float\n\n"
        "`weights.*` is a TF checkpoint of the model's weights (no optimizer state); load it "
        "with `--init_from=tfacd/pretrained/" + name + "/weights` or "
        "`model.load_weights(...)` on `tfacd.mobilenet_v2_cifar(width="
        f"{saved.width:g}, num_classes=10)`.\n\n"
        f"Validation top-1 after each epoch (%): {curve}.\n\n"
        f"Config: `{json.dumps(config, sort_keys=True)}`\n")
    size = sum(f.stat().st_size for f in output.glob("weights.*"))
    print(f"{output}: {size:,} bytes of weights, val top-1 {results['val_accuracy']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
