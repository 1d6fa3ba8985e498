"""Builds the embedded CIFAR-10 sample (`tfacd/samples/cifar10`) from a CIFAR-10 image folder.

    python scripts/make_sample.py --dataset=../shared/data/cifar10-jpeg

The sample is a small, fixed subset of real CIFAR-10 training images, copied byte for byte,
laid out as an image folder that `--dataset` reads:

* `train/<class>/`: the first `--train_per_class` images of each class in the *training*
  split of `tfacd.data.stratified_split(labels, 0.1, seed=0)`, the split every tfacd float
  and QAT run trains on;
* `test/<class>/`: the first `--test_per_class` images of each class in its *validation*
  split, which no shipped model trained on.

So a model trained on the full training split (the shipped float checkpoint) is evaluated on
the sample's test images fairly. The folder's README.md records how it was made.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import sys


REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tfacd import data as data_lib  # noqa: E402  pylint: disable=wrong-import-position

DEFAULT_OUTPUT = REPO / "tfacd" / "samples" / "cifar10"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", required=True, help="ROOT of ROOT/train/<class>/*.jpg")
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT))
    parser.add_argument("--train_per_class", type=int, default=300)
    parser.add_argument("--test_per_class", type=int, default=100)
    parser.add_argument("--val_fraction", type=float, default=0.1)
    parser.add_argument("--split_seed", type=int, default=0)
    args = parser.parse_args(argv)
    root = pathlib.Path(args.dataset) / "train"
    try:
        paths, labels, names = data_lib._list_split(root, None)  # pylint: disable=protected-access
    except data_lib.DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    train_idx, val_idx = data_lib.stratified_split(labels, args.val_fraction, args.split_seed)
    output = pathlib.Path(args.output)
    if output.exists():
        shutil.rmtree(output)
    counts = {}
    for split, indices, per_class in (("train", train_idx, args.train_per_class),
                                      ("test", val_idx, args.test_per_class)):
        for label, name in enumerate(names):
            members = sorted(i for i in indices if labels[i] == label)[:per_class]
            target = output / split / name
            target.mkdir(parents=True)
            for index in members:
                shutil.copyfile(paths[index], target / paths[index].name)
            counts[split] = counts.get(split, 0) + len(members)
    total = sum(f.stat().st_size for f in output.rglob("*") if f.is_file())
    (output / "README.md").write_text(
        f"# CIFAR-10 sample\n\n{counts['train']:,} training and {counts['test']:,} test "
        f"images of CIFAR-10 (Krizhevsky 2009), {args.train_per_class} and "
        f"{args.test_per_class} per class, JPEG, copied unchanged from a CIFAR-10 training "
        "folder by\n\n"
        f"    python scripts/make_sample.py --dataset=CIFAR10_FOLDER --train_per_class="
        f"{args.train_per_class} --test_per_class={args.test_per_class}\n\n"
        "`train/` holds images of the training split that tfacd's runs train on "
        f"(`tfacd.data.stratified_split`, validation fraction {args.val_fraction}, seed "
        f"{args.split_seed}); `test/` holds images of its validation split, which no shipped "
        "model trained on. Used by `make train` when CIFAR-10 cannot be downloaded.\n")
    print(f"{output}: {counts['train']} train + {counts['test']} test images, "
          f"{total / 1e6:.2f} MB, classes {names}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
