"""Where two runtimes' top-1 differ on a file whose integer logits they compute alike.

    python scripts/diagnostics/output_ties.py --tflite=FILE --data=FOLDER [--split=test] \\
        [--runtime=builtin] [--compare_to=xnnpack]

Runs the file one image at a time on both runtimes and reads the int8 logits that feed its
final DEQUANTIZE (a file with float32 logits). Prints how many images have equal int8 logits
on both, how many have two or more classes tied at the top, and how many top-1 differences
there are, and of those how many are such ties (a tie's winner then depends on float
rounding in the runtime's DEQUANTIZE).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tfacd import data as data_lib  # noqa: E402  pylint: disable=wrong-import-position
from tfacd.export.runtime import _to_input  # noqa: E402  pylint: disable=wrong-import-position


def _fail(message: str):
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _runner(path: str, runtime: str):
    # pylint: disable-next=import-outside-toplevel
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    resolver = OpResolverType.AUTO if runtime == "xnnpack" else \
        OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    runner = Interpreter(model_path=path, experimental_op_resolver_type=resolver,
                         experimental_preserve_all_tensors=True)
    runner.allocate_tensors()
    output = runner.get_output_details()[0]["index"]
    # The op list keeps the original ops after a delegate took them over.
    for op in runner._get_ops_details():  # pylint: disable=protected-access
        if op["op_name"] == "DEQUANTIZE" and output in op["outputs"]:
            return runner, op["inputs"][0]
    _fail(f"{path} does not end with a DEQUANTIZE (int8 logits already)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tflite", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="test", choices=("val", "train", "test"))
    parser.add_argument("--runtime", default="builtin", choices=("builtin", "xnnpack"))
    parser.add_argument("--compare_to", default="xnnpack", choices=("builtin", "xnnpack"))
    args = parser.parse_args()
    if not pathlib.Path(args.tflite).is_file():
        _fail(f"TFLite file not found: {args.tflite}")
    try:
        splits = data_lib.load(args.data, None, 0.1, 0)
    except data_lib.DataError as error:
        _fail(str(error))
    pixels = {"val": splits.x_val, "train": splits.x_train, "test": splits.x_test}[args.split]
    if pixels is None or not len(pixels):
        _fail(f"{args.data} has no {args.split} split")
    runners = [_runner(args.tflite, r) for r in (args.runtime, args.compare_to)]
    equal = tied = flips = tied_flips = 0
    for image in pixels:
        outputs = []
        for runner, logits_index in runners:
            detail = runner.get_input_details()[0]
            runner.set_tensor(detail["index"], _to_input(image[None].astype("float32"), detail))
            runner.invoke()
            outputs.append((runner.get_tensor(logits_index).copy(),
                            runner.get_tensor(runner.get_output_details()[0]["index"]).copy()))
        (ints, floats), (other_ints, other_floats) = outputs
        equal += np.array_equal(ints, other_ints)
        is_tie = int((ints[0] == ints[0].max()).sum()) > 1
        tied += is_tie
        if floats.argmax() != other_floats.argmax():
            flips += 1
            tied_flips += is_tie
    print(f"{len(pixels)} images: int8 logits equal on {args.runtime} and {args.compare_to} "
          f"on {equal}; a tie at the top on {tied}; top-1 differs on {flips}, of which "
          f"{tied_flips} are ties")


if __name__ == "__main__":
    main()
