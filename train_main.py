"""tfacd experiments from the command line.

    python train_main.py --config=configs/cifar10_float.yaml --model_dir=runs/float
    python train_main.py --config=configs/cifar10_w2a2_per_channel_acd_sqnr.yaml \\
        --init_from=runs/float --model_dir=runs/w2a2_acd_sqnr

`--config` sets an experiment from YAML; any flag given on the command line overrides it.
Every flag is a field of `tfacd.config.ExperimentConfig` (see there for meanings). Bad input
(an unknown dataset, a missing folder, a corrupt image, bits out of range, an unknown YAML key,
an --init_from that is missing or does not fit the model) prints one line naming the problem
and exits with status 2.
"""

import os
import sys

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402

from tfacd import cli  # noqa: E402

cli.define_flags()
build_config = cli.build_config


def main(argv):
    if len(argv) > 1:
        print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
        return 2
    from tfacd import train  # pylint: disable=import-outside-toplevel
    configs = []

    def work():
        configs.append(build_config())
        return train.run(configs[0])

    results, status = cli.guarded(work)
    if status:
        return status
    summary = {k: results.get(k) for k in ("val_accuracy", "test_accuracy", "mean_sqnr_db",
                                           "train_seconds", "images_per_second")}
    if results.get("tflite"):
        summary["tflite_accuracy"] = results["tflite"].get("accuracy")
        summary["tflite_top1_agreement"] = results["tflite"].get("top1_agreement")
    print(f"results: {summary} -> {os.path.join(configs[0].model_dir, train.RESULTS)}")
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
