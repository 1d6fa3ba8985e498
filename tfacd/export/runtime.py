"""Running TFLite files: LiteRT's interpreter, batched inference, the op histogram.

`run_tflite` feeds raw pixels in the file's input type and returns float logits (dequantized
when the output is integer). XNNPACK (LiteRT's default delegate) is applied unless
`delegates=False`, which runs TFLite's builtin kernels.
"""

from __future__ import annotations

import collections

import numpy as np

from tfacd.export._common import _content


def interpreter(model_path_or_bytes, num_threads: int | None = None,
                delegates: bool = True):
    """A LiteRT interpreter for a file (path) or flatbuffer (bytes). `delegates=False` runs
    TFLite's builtin kernels only (no XNNPACK)."""
    # pylint: disable-next=import-outside-toplevel
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    resolver = OpResolverType.AUTO if delegates else \
        OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    return Interpreter(model_content=_content(model_path_or_bytes), num_threads=num_threads,
                       experimental_op_resolver_type=resolver)


def run_tflite(model_path_or_bytes, pixels, batch_size: int = 64,
               num_threads: int | None = None, delegates: bool = True) -> np.ndarray:
    """Float logits of a tfacd-exported file on raw pixels `[N, H, W, C]` (0-255);
    `delegates=False` runs TFLite's builtin kernels only (no XNNPACK)."""
    pixels = np.asarray(pixels)
    runner = interpreter(model_path_or_bytes, num_threads, delegates)
    detail = runner.get_input_details()[0]
    signature = detail["shape_signature"]
    fixed_batch = int(signature[0]) if signature[0] > 0 else None
    outputs, start, shape = [], 0, None
    while start < len(pixels):
        chunk = pixels[start:start + (fixed_batch or batch_size)]
        start += len(chunk)
        real = len(chunk)
        if fixed_batch and real < fixed_batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], fixed_batch - real, 0)])
        if shape != chunk.shape:
            if not fixed_batch:
                runner.resize_tensor_input(detail["index"], chunk.shape)
            runner.allocate_tensors()
            shape = chunk.shape
        runner.set_tensor(detail["index"], _to_input(chunk, runner.get_input_details()[0]))
        runner.invoke()
        out = runner.get_output_details()[0]
        outputs.append(_from_output(runner.get_tensor(out["index"]), out)[:real])
    return np.concatenate(outputs) if outputs else np.zeros((0,), np.float32)


def _to_input(x, detail):
    dtype = detail["dtype"]
    if dtype == np.float32:
        return x.astype(np.float32)
    scale, zero_point = detail["quantization"]
    info = np.iinfo(dtype)
    return np.clip(np.round(x / scale + zero_point), info.min, info.max).astype(dtype)


def _from_output(y, detail):
    if detail["dtype"] == np.float32:
        return y
    scale, zero_point = detail["quantization"]
    return (y.astype(np.float32) - zero_point) * scale


def op_histogram(model_path_or_bytes) -> dict:
    """`{op name: count}` of a TFLite file (delegates not applied)."""
    runner = interpreter(model_path_or_bytes, delegates=False)
    details = runner._get_ops_details()  # pylint: disable=protected-access
    return dict(collections.Counter(op["op_name"] for op in details))
