"""TFLite export: bake a tfacd QAT model into what TFLite can run, convert, and check it.

The TFLite converter (TF 2.21) turns per-channel weight fake-quant into int8 per-axis weights,
but refuses asymmetric weight zero points, activation fake-quant below 8 bits and per-channel
activation fake-quant. `bake` rewrites the trained model into an equivalent inference graph that
uses only what it accepts; `export_tflite` converts that graph and writes an export report.

What the bake does, and what is exact
------------------------------------
* **Weights (exact).** A k-bit weight channel with nudged clips `l' = -z s`, `u' = (n - z) s`
  holds values `m s`, `m` an integer in `[-z, n - z]`. BatchNormalization after the layer is
  folded in (`w' = w * gamma / sqrt(var + eps)` per output channel, bias likewise), which scales
  the step per output channel and keeps `m`. The folded kernel is emitted as an 8-bit symmetric
  per-channel fake-quant with range `[-127 s', 127 s']`, so TFLite stores exactly `m` as int8
  with scale `s'` and zero point 0. 8-bit weights (256 asymmetric levels would not fit int8's
  symmetric 255) are trained on the int8 grid itself, `s = max(|l|, |u|) / 127`, `m` in
  `[-127, 127]` (`symmetric_step` in `tfacd.ops`). The report counts weights that had to be
  clamped into int8 (`clamped_weights`): 0 by construction, kept as a check.
* **Bias (exact after the snap).** TFLite stores the (folded) bias as int32 with the scale
  `s_in * s'_c`. At 2 bits both steps are coarse, and rounding the bias to that grid moved
  trained models' outputs across rounding boundaries. So each channel's integers are spread
  over int8, `m s' = (K m) (s' / K)` with `K = floor(127 / max |m|)` (42 at 2 bits): the
  same values and the same number of distinct values, with a bias grid `K` times finer. The
  rounding left (at most `s_in s' / (2K)`) is then moved into the Keras model:
  `export_tflite(..., snap_biases=True)` (the default; `snap_biases_to_file`) adds each
  channel's difference to the layer's bias or its folded BatchNorm's beta, so the Keras
  model adds exactly the file's integers. The file does not change; the Keras model's
  accuracy moves by the bias rounding's effect (the report gives it before and after).
* **Weight storage.** int8 by default. `weight_storage="int4"` stores the filters of
  Dense layers and 1x1 stride-1 Conv2Ds (93% of a 2-bit MobileNetV2-CIFAR's weights) as
  packed int4 wherever their integers fit `[-8, 7]` (2- and 3-bit weights, and 4-bit weights
  trained on the symmetric grid, `QuantizeScheme(symmetric_weights=True)`, `[-7, 7]`; an
  asymmetric 4-bit channel only if its grid is `[-8, 7]` exactly), with the spread
  `K = floor(7 / max |m|)` (2 or 3 at 2 bits, 1 at 4 bits). `pack_int4_weights` writes each
  such Conv2D as a FULLY_CONNECTED over the channel axis, because XNNPACK runs int4 filters
  only there; an int4 CONV_2D or DEPTHWISE_CONV_2D falls back to TFLite's builtin kernels,
  which round differently (below), so depthwise and k x k filters stay int8. Same weight
  values, half their bytes, and with the bias snap the same exactness as int8 storage.
* **Shared quantization vectors.** Every file is re-serialized so that equal scale and
  zero-point vectors are stored once (`_serialize`): the zero points are all 0, and the
  converter's one vector per tensor cost 12 bytes per channel twice (weight and bias).
* **Per-tensor activations (exact).** A k-bit activation with clips `[l', u']` and step `s` is
  emitted as 8-bit fake-quant over `[l', l' + 255 s]` (same step, same origin: the zero point is
  the same integer) followed by `minimum(., u')`; `u'` is on the grid, so clamping after
  rounding equals rounding after clamping, and TFLite's int8 tensor holds the k-bit values
  exactly. After a ReLU the lower clip never binds, and the range is `[u' - 255 s, u']`
  instead: int8 saturation is the upper clip, no extra op (XNNPACK does not delegate int8
  `MINIMUM`, and each one splits the delegated graph).
* **Per-channel activations (a policy).** TFLite has one scale per activation tensor, so a
  tensor whose channels have their own k-bit grids cannot be an int8 tensor that holds them.
  `activation_policy` says what the file does instead:

  - `"float"` (the default; exact up to float summation order): the tensor stays float32,
    and each channel is put on its own grid by the forward pass's own float32 ops
    (`_on_channel_grids`: `MAXIMUM`/`SUB`/`MUL`/`ADD`/`FLOOR`/`MINIMUM`/`SUB`/`MUL` with
    `l'`, `1/s`, `z` and `s` per channel; after a ReLU `MUL`/`ADD`/`FLOOR`/`MINIMUM`/`MUL`
    with `1/s` and `s`). The convolutions that read such a tensor run in float, and their
    filters are stored as the int8 integers they hold behind a `DEQUANTIZE`
    (`store_float_filters_as_int8`), so the file keeps int8 filter bytes. The price is
    float compute: on trained width-1.0 MobileNetV2s, 99.70% agreement at W2A2 and W4A4,
    at 1.6x the float file's latency (docs/export.md, "Measured on the shipped
    files").
  - `"clamp"` (all int8): the tensor is quantized to 8 bits over the union of the channels'
    ranges `[min_c l'_c, max_c u'_c]`, and each channel keeps its own clips as per-channel
    `maximum`/`minimum` constants; its k-bit rounding is replaced by the union's 8-bit
    rounding. Approximate: a different function, which at 2 bits trained models do not
    survive (38% top-1 agreement on a trained W2A2 run, docs/export.md).
  - `"round"`: `clamp`, plus each channel rounded to its own k-bit grid in float between a
    `DEQUANTIZE` and a `QUANTIZE` onto the union grid. Values match up to half a union step.

  The export report says, per activation, whether it is exact (`activations`) and, per
  weight layer, whether it computes in integers or in float (`computes_in`).

* **Input (exact).** The file takes raw RGB pixels (0-255) and normalizes them itself, as a
  1x1 depthwise convolution (`(p - mean_c) / std_c`, int8) followed by the model's input
  quantizer. Its int8 weight and int32 bias are searched per channel so that the file's
  integer equals the Keras input quantizer's on all 256 pixel values (`w = 127` with the
  nearest bias put 0.4% of a trained run's input values one step off).

With per-tensor activations, the input normalization and the snapped biases, the file
computes what the Keras model computes: on the trained CIFAR-10 runs the logits of 5,000
validation images were equal bit for bit with XNNPACK (LiteRT's default; docs/export.md).
TFLite's builtin kernels (no XNNPACK) and TFLite Micro are not exact: they requantize in
fixed point with two roundings (`tfacd.export.requantization`), which moves 2-bit rounding
decisions; `requantization="portable"` (`tfacd.export.portable`) makes the 2-4 bit layers
requantize alike everywhere.

The LiteRT interpreter (`ai_edge_litert`) runs the files; `tf.lite.Interpreter` is deprecated.

Modules
-------
One module per responsibility, each with a docstring that says what it guarantees:
`weights` (reading the QAT model, BN folding, weights onto int8), `activations` (activation
policies, input normalization), `bake` (the baked graph), `convert` (the converter),
`flatbuffer` (reading and re-serializing files), `int4` (int4 storage), `float_filters`
(the `float` policy's int8-stored filters), `bias_snap`, `requantization` (the runtimes'
two requantization arithmetics), `portable` (scales every runtime requantizes alike),
`runtime` (LiteRT, TFLite Micro) and `report`.
This package's own functions (`export_tflite`, `export_float_tflite`,
`export_tfmot_tflite`) put them together.

"""

from __future__ import annotations

import json
import pathlib
import warnings

import numpy as np
import tensorflow as tf

from tfacd._keras import keras
from tfacd.export._common import ExportError, REQUANTIZATIONS, _writable
from tfacd.export.bake import bake
from tfacd.export.bias_snap import snap_biases_to_file
from tfacd.export.convert import _convert
from tfacd.export.int4 import pack_int4_weights
from tfacd.export.portable import (apply_portable_scales, check_portable, fixed_point_gaps,
                                   plan_portable)
from tfacd.export.portable import PortablePlan, bias_variables, ratio_variables  # noqa: F401
from tfacd.export.report import (_compare, _json_default, _keras_logits, _mean_std, _report,
                                 format_report)
from tfacd.export.runtime import RUNTIMES, run_tflite, runtime_support
# The rest of the public face (and what tests and scripts reach for).
from tfacd.export._common import ACTIVATION_POLICIES, IO_TYPES, WEIGHT_STORAGES  # noqa: F401
from tfacd.export.requantization import requantization_check  # noqa: F401
from tfacd.export.bake import Bake  # noqa: F401
from tfacd.export.float_filters import store_float_filters_as_int8  # noqa: F401
from tfacd.export.report import fidelity, size_breakdown, weight_tensors  # noqa: F401
from tfacd.export.runtime import interpreter, micro_interpreter, op_histogram  # noqa: F401
from tfacd.export.weights import check_exportable  # noqa: F401


def export_tflite(qat_model, output_path, *, input_mean=None, input_std=None,
                  input_type: str = "float32", output_type: str = "float32",
                  activation_policy: str = "float", data=None, labels=None,
                  batch_size: int | None = None, float_reference: bool = True,
                  report_path=None, verbose: bool = True,
                  weight_storage: str = "int8", snap_biases: bool = True,
                  check_runtimes=("xnnpack",), require_runtimes=(),
                  requantization: str = "float") -> pathlib.Path:
    """Exports a tfacd QAT model to a TFLite file that takes raw RGB pixels.

    Args:
      qat_model: from `tfacd.quantize_model` (trained).
      output_path: the `.tflite` file to write; the report goes beside it as
        `<stem>_report.json` (or to `report_path`).
      input_mean, input_std: per-channel normalization (pixel units) the model was trained
        with; the file applies it itself.
      input_type, output_type: "float32", "int8" or "uint8" model input/output. With int8 or
        uint8 input the caller passes pixels as integers (scale 1, zero point 0 for uint8,
        -128 for int8); `run_tflite` does this, and dequantizes int8 outputs.
      activation_policy: for per-channel activations: "float" (exact; those layers compute
        in float on int8-stored filters), "clamp" or "round" (int8, approximate; module
        docstring).
      data, labels: raw pixels `[N, H, W, C]` (and labels) for the report's fidelity section.
      batch_size: the file's fixed batch size (None: any; resized at run time).
      float_reference: also convert the float model of the same weights, for the size ratio.
      weight_storage: "int8" (default), or "int4": layers whose weights have at most 16
        levels that fit `[-8, 7]` (2- and 3-bit layers; 4-bit ones trained with
        `symmetric_weights=True`) are stored as packed int4, half the bytes, with a coarser
        bias grid (module docstring); the report says which.
      snap_biases: move `qat_model`'s biases (in place) onto the int32 grid the file stores
        them on (`snap_biases_to_file`), so that the model and the file compute the same
        thing; the report's `fidelity` is then against the snapped model, and
        `fidelity_before_bias_snap` against the model as it came. False: leave the model
        as it is.
      check_runtimes: runtimes (`RUNTIMES`: "xnnpack", "builtin", "micro") whose agreement
        with the Keras model on `data` goes into the report's `fidelity_by_runtime`; the
        first is also the report's `fidelity`. Every runtime's support, read from the file,
        is in the report's `runtimes`; a runtime that cannot run the file is named in a
        warning.
      require_runtimes: runtimes the file must run on: `ExportError` (nothing written) if it
        cannot, naming why.

    Returns:
      The path written. Raises `ExportError` naming the problem for a model that was never
      quantized, a path that cannot be written, or anything the converter refuses.
    """
    path = _writable(output_path)
    for runtime in tuple(check_runtimes) + tuple(require_runtimes):
        if runtime not in RUNTIMES:
            raise ExportError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    if requantization not in REQUANTIZATIONS:
        raise ExportError(f"requantization must be one of {REQUANTIZATIONS}, got "
                          f"{requantization!r}")
    if requantization == "portable" and weight_storage == "int4":
        raise ExportError("requantization='portable' needs weight_storage='int8' (int4 leaves "
                          "no room for the weight spread it sets)")
    options = {"input_type": input_type, "output_type": output_type, "snap_biases": snap_biases,
               "requantization": requantization,
               "activation_policy": activation_policy, "weight_storage": weight_storage,
               "input_mean": None if input_mean is None else np.asarray(input_mean).tolist(),
               "input_std": None if input_std is None else np.asarray(input_std).tolist()}
    def bake_and_convert(spreads=None):
        baked = bake(qat_model, input_mean, input_std, activation_policy, True, batch_size,
                     weight_storage=weight_storage, spreads=spreads)
        return baked, _convert(baked, input_type, output_type)

    baked, content = bake_and_convert()
    portable, keras_before = None, None
    if requantization == "portable":
        if data is not None:
            keras_before = _keras_logits(qat_model, data, input_mean, input_std)
        portable, spreads, bias_moves = _onto_portable(
            qat_model, baked, content, lambda spreads: bake_and_convert(spreads)[1])
        baked, content = bake_and_convert(spreads)          # with the biases moved
        check_portable(content, portable, qat_model)
    if weight_storage == "int4":
        content, packed = pack_int4_weights(content)
        if not packed:
            # Not an error: the file is still right, only not smaller (e.g. 4-bit weights on
            # the asymmetric grid, whose integers [-z, 15 - z] leave int4's range).
            warnings.warn("weight_storage='int4' stored no filter as int4: no integer 1x1 "
                          "or Dense layer's integers fit [-8, 7] (4-bit weights need "
                          "QuantizeScheme(symmetric_weights=True); layers that compute in "
                          "float under activation_policy='float' keep int8 filters)",
                          stacklevel=2)
    float_content = None
    if float_reference:
        float_content = _convert(bake(qat_model, input_mean, input_std, activation_policy,
                                      False, batch_size))
    report = _report(qat_model, baked, content, float_content, options)
    report["runtimes"] = runtime_support(content)
    # Whether the fixed-point runtimes compute the file's integers as XNNPACK does, by design.
    gaps = fixed_point_gaps(content, portable, baked)
    for runtime in ("builtin", "micro"):
        report["runtimes"][runtime]["exact"] = not gaps
        report["runtimes"][runtime]["inexact_why"] = "; ".join(gaps)
    if portable is not None:
        report["portable"] = portable.summary()
        # How far the residue snap moved a bias, in units of its layer's int32 bias grid:
        # 0 after training with the biases in place (--portable_in_place).
        report["portable"]["largest_bias_change_in_units"] = max(
            (bias_moves[name] for name in portable.layers), default=0.0)
    unsupported = {r: v["why"] for r, v in report["runtimes"].items() if not v["runs"]}
    required = [r for r in require_runtimes if r in unsupported]
    if required:
        if not path.stat().st_size:     # the empty file `_writable` made: nothing written
            path.unlink()
        raise ExportError("the file would not run correctly on " + "; ".join(
            f"{r}: {unsupported[r]}" for r in required) + " (for TFLite Micro: "
            "weight_storage='int8' and per-tensor activations)")
    for runtime, why in unsupported.items():
        warnings.warn(f"this TFLite file cannot run on {runtime}: {why}", stacklevel=2)
    checked = [r for r in check_runtimes if r not in unsupported]
    lite_logits, by_runtime = None, {}
    if data is not None and checked:
        by_runtime = {r: run_tflite(content, np.asarray(data, np.float32), runtime=r)
                      for r in checked}
        lite_logits = by_runtime[checked[0]]
        if keras_before is not None:
            report["fidelity_before_portable"] = _compare(keras_before, lite_logits, labels)
        if snap_biases:
            report["fidelity_before_bias_snap"] = _compare(
                _keras_logits(qat_model, data, input_mean, input_std), lite_logits, labels)
    if snap_biases:
        shifts = snap_biases_to_file(qat_model, content)
        report["bias_snap"] = {
            "layers": len(shifts),
            "largest_change_in_bias_steps": max(shifts.values(), default=0.0)}
    if lite_logits is not None:
        keras_logits = _keras_logits(qat_model, data, input_mean, input_std)
        report["fidelity_by_runtime"] = {r: _compare(keras_logits, logits, labels)
                                         for r, logits in by_runtime.items()}
        report["fidelity"] = report["fidelity_by_runtime"][checked[0]]
    path.write_bytes(content)
    report["path"] = str(path)
    report_file = pathlib.Path(report_path) if report_path else \
        path.with_name(f"{path.stem}_report.json")
    report_file.write_text(json.dumps(report, indent=2, default=_json_default))
    if verbose:
        print(format_report(report))
    return path


def snap_to_portable(qat_model, *, input_mean=None, input_std=None,
                     activation_policy: str = "float") -> PortablePlan:
    """Moves `qat_model` onto portable requantization in place, as
    `export_tflite(..., requantization="portable")` does before it writes the file: the
    weight steps onto portable ratios and the biases onto their residue classes. Returns the
    plan (`plan.summary()`: layers reached, the ones skipped and why, the largest step
    change). For training with both in place: hold `ratio_variables(qat_model)` and
    `bias_variables(qat_model)` fixed afterwards (`tfacd.optimizers.with_frozen_variables`)
    and freeze the BatchNorm statistics; the export's plan then finds every ratio and bias
    where these put them, and moves nothing."""
    def convert(spreads=None):
        return _convert(bake(qat_model, input_mean, input_std, activation_policy, True,
                             spreads=spreads))

    baked = bake(qat_model, input_mean, input_std, activation_policy, True)
    return _onto_portable(qat_model, baked, _convert(baked), convert)[0]


def _onto_portable(qat_model, baked, content, convert):
    """Moves `qat_model` (whose bake `baked` converted to `content`) onto portable
    requantization: its weight steps onto the plan's ratios, then its biases onto their
    residue classes of the bias grids the new steps and spreads give (read from
    `convert(spreads)`, the model's file with those spreads). Returns `(plan, spreads,
    {layer: largest bias move in int32 units})`."""
    plan = plan_portable(qat_model, baked, content)
    apply_portable_scales(qat_model, plan)
    spreads = {name: layer.spread for name, layer in plan.layers.items()}
    moves = snap_biases_to_file(qat_model, convert(spreads), residues={
        name: (layer.modulus, layer.residue) for name, layer in plan.layers.items()})
    return plan, spreads, moves


def export_float_tflite(model, output_path, *, input_mean=None, input_std=None,
                        batch_size: int | None = None) -> pathlib.Path:
    """The float TFLite file of a float (or QAT) model, BN folded, raw-pixel input."""
    path = _writable(output_path)
    path.write_bytes(_convert(bake(model, input_mean, input_std, quantized=False,
                                   batch_size=batch_size)))
    return path


def export_tfmot_tflite(qat_model, output_path, *, input_mean=None,
                        input_std=None) -> pathlib.Path:
    """The int8 TFLite file of a model quantized by tfmot's own default 8-bit scheme, the
    way tfmot documents it (`TFLiteConverter.from_keras_model` with `Optimize.DEFAULT`), with
    the input normalization in front so that, like tfacd's files, it takes raw RGB pixels
    (float32). For the reference row of an ablation; tfacd models go through
    `export_tflite`."""
    path = _writable(output_path)
    inputs = keras.Input(qat_model.input_shape[1:])
    x = inputs
    if input_mean is not None or input_std is not None:
        mean, std = _mean_std(input_mean, input_std)
        x = keras.layers.Normalization(mean=mean, variance=np.square(std))(x)
    wrapper = keras.Model(inputs, qat_model(x, training=False))
    converter = tf.lite.TFLiteConverter.from_keras_model(wrapper)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    try:
        path.write_bytes(converter.convert())
    except Exception as error:  # the converter raises several unrelated types
        first = str(error).strip().splitlines()
        raise ExportError(f"the TFLite converter refused the tfmot model: "
                          f"{first[0] if first else type(error).__name__}") from error
    return path
