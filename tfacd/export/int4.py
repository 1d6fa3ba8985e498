"""int4 weight storage through FULLY_CONNECTED.

`pack_int4_weights` stores the filters of Dense layers and 1x1 stride-1 Conv2Ds whose
integers fit `[-8, 7]` as packed int4 and writes each such Conv2D as a FULLY_CONNECTED over
the channel axis, because XNNPACK runs int4 filters only there (an int4 CONV_2D falls back to
builtin kernels, which round differently). Guarantee: the same integer values as the int8
file, half their bytes; the file's outputs equal the int8 file's bit for bit.
"""

from __future__ import annotations

import collections

import numpy as np

from tfacd._keras import keras
from tfacd.export._common import _INT4_MAX, _INT4_MIN, _content
from tfacd.export.flatbuffer import (
    _drop_unused_operator_codes, _flatbuffer, _operator_code, _schema, _serialize,
    _weight_op_entries)


def _pack_int4(values: np.ndarray) -> np.ndarray:
    """int4 values, two per byte, the first in the low nibble (TFLite's packing)."""
    flat = np.asarray(values, np.int8).reshape(-1)
    if flat.size % 2:
        flat = np.append(flat, np.int8(0))
    nibbles = flat.astype(np.uint8) & 0x0F
    return nibbles[0::2] | (nibbles[1::2] << 4)


def _unpack_int4(packed, count: int) -> np.ndarray:
    raw = np.frombuffer(bytes(packed), np.uint8)
    nibbles = np.stack([raw & 0x0F, raw >> 4], axis=1).reshape(-1)[:count].astype(np.int8)
    return np.where(nibbles > _INT4_MAX, nibbles - 16, nibbles).astype(np.int8)


def _runs_int4_exactly(inner) -> bool:
    """Whether the file can hold `inner`'s filter as int4 and still compute what Keras does:
    a Dense layer, or a 1x1 stride-1 Conv2D (`pack_int4_weights` writes it as a
    FULLY_CONNECTED). XNNPACK, LiteRT's default CPU path, runs int4 filters only in
    FULLY_CONNECTED; an int4 CONV_2D or DEPTHWISE_CONV_2D falls back to TFLite's builtin
    kernels, whose requantization rounds differently (measured: the int4 file of a trained
    2-bit run agreed with Keras on 35% of images, docs/export.md)."""
    if isinstance(inner, keras.layers.Dense):
        return True
    return (type(inner) is keras.layers.Conv2D  # pylint: disable=unidiomatic-typecheck
            and tuple(inner.kernel_size) == (1, 1) and tuple(inner.strides) == (1, 1)
            and getattr(inner, "groups", 1) == 1)


# The FULLY_CONNECTED version for int8 inputs with int4 filters (TFLite's op_version.cc).
_FULLY_CONNECTED_INT4_VERSION = 10


def pack_int4_weights(model_path_or_bytes) -> tuple[bytes, int]:
    """Stores every FULLY_CONNECTED filter, and every 1x1 stride-1 CONV_2D filter, whose values
    all lie in int4's `[-8, 7]` as a packed int4 tensor (half the bytes, same values, same
    scales). Such a CONV_2D becomes a FULLY_CONNECTED with `keep_num_dims` over the channel
    axis: the same arithmetic (its `[out, 1, 1, in]` filter is the `[out, in]` matrix),
    and the op XNNPACK runs with int4 filters; measured bit-equal to the int8 CONV_2D with
    XNNPACK and with the builtin kernels. DEPTHWISE_CONV_2D and larger CONV_2D filters stay
    int8 (`_runs_int4_exactly`).

    The converter (TF 2.21) writes int8 filters whatever the fake-quant's bits. Returns the
    new flatbuffer and the number of tensors packed.
    """
    model = _flatbuffer(_content(model_path_or_bytes))
    schema = _schema()
    users = collections.Counter(t.buffer for sg in model.subgraphs for t in sg.tensors)
    int4_code = None
    packed = 0
    for subgraph, op, name in _weight_op_entries(model):
        tensor = subgraph.tensors[op.inputs[1]]
        buffer = model.buffers[tensor.buffer]
        if tensor.type != schema.TensorType.INT8 or buffer.data is None or \
                users[tensor.buffer] != 1:
            continue
        if name == "CONV_2D":
            options = op.builtinOptions
            if list(tensor.shape[1:3]) != [1, 1] or (options.strideH, options.strideW) != \
                    (1, 1):
                continue
        elif name != "FULLY_CONNECTED":
            continue
        values = np.frombuffer(bytes(buffer.data), np.int8)
        if not values.size or values.min() < _INT4_MIN or values.max() > _INT4_MAX:
            continue
        if int4_code is None:
            int4_code = _operator_code(model, schema.BuiltinOperator.FULLY_CONNECTED,
                                       _FULLY_CONNECTED_INT4_VERSION)
        if name == "CONV_2D":
            fully_connected = schema.FullyConnectedOptionsT()
            fully_connected.fusedActivationFunction = op.builtinOptions.fusedActivationFunction
            fully_connected.keepNumDims = True
            op.builtinOptionsType = schema.BuiltinOptions.FullyConnectedOptions
            op.builtinOptions = fully_connected
            tensor.shape = np.array([tensor.shape[0], tensor.shape[3]], np.int32)
        op.opcodeIndex = int4_code
        buffer.data = _pack_int4(values)
        tensor.type = schema.TensorType.INT4
        packed += 1
    _drop_unused_operator_codes(model)
    return _serialize(model), packed
