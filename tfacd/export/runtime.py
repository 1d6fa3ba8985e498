"""Running TFLite files on three runtimes, what each can run, and the op histogram.

`run_tflite(file, pixels, runtime=...)` feeds raw pixels in the file's input type and returns
float logits (dequantized when the output is integer), on

* `"xnnpack"` (default): LiteRT with its default XNNPACK delegate, what phones mostly run;
* `"builtin"`: LiteRT's builtin kernels without delegates
  (`BUILTIN_WITHOUT_DEFAULT_DELEGATES`), the reference semantics other delegates follow;
* `"micro"`: the TensorFlow Lite Micro interpreter (the `tflite-micro` package), what
  microcontrollers run, one image at a time.

`runtime_support(file)` says, from the file alone, on which runtimes it can run and why not:
a file that would fail or be silently wrong on a device is named at export time instead.
"""

from __future__ import annotations

import collections

import numpy as np

from tfacd.export._common import ExportError, _content

RUNTIMES = ("xnnpack", "builtin", "micro")


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
               num_threads: int | None = None, delegates: bool = True,
               runtime: str | None = None) -> np.ndarray:
    """Float logits of a tfacd-exported file on raw pixels `[N, H, W, C]` (0-255), on
    `runtime` (one of `RUNTIMES`; default "xnnpack", or "builtin" when `delegates=False`)."""
    runtime = runtime or ("xnnpack" if delegates else "builtin")
    if runtime not in RUNTIMES:
        raise ExportError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    pixels = np.asarray(pixels)
    if runtime == "micro":
        return _run_micro(_content(model_path_or_bytes), pixels)
    runner = interpreter(model_path_or_bytes, num_threads, runtime == "xnnpack")
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


def micro_interpreter(model_path_or_bytes):
    """A TensorFlow Lite Micro interpreter for a file (its arena: 10x the file's size)."""
    try:
        from tflite_micro.python.tflite_micro import runtime as micro  # pylint: disable=import-outside-toplevel
    except ImportError:
        raise ExportError("the micro runtime needs the tflite-micro package "
                          "(pip install tflite-micro)") from None
    try:
        return micro.Interpreter.from_bytes(_content(model_path_or_bytes))
    except RuntimeError as error:
        raise ExportError(f"TFLite Micro cannot run this file: {error}") from None


def _micro_detail(detail):
    """TFLite Micro's tensor details in the form `_to_input`/`_from_output` read."""
    parameters = detail["quantization_parameters"]
    scales, zero_points = parameters["scales"], parameters["zero_points"]
    quantization = (float(scales[0]), int(zero_points[0])) if len(scales) else (0.0, 0)
    return {"dtype": detail["dtype"], "quantization": quantization}


def _run_micro(content: bytes, pixels) -> np.ndarray:
    runner = micro_interpreter(content)
    detail = _micro_detail(runner.get_input_details(0))
    out = _micro_detail(runner.get_output_details(0))
    outputs = []
    for image in pixels:
        runner.set_input(_to_input(image[None].astype(np.float32), detail), 0)
        runner.invoke()
        outputs.append(_from_output(runner.get_output(0), out)[0])
    return np.stack(outputs) if outputs else np.zeros((0,), np.float32)


def runtime_support(model_path_or_bytes) -> dict:
    """`{runtime: {"runs": bool, "why": str}}` for every runtime of `RUNTIMES`, read from the
    file: what would make it fail to load, or compute other numbers, on that runtime."""
    from tfacd.export.flatbuffer import _flatbuffer, _schema, _op_name  # pylint: disable=import-outside-toplevel
    model = _flatbuffer(_content(model_path_or_bytes))
    types = _schema().TensorType
    problems = {runtime: [] for runtime in RUNTIMES}
    for subgraph in model.subgraphs:
        for op in subgraph.operators:
            name = _op_name(model, op)
            tensors = [subgraph.tensors[i] for i in op.inputs if i >= 0]
            if name == "FULLY_CONNECTED" and any(t.type == types.INT4 for t in tensors):
                problems["micro"].append(
                    "int4 FULLY_CONNECTED filters (TFLite Micro's FULLY_CONNECTED takes int8 "
                    "inputs with int8 filters only; the file fails to allocate)")
            if name == "DEQUANTIZE" and any(
                    t.quantization is not None and t.quantization.scale is not None
                    and len(t.quantization.scale) > 1 for t in tensors):
                problems["micro"].append(
                    "per-channel DEQUANTIZE (the `float` activation policy's int8-stored "
                    "filters), which TFLite Micro computes wrongly without an error "
                    "(measured: chance-level top-1)")
    return {runtime: {"runs": not found, "why": "; ".join(sorted(set(found)))}
            for runtime, found in problems.items()}


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
