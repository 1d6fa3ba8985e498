"""A run exported with `requantization="float"` and `"portable"`, side by side: agreement
with the Keras model on XNNPACK and on the builtin (fixed-point) kernels.

    python scripts/diagnostics/portable_export.py --model_dir=RUN [--count=2000] \\
        [--out=RUN/portable_check]

Rebuilds the run's model for each export (the portable one changes the model), scores both
files on the first `count` images of the run's validation split and prints, per export,
the top-1 agreement and the Keras / XNNPACK / builtin accuracies, and for the portable one
the accuracy of the model as it came and the largest weight-step change.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tfacd import export, train  # noqa: E402  pylint: disable=wrong-import-position


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    run = pathlib.Path(args.model_dir)
    out = pathlib.Path(args.out) if args.out else run / "portable_check"
    out.mkdir(parents=True, exist_ok=True)
    for mode in export.REQUANTIZATIONS:
        model, splits, _ = train._rebuild(run, "--model_dir")  # pylint: disable=protected-access
        pixels, labels = train.scoring_split(splits)
        export.export_tflite(model, out / f"{mode}.tflite", input_mean=splits.mean,
                             input_std=splits.std, input_type="uint8",
                             data=pixels[:args.count], labels=labels[:args.count],
                             verbose=False, check_runtimes=("xnnpack", "builtin"),
                             requantization=mode, float_reference=False)
        report = json.loads((out / f"{mode}_report.json").read_text())
        runtimes = report["fidelity_by_runtime"]
        line = (f"{mode:9s} agreement xnnpack {runtimes['xnnpack']['top1_agreement']:.2%} "
                f"builtin {runtimes['builtin']['top1_agreement']:.2%}; top-1 Keras "
                f"{runtimes['xnnpack']['keras_accuracy']:.2%} xnnpack "
                f"{runtimes['xnnpack']['tflite_accuracy']:.2%} builtin "
                f"{runtimes['builtin']['tflite_accuracy']:.2%}")
        if "portable" in report:
            line += (f"; model as it came {report['fidelity_before_portable']['keras_accuracy']:.2%}"
                     f", largest step change {report['portable']['largest_weight_step_change']:.1%}"
                     f", layers {report['portable']['layers']}, not reached "
                     f"{sorted(report['portable']['skipped'])}")
        print(line, flush=True)


if __name__ == "__main__":
    main()
