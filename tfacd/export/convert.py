"""Conversion of a baked graph into TFLite bytes.

Runs the TFLite converter on the baked function, then the flatbuffer rewrites every file
gets: float filters stored as int8 (`float` policy) and shared quantization vectors.
"""

from __future__ import annotations

import tensorflow as tf

from tfacd.export._common import ExportError, IO_TYPES
from tfacd.export.bake import Bake
from tfacd.export.flatbuffer import _compact
from tfacd.export.float_filters import store_float_filters_as_int8


def _trackable(function) -> tf.Module:
    """What the converter is told the function belongs to. It saves that object as a
    SavedModel before converting: given the Keras model, it traces every layer's call and
    took ~100 s and 8 GB for a width-0.5 MobileNetV2 (measured); a bare module that holds
    only the variables the function reads (none once every weight is baked in as a
    constant) gives the same bytes in under a second."""
    module = tf.Module()
    module.read_variables = list(function.graph.variables)
    return module


def _convert(baked: Bake, input_type: str = "float32", output_type: str = "float32") -> bytes:
    for name, value in (("input_type", input_type), ("output_type", output_type)):
        if value not in IO_TYPES:
            raise ExportError(f"{name} must be one of {sorted(IO_TYPES)}, got {value!r}")
    converter = tf.lite.TFLiteConverter.from_concrete_functions([baked.function],
                                                                _trackable(baked.function))
    if baked.quantized:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.inference_input_type = IO_TYPES[input_type]
        converter.inference_output_type = IO_TYPES[output_type]
    elif (input_type, output_type) != ("float32", "float32"):
        raise ExportError("a float export has float32 input and output")
    try:
        content = converter.convert()
    except Exception as error:  # the converter raises several unrelated types
        first = str(error).strip().splitlines()
        raise ExportError(f"the TFLite converter refused the baked model: "
                          f"{first[0] if first else type(error).__name__}") from error
    if baked.quantized:
        # Float ops' filters (the `float` policy) as int8 + DEQUANTIZE; none otherwise.
        content, _ = store_float_filters_as_int8(content, baked)
        return content
    return _compact(content)
