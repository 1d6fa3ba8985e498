"""Where two TFLite runtimes first compute different numbers in one file.

    python scripts/diagnostics/first_divergence.py --tflite=FILE --data=FOLDER \\
        [--split=test] [--count=3] [--runtime=xnnpack --compare_to=builtin] [--ops=12]

Makes every op's output a model output (so that XNNPACK, which keeps no intermediate
tensors, has to hand them over too), runs `count` images of the folder's split through the
file on both runtimes one at a time, and prints, in graph order, the first `ops` ops whose
outputs differ: how many values differ over the images, and the first few pairs. The
output of a constant's `DEQUANTIZE` (a float filter) is skipped. Exits 2 naming a missing
file, folder or split.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

# pylint: disable=wrong-import-position
from tfacd.data import DataError, load_folder  # noqa: E402
from tfacd.export.flatbuffer import _flatbuffer, _op_name, _serialize  # noqa: E402
from tfacd.export.runtime import RUNTIMES, interpreter  # noqa: E402


def _watched(model):
    """`(op index, op name, output tensor)` of every op except a constant's DEQUANTIZE."""
    subgraph = model.subgraphs[0]
    for index, op in enumerate(subgraph.operators):
        name = _op_name(model, op)
        source = subgraph.tensors[int(op.inputs[0])] if len(op.inputs) else None
        if name == "DEQUANTIZE" and source is not None and \
                model.buffers[source.buffer].data is not None:
            continue
        yield index, name, int(op.outputs[0])


def _outputs(content: bytes, images, runtime: str, tensors) -> list:
    runner = interpreter(content, delegates=runtime == "xnnpack")
    runner.allocate_tensors()
    detail = runner.get_input_details()[0]
    found = []
    for image in images:
        runner.set_tensor(detail["index"], image[None].astype(detail["dtype"]))
        runner.invoke()
        found.append({t: runner.get_tensor(t).copy() for t in tensors})
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tflite", required=True)
    parser.add_argument("--data", required=True, help="image folder (ROOT/<split>/<class>/*)")
    parser.add_argument("--split", default="test", choices=("train", "test"))
    parser.add_argument("--count", type=int, default=3)
    parser.add_argument("--runtime", default="xnnpack", choices=RUNTIMES[:2])
    parser.add_argument("--compare_to", default="builtin", choices=RUNTIMES[:2])
    parser.add_argument("--ops", type=int, default=12)
    args = parser.parse_args()
    path = pathlib.Path(args.tflite)
    if not path.is_file():
        print(f"error: no TFLite file at {path}", file=sys.stderr)
        sys.exit(2)
    try:
        x_train, _, x_test, _, _ = load_folder(args.data)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    images = x_train if args.split == "train" else x_test
    if images is None:
        print(f"error: {args.data} has no {args.split} split", file=sys.stderr)
        sys.exit(2)
    images = np.asarray(images[:args.count])
    model = _flatbuffer(path.read_bytes())
    watched = list(_watched(model))
    model.subgraphs[0].outputs = list(model.subgraphs[0].outputs) + [t for _, _, t in watched]
    content = _serialize(model)
    tensors = [t for _, _, t in watched]
    first = _outputs(content, images, args.runtime, tensors)
    second = _outputs(content, images, args.compare_to, tensors)
    shown = 0
    for index, name, tensor in watched:
        differ = sum(int(np.sum(a[tensor] != b[tensor])) for a, b in zip(first, second))
        if not differ:
            continue
        a, b = first[0][tensor].ravel(), second[0][tensor].ravel()
        where = np.flatnonzero(a != b)[:3]
        print(f"op {index} {name}: {differ} of {first[0][tensor].size * len(images)} values "
              f"differ; {args.runtime} {a[where].tolist()} vs {args.compare_to} "
              f"{b[where].tolist()}")
        shown += 1
        if shown == args.ops:
            break
    if not shown:
        print(f"{args.runtime} and {args.compare_to} compute every op's output alike "
              f"on {len(images)} images")


if __name__ == "__main__":
    main()
