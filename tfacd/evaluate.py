"""Top-1 of any exported `model.tflite` on an image-folder split, without TensorFlow training code.

    python -m tfacd.evaluate --tflite results/RUN/model.tflite --data ../shared/data/cifar10-jpeg

The folder is read as in training (`ROOT/train/<class>/*`, optional `ROOT/test/`), and the
validation split is carved out of `train` the same way (`--val_fraction`, `--split_seed`; the
defaults are the training defaults), so `--split=val` scores exactly the images a run reported
on. `--data` may also be `cifar10` / `cifar100` (tensorflow-datasets). The file takes raw
pixels; nothing but the file and the images is needed.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tfacd.evaluate",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--tflite", required=True, help="the exported .tflite file")
    parser.add_argument("--data", required=True,
                        help="image folder (ROOT/train/<class>/...) or cifar10/cifar100")
    parser.add_argument("--data_dir", default="", help="tensorflow-datasets data_dir")
    parser.add_argument("--split", default="val", choices=("val", "train", "test"))
    parser.add_argument("--val_fraction", type=float, default=0.1)
    parser.add_argument("--split_seed", type=int, default=0,
                        help="the training run's split_seed (which images are validation)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--limit", type=int, default=0, help="score only the first N images")
    parser.add_argument("--runtime", default="xnnpack",
                        help="xnnpack (LiteRT's default), builtin (LiteRT's builtin kernels) "
                             "or micro (TensorFlow Lite Micro, one image at a time)")
    parser.add_argument("--compare_to", default="",
                        help="also run this runtime and print the top-1 agreement of the two")
    args = parser.parse_args(argv)

    import numpy as np  # pylint: disable=import-outside-toplevel
    from tfacd import data as data_lib  # pylint: disable=import-outside-toplevel
    from tfacd import export  # pylint: disable=import-outside-toplevel
    try:
        if not os.path.isfile(args.tflite):
            raise export.ExportError(f"TFLite file not found: {args.tflite}")
        splits = data_lib.load(args.data, args.data_dir or None, args.val_fraction,
                               args.split_seed)
        x = {"val": splits.x_val, "train": splits.x_train, "test": splits.x_test}[args.split]
        y = {"val": splits.y_val, "train": splits.y_train, "test": splits.y_test}[args.split]
        if x is None or not len(x):
            raise data_lib.DataError(f"{args.data} has no {args.split} split")
        if args.limit:
            x, y = x[:args.limit], y[:args.limit]
        for runtime in filter(None, (args.runtime, args.compare_to)):
            if runtime not in export.RUNTIMES:
                raise export.ExportError(f"--runtime must be one of {export.RUNTIMES}, "
                                         f"got {runtime!r}")
        support = export.runtime_support(args.tflite)[args.runtime]
        if not support["runs"]:
            raise export.ExportError(f"{args.tflite} cannot run on {args.runtime}: "
                                     f"{support['why']}")
        logits = export.run_tflite(args.tflite, x.astype("float32"), args.batch_size,
                                   runtime=args.runtime)
        other = (export.run_tflite(args.tflite, x.astype("float32"), args.batch_size,
                                   runtime=args.compare_to) if args.compare_to else None)
    except (data_lib.DataError, export.ExportError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    top1 = float(np.mean(logits.argmax(axis=1) == np.asarray(y).reshape(-1)))
    print(f"top-1 {top1:.4f} on {len(x)} {args.split} images of {args.data} ({args.tflite}, "
          f"{args.runtime})")
    if other is not None:
        agreement = float(np.mean(logits.argmax(axis=1) == other.argmax(axis=1)))
        other_top1 = float(np.mean(other.argmax(axis=1) == np.asarray(y).reshape(-1)))
        print(f"top-1 agreement with {args.compare_to}: {agreement:.4f} ({args.compare_to} "
              f"top-1 {other_top1:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
