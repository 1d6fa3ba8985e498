"""The export report: what the file holds and how well it agrees with the Keras model.

Sizes (every byte of the file accounted for, `size_breakdown`), per-layer weight storage,
bits, zero points and distinct values per channel (`weight_tensors`), the op histogram, and
`fidelity`: top-1 agreement, logit differences and accuracies of the file against the Keras
model on the same images. `format_report` prints it.
"""

from __future__ import annotations

import collections

import numpy as np

from tfacd.export._common import _content
from tfacd.export.bake import Bake
from tfacd.export.flatbuffer import (
    _flatbuffer, _layer_for_tensor, _schema, _tensor_name, _tensor_types, _weight_ops)
from tfacd.export.int4 import _unpack_int4
from tfacd.export.runtime import op_histogram, run_tflite


def weight_tensors(model_path_or_bytes) -> list[dict]:
    """Every constant int8 or int4 weight tensor of a file with its per-channel statistics
    (also those a `DEQUANTIZE` turns into a float op's filter: `dequantized`)."""
    model = _flatbuffer(_content(model_path_or_bytes))
    types = _tensor_types()
    found = []
    for op_name, tensor, _, dequantized in _weight_ops(model):
        data = model.buffers[tensor.buffer].data
        if tensor.type not in (types.INT8, types.INT4) or data is None:
            continue
        shape = [int(d) for d in tensor.shape]
        count = int(np.prod(shape))
        values = (np.frombuffer(bytes(data), np.int8) if tensor.type == types.INT8
                  else _unpack_int4(data, count)).astype(np.int32).reshape(shape)
        params = tensor.quantization
        axis = int(params.quantizedDimension)
        per_channel = np.moveaxis(values, axis, 0).reshape(values.shape[axis], -1)
        found.append({
            "op": op_name, "tensor": _tensor_name(tensor), "shape": shape,
            "storage": "int8" if tensor.type == types.INT8 else "int4",
            "zero_points": sorted({int(z) for z in params.zeroPoint}),
            "max_distinct_per_channel": int(max(len(np.unique(row)) for row in per_channel)),
            "scales": [float(v) for v in params.scale],
            # The op computes in float on this tensor's DEQUANTIZE (the `float` policy).
            "dequantized": bool(dequantized),
        })
    return found


def size_breakdown(model_path_or_bytes) -> dict:
    """Where a file's bytes go: `{part: bytes}` with the parts

    * `int8_tensors`, `int4_tensors`, `int32_tensors`, `float32_tensors`, `other_tensors`:
      constant tensor data (weights are int8 or packed int4, biases int32 in an int8 file);
    * `quantization_parameters`: the scales (float32) and zero points (int64, as the
      flatbuffer stores them), per channel for the weights *and* their biases, each
      distinct vector once (`_serialize` shares equal ones);
    * `graph_and_metadata`: the rest (operators, tensor names, shapes, signatures).

    The parts sum to the file's size (the last is the remainder).
    """
    content = _content(model_path_or_bytes)
    model = _flatbuffer(content)
    types = _tensor_types()
    names = {types.INT8: "int8_tensors", types.INT4: "int4_tensors",
             types.INT32: "int32_tensors", types.FLOAT32: "float32_tensors"}
    parts = collections.Counter()
    parts["quantization_parameters"] = _stored_quantization_bytes(content)
    counted = set()
    for subgraph in model.subgraphs:
        for tensor in subgraph.tensors:
            data = model.buffers[tensor.buffer].data if tensor.buffer else None
            if data is not None and len(data) and tensor.buffer not in counted:
                counted.add(tensor.buffer)
                parts[names.get(tensor.type, "other_tensors")] += len(data)
    result = {key: int(parts.get(key, 0)) for key in (
        "int8_tensors", "int4_tensors", "int32_tensors", "float32_tensors", "other_tensors",
        "quantization_parameters")}
    result["graph_and_metadata"] = len(content) - sum(result.values())
    return result


def _stored_quantization_bytes(content: bytes) -> int:
    """Bytes of the scale and zero-point vectors a file stores, each stored vector once
    however many tensors point at it (read where the vectors lie, not what they hold)."""
    schema = _schema()
    root = schema.Model.GetRootAs(content, 0)
    positions = {}
    for g in range(root.SubgraphsLength()):
        subgraph = root.Subgraphs(g)
        for t in range(subgraph.TensorsLength()):
            params = subgraph.Tensors(t).Quantization()
            if params is None:
                continue
            table = params._tab  # pylint: disable=protected-access
            # vtable slots of QuantizationParameters.scale (float32) and .zero_point (int64)
            for slot, width in ((8, 4), (10, 8)):
                field = table.Offset(slot)
                if field:
                    positions[table.Vector(field)] = width * table.VectorLen(field)
    return sum(positions.values())


def _mean_std(input_mean, input_std):
    """Per-channel input mean and std as float32; a missing one is 0 (mean) or 1 (std)."""
    mean = np.zeros(3) if input_mean is None else np.asarray(input_mean)
    std = np.ones(3) if input_std is None else np.asarray(input_std)
    return mean.astype(np.float32), std.astype(np.float32)


def _keras_logits(qat_model, pixels, input_mean=None, input_std=None, batch_size: int = 64):
    pixels = np.asarray(pixels, np.float32)
    normalized = pixels
    if input_mean is not None or input_std is not None:
        mean, std = _mean_std(input_mean, input_std)
        normalized = (pixels - mean) / std
    return np.concatenate([
        qat_model(normalized[i:i + batch_size], training=False).numpy()
        for i in range(0, len(pixels), batch_size)])


def _compare(keras_logits, lite_logits, labels=None) -> dict:
    difference = np.abs(keras_logits - lite_logits)
    result = {
        "num_examples": int(len(keras_logits)),
        "top1_agreement": float(np.mean(keras_logits.argmax(1) == lite_logits.argmax(1))),
        "max_logit_difference": float(difference.max()),
        "mean_logit_difference": float(difference.mean()),
        "keras_accuracy": None, "tflite_accuracy": None,
    }
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        result["keras_accuracy"] = float(np.mean(keras_logits.argmax(1) == labels))
        result["tflite_accuracy"] = float(np.mean(lite_logits.argmax(1) == labels))
    return result


def fidelity(qat_model, tflite, pixels, labels=None, input_mean=None, input_std=None,
             batch_size: int = 64) -> dict:
    """Top-1 agreement and logit differences between the Keras QAT model and a file (run
    with XNNPACK, LiteRT's default), and both accuracies when `labels` are given. `pixels`
    are raw (0-255)."""
    return _compare(_keras_logits(qat_model, pixels, input_mean, input_std, batch_size),
                    run_tflite(tflite, np.asarray(pixels, np.float32), batch_size), labels)


def _report(qat_model, baked: Bake, content: bytes, float_content: bytes | None,
            options: dict) -> dict:
    layer_names = [layer.name for layer in qat_model.layers]
    per_layer = {}
    for entry in weight_tensors(content):
        layer = _layer_for_tensor(entry["tensor"], layer_names)
        weights = baked.weights.get(layer)
        if weights is None:
            layer, bits, clamped = "input_normalization", 8, 0
        else:
            bits, clamped = weights.bits, weights.clamped
        per_layer[layer] = {
            "op": entry["op"], "weight_bits": bits, "storage": entry["storage"],
            "computes_in": "float" if entry["dequantized"] else "integer",
            "shape": entry["shape"],
            "max_distinct_values_per_channel": entry["max_distinct_per_channel"],
            "distinct_within_2^bits": bool(entry["max_distinct_per_channel"] <= 2 ** bits),
            "zero_points": entry["zero_points"],
            "clamped_weights": clamped,
        }
    float_bits = sum(w.kernel.size * 32 for w in baked.weights.values())
    true_bits = sum(w.kernel.size * (w.bits or 32) for w in baked.weights.values())
    return {
        "file_bytes": len(content),
        "float_file_bytes": len(float_content) if float_content is not None else None,
        "size_vs_float": (len(content) / len(float_content)) if float_content else None,
        "size_breakdown": size_breakdown(content),
        "op_histogram": op_histogram(content),
        "weights": per_layer,
        "all_weight_zero_points_zero": all(v["zero_points"] == [0] for v in per_layer.values()),
        "all_distinct_within_2^bits": all(v["distinct_within_2^bits"]
                                          for v in per_layer.values()),
        "clamped_weights": sum(v["clamped_weights"] for v in per_layer.values()),
        "weight_memory_bytes_true_bits": true_bits / 8,
        "weight_memory_bytes_float32": float_bits / 8,
        "weight_memory_vs_float32": true_bits / float_bits if float_bits else None,
        "activations": {
            plan.name: {"bits": plan.bits, "per_channel": bool(plan.per_channel),
                        "exact": bool(plan.exact)}
            for plan in baked.activations},
        "float_layers": baked.float_layers,
        # (pixel value, channel) pairs whose quantized input differs from Keras's input
        # quantizer (0 by construction; None: no input quantizer to match).
        "input_normalization_mismatches": baked.normalization_mismatches,
        "options": options,
    }


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def format_report(report: dict) -> str:
    """A short human-readable rendering of an export report."""
    lines = [f"TFLite file: {report.get('path', '?')}  {report['file_bytes']:,} bytes"]
    if report.get("size_vs_float"):
        lines.append(f"  vs float TFLite ({report['float_file_bytes']:,} bytes): "
                     f"{report['size_vs_float']:.3f}x")
    if report.get("size_breakdown"):
        lines.append("  bytes: " + ", ".join(f"{k} {v:,}"
                                              for k, v in report["size_breakdown"].items()))
    if report.get("weight_memory_vs_float32") is not None:
        lines.append(f"  weight memory at true bit widths: "
                     f"{report['weight_memory_bytes_true_bits']:,.0f} bytes "
                     f"({report['weight_memory_vs_float32']:.4f}x float32)")
    lines.append(f"  weight zero points all 0: {report['all_weight_zero_points_zero']}; "
                 f"distinct values per channel <= 2^bits: "
                 f"{report['all_distinct_within_2^bits']}; clamped 8-bit weights: "
                 f"{report['clamped_weights']}")
    ops_line = ", ".join(f"{k} {v}" for k, v in sorted(report["op_histogram"].items()))
    lines.append(f"  ops: {ops_line}")
    if report.get("float_layers"):
        lines.append(f"  float layers: {report['float_layers']}")
    fid = report.get("fidelity")
    if fid:
        lines.append(f"  fidelity on {fid['num_examples']} examples: top-1 agreement "
                     f"{fid['top1_agreement']:.4f}, logit diff max "
                     f"{fid['max_logit_difference']:.4f} mean "
                     f"{fid['mean_logit_difference']:.4f}")
        if fid.get("keras_accuracy") is not None:
            lines.append(f"  accuracy: Keras {fid['keras_accuracy']:.4f}, "
                         f"TFLite {fid['tflite_accuracy']:.4f}")
    for runtime, other in (report.get("fidelity_by_runtime") or {}).items():
        if len(report["fidelity_by_runtime"]) > 1:
            lines.append(f"    on {runtime}: top-1 agreement {other['top1_agreement']:.4f}, "
                         f"logit diff max {other['max_logit_difference']:.4f}")
    for runtime, support in (report.get("runtimes") or {}).items():
        if not support["runs"]:
            lines.append(f"  cannot run on {runtime}: {support['why']}")
        elif support.get("inexact_why"):
            lines.append(f"  {runtime} may compute other integers than XNNPACK: "
                         f"{support['inexact_why']}")
    before = report.get("fidelity_before_bias_snap")
    if before:
        accuracy = "" if before.get("keras_accuracy") is None else \
            f", Keras accuracy {before['keras_accuracy']:.4f}"
        lines.append(f"  before the bias snap ({report['bias_snap']['layers']} layers): "
                     f"top-1 agreement {before['top1_agreement']:.4f}{accuracy}")
    return "\n".join(lines)
