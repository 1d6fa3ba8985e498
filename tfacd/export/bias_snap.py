"""The bias snap: the Keras model moved onto the file's int32 bias grid.

TFLite stores each bias as int32 with the scale `s_in * s_w`; the rounding to that grid is
the one place where a file may compute other numbers than its Keras model. `snap_biases_to_file`
reads the file's integers and moves each layer's bias, or its folded BatchNorm's beta, onto
them (half a grid step at most, about one where an int32 exceeds 2^24: the converter divides
in float32). Guarantee: afterwards the Keras model adds exactly what the file adds; it checks
every layer against the file before changing any, so another model's file changes nothing.
"""

from __future__ import annotations

import numpy as np

from tfacd.export._common import ExportError, _content
from tfacd.export.flatbuffer import _flatbuffer, _layer_for_tensor, _tensor_name, _weight_ops
from tfacd.export.weights import _bake_weights, _batch_norm_folds, _bn_multiplier_and_shift, _inner


def snap_biases_to_file(qat_model, tflite, residues=None) -> dict:
    """Moves `qat_model`'s biases onto the int32 grid the file `tflite` stores them on, so
    the Keras model computes what the file computes. Changes `qat_model` in place; the file
    is unchanged (exporting the snapped model again gives the same integers).

    TFLite keeps each weight layer's (BN-folded) bias as an int32 `b_c` with the scale
    `s_in s_c`, the product of the input's and the channel's weight steps, so the file adds
    `b_c s_in s_c` where Keras adds its float bias `beta_c`: a difference of up to
    `s_in s_c / 2` per channel. Small, but a 2-bit model's rounding decisions move under
    relative changes of 1e-5 (docs/export.md), and after a few layers a quarter of the
    values differ. Here each channel's difference is added to the Keras layer's bias, or to
    the beta of the BatchNormalization folded into it: `beta_c <- beta_c + (b_c s_in s_c -
    bias_c)`. Keras then adds exactly what the file adds.

    `residues`: `{layer name: (modulus, residue)}` per output channel: that layer's biases go
    to the nearest integer `≡ residue (mod modulus)` instead of the file's own (portable
    requantization, `tfacd.export.portable`; exporting again then stores those integers).

    Returns `{layer name: largest change in units of that layer's bias grid}`: at most 0.5
    (plus float32 rounding) where the file's integer is the rounded bias. The converter
    divides in float32, so an int32 beyond 2^24 can be a unit or two further off (measured
    up to 1.007 on a depthwise layer with a tiny input step, `clamp` policy); the snap reads
    the file's integer either way.
    Raises `ExportError` for a file that does not belong to the model.
    """
    content = _content(tflite)
    model = _flatbuffer(content)
    names = [layer.name for layer in qat_model.layers]
    folded = _batch_norm_folds(qat_model)
    shifts, moves = {}, []
    for _, filter_tensor, bias_tensor, _ in _weight_ops(model):
        name = _layer_for_tensor(_tensor_name(filter_tensor), names)
        if name is None or bias_tensor is None:
            continue                              # the input normalization: not a layer
        data = model.buffers[bias_tensor.buffer].data
        scales = bias_tensor.quantization.scale if bias_tensor.quantization else None
        if data is None or scales is None or len(scales) == 0:
            continue                              # a float bias: nothing to snap
        layer = qat_model.get_layer(name)
        grid = np.asarray(scales, np.float64)
        integers = np.frombuffer(bytes(data), np.int32).astype(np.float64)
        current = _bake_weights(layer, folded.get(name), True).bias.astype(np.float64)
        if residues and name in residues:
            modulus, residue = (np.asarray(v, np.float64) for v in residues[name])
            integers = residue + modulus * np.round((current / grid - residue) / modulus)
        file_bias = integers * grid
        if current.shape != file_bias.shape:
            raise ExportError(f"{name}: the file's bias has {file_bias.size} channels, the "
                              f"model's {current.size}: the file is not this model's export")
        delta = file_bias - current
        bn = folded.get(name)
        change = delta
        if bn is not None and _inner(bn).center:
            variable = _inner(bn).beta
        elif _inner(layer).use_bias:
            variable = _inner(layer).bias
            if bn is not None:                    # folded bias = bias * multiplier + shift
                multiplier, _ = _bn_multiplier_and_shift(bn, current.size)
                if np.any((multiplier == 0) & (delta != 0)):
                    raise ExportError(f"{name}: a channel with BatchNormalization gamma 0 "
                                      "has a bias that cannot be snapped")
                change = np.divide(delta, multiplier, out=np.zeros_like(delta),
                                   where=multiplier != 0)
        elif np.any(delta):
            raise ExportError(f"{name}: no bias or BatchNormalization beta to snap")
        else:
            continue
        moves.append((variable, change))
        shifts[name] = float(np.max(np.abs(delta) / grid)) if delta.size else 0.0
    # Only once every layer has been checked: a file that is not this model's export raises
    # above and leaves the model as it was.
    for variable, change in moves:
        variable.assign((variable.numpy().astype(np.float64) + change).astype(np.float32))
    return shifts
