"""`tfacd.export.float_filters`: the `float` policy's filters stored as int8."""

import dataclasses
import json
import pathlib

import numpy as np
import pytest
import tensorflow as tf

from tfacd import export

from export_models import MEAN, STD, _pixels, _quantized_tiny


def _stored_filter_types(path) -> list:
    """The tensor type of every weight op's filter as the file stores it."""
    model = export.flatbuffer._flatbuffer(pathlib.Path(path).read_bytes())
    return [int(tensor.type) for _, tensor, _, _ in export.flatbuffer._weight_ops(model)]


@pytest.mark.parametrize("bits", [2, 4])
def test_float_policy_export_matches_keras_with_int8_filters(tmp_path, bits):
    """Per-channel activations under the `float` policy: the file computes what the Keras
    model computes (up to float summation order), and every quantized filter is stored as
    int8 (zero point 0, at most 2^k values per channel) behind a DEQUANTIZE, none as
    float32."""
    model = _quantized_tiny(bits, "per_channel", trained_like=True)
    pixels = _pixels(300)
    path = export.export_tflite(model, tmp_path / "m.tflite", input_mean=MEAN, input_std=STD,
                                activation_policy="float", data=pixels, verbose=False)
    report = json.loads((tmp_path / "m_report.json").read_text())
    assert report["fidelity"]["top1_agreement"] >= 0.99
    assert report["fidelity"]["mean_logit_difference"] < 1e-3
    assert all(entry["exact"] for entry in report["activations"].values())
    assert report["all_weight_zero_points_zero"] and report["all_distinct_within_2^bits"]
    for name in ("quant_conv", "quant_dw", "quant_project", "quant_logits"):
        entry = report["weights"][name]
        assert (entry["computes_in"], entry["storage"]) == ("float", "int8")
    assert report["weights"]["quant_dw"]["max_distinct_values_per_channel"] <= 2 ** bits
    types = _stored_filter_types(path)
    assert len(types) == 5 and set(types) == {export.flatbuffer._tensor_types().INT8}
    assert report["op_histogram"]["DEQUANTIZE"] >= 4 + 1     # 4 filters + the input
    assert report["op_histogram"]["FLOOR"] == 6              # one per activation quantizer
    # The int8 part holds every weight; the float32 part is biases and per-channel constants,
    # less than the filters would take as float32.
    weights = sum(int(np.prod(e["shape"])) for e in report["weights"].values())
    assert report["size_breakdown"]["int8_tensors"] >= weights
    assert report["size_breakdown"]["float32_tensors"] < 4 * weights


def test_float_filters_off_the_layer_grid_are_refused():
    """`store_float_filters_as_int8` checks each float filter against the layer's integers
    and steps: a filter the converter changed is an error, not a silently different file."""
    model = _quantized_tiny(2, "per_channel")
    baked = export.bake(model, MEAN, STD, "float")
    converter = tf.lite.TFLiteConverter.from_concrete_functions([baked.function], model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    content = converter.convert()                      # float filters, as the converter writes
    _, stored = export.store_float_filters_as_int8(content, baked)
    assert stored == 4
    project = baked.weights["quant_project"]
    baked.weights["quant_project"] = dataclasses.replace(project, step=project.step * 1.37)
    with pytest.raises(export.ExportError, match="quant_project.*no longer on the layer's grid"):
        export.store_float_filters_as_int8(content, baked)
