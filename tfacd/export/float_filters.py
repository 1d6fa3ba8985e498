"""Float convolutions' filters stored as the int8 integers they hold.

Under the `float` activation policy the convolutions that read per-channel activations run
in float, and the converter stores their filters as float32. `store_float_filters_as_int8`
rewrites each one as int8 integers (per-channel scale = the layer's step, zero point 0)
behind a per-channel DEQUANTIZE. Guarantee: the dequantized filter equals the float filter
exactly; a filter not on the layer's grid is refused with an `ExportError` naming it.
"""

from __future__ import annotations

import collections

import numpy as np

from tfacd.export._common import ExportError, _INT8_MAX, _content
from tfacd.export.bake import Bake
from tfacd.export.flatbuffer import (
    _flatbuffer, _layer_for_tensor, _operator_code, _schema, _serialize, _tensor_name,
    _weight_op_entries)


# The DEQUANTIZE version for per-channel int8 inputs (TFLite's op_version.cc).
_DEQUANTIZE_PER_CHANNEL_VERSION = 5


# Filter axis of the output channels, as TFLite lays filters out: CONV_2D [out, kh, kw, in],
# DEPTHWISE_CONV_2D [1, kh, kw, out], FULLY_CONNECTED [out, in].
_FILTER_CHANNEL_AXIS = {"CONV_2D": 0, "DEPTHWISE_CONV_2D": 3, "FULLY_CONNECTED": 0}


def store_float_filters_as_int8(model_path_or_bytes, baked: Bake) -> tuple[bytes, int]:
    """Stores the float32 filter of every weight op that runs in float (its input is a float
    tensor, e.g. under `activation_policy="float"`) as the int8 integers it holds, with the
    layer's per-channel steps as scales and zero point 0, and a `DEQUANTIZE` in front of the
    op: the same float32 values (`DEQUANTIZE` computes `s_c m`, the product the filter
    holds), a quarter of the bytes.

    The converter (TF 2.21) writes a weight fake-quant that feeds a float op as the float32
    values it computes, and none of its QDQ modes keeps int8 filters in front of float ops
    (docs/export.md). XNNPACK turns a constant
    filter's `DEQUANTIZE` into float weights once, when the delegate is built.

    Only layers `baked` quantized are touched (their integers and steps are known); each
    filter is checked against them, and a filter that is not `m s_c` on the layer's grid
    (the converter folded something into it) raises `ExportError`. Returns the new
    flatbuffer and the number of filters stored as int8.
    """
    model = _flatbuffer(_content(model_path_or_bytes))
    schema = _schema()
    users = collections.Counter(t.buffer for sg in model.subgraphs for t in sg.tensors)
    layer_names = list(baked.weights)
    code = None
    dequantize_before = {}                           # id(op) -> the DEQUANTIZE to insert
    for subgraph, op, name in _weight_op_entries(model):
        tensor = subgraph.tensors[op.inputs[1]]
        buffer = model.buffers[tensor.buffer]
        if tensor.type != schema.TensorType.FLOAT32 or buffer.data is None or \
                not len(buffer.data):
            continue
        layer = _layer_for_tensor(_tensor_name(tensor), layer_names)
        weights = baked.weights.get(layer)
        if weights is None or weights.integers is None:
            continue
        shape = [int(d) for d in tensor.shape]
        axis = _FILTER_CHANNEL_AXIS[name]
        values = np.frombuffer(bytes(buffer.data), np.float32).reshape(shape)
        if shape[axis] != weights.step.size:
            raise ExportError(f"{layer}: the file's {name} filter has {shape[axis]} output "
                              f"channels, the layer {weights.step.size}")
        step_shape = [1] * len(shape)
        step_shape[axis] = -1
        step = weights.step.reshape(step_shape)
        units = values / step
        integers = np.round(units)
        if np.max(np.abs(units - integers)) > 1e-3 or np.max(np.abs(integers)) > _INT8_MAX:
            raise ExportError(f"{layer}: the converter changed the float filter of its "
                              f"{name}; it is no longer on the layer's grid")
        if code is None:
            code = _operator_code(model, schema.BuiltinOperator.DEQUANTIZE,
                                  _DEQUANTIZE_PER_CHANNEL_VERSION)
        if users[tensor.buffer] == 1:
            buffer.data = None                       # the float copy goes
        int8_buffer = schema.BufferT()
        int8_buffer.data = np.frombuffer(integers.astype(np.int8).tobytes(), np.uint8)
        model.buffers.append(int8_buffer)
        int8_tensor = schema.TensorT()
        int8_tensor.shape = np.array(shape, np.int32)
        int8_tensor.type = schema.TensorType.INT8
        int8_tensor.buffer = len(model.buffers) - 1
        int8_tensor.name = tensor.name + b"/int8" if isinstance(tensor.name, bytes) \
            else f"{tensor.name}/int8"
        params = schema.QuantizationParametersT()
        params.scale = weights.step.astype(np.float32).tolist()
        params.zeroPoint = [0] * weights.step.size
        params.quantizedDimension = axis
        int8_tensor.quantization = params
        subgraph.tensors.append(int8_tensor)
        # The float filter tensor stays, with no data: DEQUANTIZE's output.
        tensor.buffer = 0
        dequantize = schema.OperatorT()
        dequantize.opcodeIndex = code
        dequantize.inputs = np.array([len(subgraph.tensors) - 1], np.int32)
        dequantize.outputs = np.array([op.inputs[1]], np.int32)
        dequantize_before[id(op)] = dequantize
    for subgraph in model.subgraphs:
        operators = []
        for op in subgraph.operators:
            if id(op) in dequantize_before:
                operators.append(dequantize_before[id(op)])
            operators.append(op)
        subgraph.operators = operators
    return _serialize(model), len(dequantize_before)
