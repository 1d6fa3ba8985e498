"""Reading and re-serializing TFLite flatbuffers.

`_serialize` writes a model back with every equal scale and zero-point vector stored once (a
flatbuffer table may point at any vector already written): lossless, the same tensors and
ops, only fewer bytes. The helpers find the weight ops and their filter tensors.
"""

from __future__ import annotations

import numpy as np

from tfacd.export._common import _WEIGHT_OPS


def _flatbuffer(content: bytes):
    """The file as TFLite's flatbuffer object model (`schema_py_generated.ModelT`)."""
    # pylint: disable-next=import-outside-toplevel
    from tensorflow.lite.tools import flatbuffer_utils
    return flatbuffer_utils.read_model_from_bytearray(bytearray(content))


def _serialize(model) -> bytes:
    """The flatbuffer of `model` (schema object API) with every quantization parameter
    vector stored once: tensors whose scales or zero points are equal point at one copy.

    The converter writes a scale (float32) and a zero point (int64) per channel for every
    per-channel weight *and* its bias, each its own vector: 12 bytes a channel, twice. In a
    MobileNetV2 most of those channels have few weights (a depthwise channel has 9), so the
    parameters were 23% of a 2-bit file (224 kB of 992 kB). The zero points are all 0, and
    a flatbuffer table may point at any vector already written, so one zero vector per
    channel count serves every tensor (TFLite requires as many zero points as scales)."""
    # pylint: disable-next=import-outside-toplevel
    import flatbuffers
    schema = _schema()
    shared = {}

    def vector(kind, values, start, prepend, builder):
        key = (kind, tuple(values))
        if key not in shared:
            start(builder, len(values))
            for value in reversed(values):
                prepend(value)
            shared[key] = builder.EndVector()
        return shared[key]

    class SharedQuantizationParameters(schema.QuantizationParametersT):
        """`QuantizationParametersT.Pack` with scale and zero-point vectors shared."""

        def Pack(self, builder):  # pylint: disable=invalid-name  (flatbuffers' name)
            if self.details is not None:                   # custom quantization: as is
                return super().Pack(builder)
            offsets = {}
            if self.scale is not None:
                offsets["scale"] = vector(
                    "scale", [float(v) for v in np.asarray(self.scale, np.float32)],
                    schema.QuantizationParametersStartScaleVector, builder.PrependFloat32,
                    builder)
            if self.zeroPoint is not None:
                offsets["zero_point"] = vector(
                    "zero_point", [int(v) for v in self.zeroPoint],
                    schema.QuantizationParametersStartZeroPointVector, builder.PrependInt64,
                    builder)
            for name in ("min", "max"):
                values = getattr(self, name)
                if values is not None:
                    offsets[name] = builder.CreateNumpyVector(np.asarray(values, np.float32))
            schema.QuantizationParametersStart(builder)
            for name, add in (("min", schema.QuantizationParametersAddMin),
                              ("max", schema.QuantizationParametersAddMax),
                              ("scale", schema.QuantizationParametersAddScale),
                              ("zero_point", schema.QuantizationParametersAddZeroPoint)):
                if name in offsets:
                    add(builder, offsets[name])
            schema.QuantizationParametersAddDetailsType(builder, self.detailsType)
            schema.QuantizationParametersAddQuantizedDimension(builder,
                                                               self.quantizedDimension)
            return schema.QuantizationParametersEnd(builder)

    params = [tensor.quantization for subgraph in model.subgraphs
              for tensor in subgraph.tensors if tensor.quantization is not None]
    for entry in params:
        entry.__class__ = SharedQuantizationParameters
    try:
        builder = flatbuffers.Builder(1024)
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    finally:                                    # `model` is the caller's: leave it as it was
        for entry in params:
            entry.__class__ = schema.QuantizationParametersT
    return bytes(builder.Output())


def _compact(content: bytes) -> bytes:
    """`content` re-serialized with its quantization vectors shared (`_serialize`): the same
    model, byte for byte the same tensors, fewer bytes."""
    return _serialize(_flatbuffer(content))


def _schema():
    # pylint: disable-next=import-outside-toplevel
    from tensorflow.lite.python import schema_py_generated as schema
    return schema


def _tensor_types():
    return _schema().TensorType


def _weight_op_entries(model):
    """`(subgraph, op, op name)` of every Conv2D, DepthwiseConv2D and FullyConnected op with
    a filter."""
    for subgraph in model.subgraphs:
        for op in subgraph.operators:
            name = _op_name(model, op)
            if name in _WEIGHT_OPS and len(op.inputs) > 1 and op.inputs[1] >= 0:
                yield subgraph, op, name


def _weight_ops(model):
    """`(op name, stored filter tensor, bias tensor or None, dequantized)` of every Conv2D,
    DepthwiseConv2D and FullyConnected op. A filter computed by a `DEQUANTIZE` of a constant
    (`store_float_filters_as_int8`: the op runs in float) is given as that constant, the
    tensor the file stores, with `dequantized` True."""
    dequantized = {}                     # (subgraph, output tensor) -> DEQUANTIZE's input
    for subgraph in model.subgraphs:
        for op in subgraph.operators:
            if _op_name(model, op) == "DEQUANTIZE" and \
                    model.buffers[subgraph.tensors[op.inputs[0]].buffer].data is not None:
                dequantized[id(subgraph), int(op.outputs[0])] = int(op.inputs[0])
    for subgraph, op, name in _weight_op_entries(model):
        bias = subgraph.tensors[op.inputs[2]] \
            if len(op.inputs) > 2 and op.inputs[2] >= 0 else None
        stored = dequantized.get((id(subgraph), int(op.inputs[1])), int(op.inputs[1]))
        yield name, subgraph.tensors[stored], bias, stored != int(op.inputs[1])


def _tensor_name(tensor) -> str:
    return tensor.name.decode() if isinstance(tensor.name, bytes) else str(tensor.name)


def _drop_unused_operator_codes(model):
    """Removes operator codes no operator uses (a rewrite may leave CONV_2D's behind)."""
    used = sorted({op.opcodeIndex for sg in model.subgraphs for op in sg.operators})
    remap = {old: new for new, old in enumerate(used)}
    model.operatorCodes = [model.operatorCodes[i] for i in used]
    for subgraph in model.subgraphs:
        for op in subgraph.operators:
            op.opcodeIndex = remap[op.opcodeIndex]


def _op_name(model, op) -> str:
    # pylint: disable-next=import-outside-toplevel
    from tensorflow.lite.tools import flatbuffer_utils
    return flatbuffer_utils.opcode_to_name(model, op.opcodeIndex)


def _operator_code(model, builtin: int, version: int) -> int:
    """The index of `model`'s operator code for `builtin` at `version`, added if missing."""
    for index, code in enumerate(model.operatorCodes):
        if max(code.builtinCode, code.deprecatedBuiltinCode) == builtin and \
                code.version == version:
            return index
    code = _schema().OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = builtin      # both < 127: the same
    code.version = version
    model.operatorCodes.append(code)
    return len(model.operatorCodes) - 1


def _layer_for_tensor(tensor_name: str, layer_names) -> str | None:
    # The converter names a weight after the ops that made it, prefixed by our name scopes.
    hits = [name for name in layer_names if f"{name}/" in tensor_name]
    return max(hits, key=len) if hits else None
