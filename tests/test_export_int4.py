"""`tfacd.export.int4`: int4 storage through FULLY_CONNECTED."""

import json

import numpy as np
import pytest

from tfacd import export

from export_models import MEAN, STD, _pixels, _quantized_tiny


def test_int4_packing_keeps_every_integer(tmp_path):
    """`pack_int4_weights` changes how the filters are stored, not what the file computes:
    the 1x1 convolution becomes an int4 FULLY_CONNECTED whose outputs equal the int8
    CONV_2D's bit for bit, with XNNPACK (which runs int4 only in FULLY_CONNECTED) and with
    the builtin kernels. The depthwise filter stays int8 although its integers fit.
    (Integer layers: the `clamp` policy keeps the per-channel activations int8.)"""
    model = _quantized_tiny(2, "per_channel")
    baked = export.bake(model, MEAN, STD, "clamp", weight_storage="int4")
    unpacked = export.convert._convert(baked)  # pylint: disable=protected-access
    packed, count = export.pack_int4_weights(unpacked)
    assert count == 1                                # the 2-bit 1x1 project layer
    before = {e["tensor"]: e for e in export.weight_tensors(unpacked)}
    after = {e["tensor"]: e for e in export.weight_tensors(packed)}
    assert sorted((e["op"], e["storage"]) for e in after.values()) == [
        ("CONV_2D", "int8"), ("CONV_2D", "int8"), ("DEPTHWISE_CONV_2D", "int8"),
        ("DEPTHWISE_CONV_2D", "int8"), ("FULLY_CONNECTED", "int4")]
    for name, entry in after.items():                # same statistics, read back unpacked
        assert {k: v for k, v in entry.items() if k not in ("storage", "op", "shape")} == \
            {k: v for k, v in before[name].items() if k not in ("storage", "op", "shape")}
    assert export.op_histogram(packed)["CONV_2D"] == export.op_histogram(unpacked)["CONV_2D"] - 1
    pixels = _pixels(100)
    for delegates in (True, False):
        np.testing.assert_array_equal(
            export.run_tflite(packed, pixels, delegates=delegates),
            export.run_tflite(unpacked, pixels, delegates=delegates))
    parts_before, parts_after = export.size_breakdown(unpacked), export.size_breakdown(packed)
    assert parts_after["int4_tensors"] > 0
    assert parts_before["int8_tensors"] - parts_after["int8_tensors"] == \
        pytest.approx(2 * parts_after["int4_tensors"], abs=2)       # odd sizes pad a nibble
    assert len(packed) < len(unpacked)


@pytest.mark.parametrize("bits,symmetric_weights", [(2, False), (4, True)])
def test_int4_storage_export_is_exact(tmp_path, bits, symmetric_weights):
    """Per-channel 2-bit weights (or 4-bit ones on the symmetric grid) stored as int4,
    per-tensor activations, trained-like biases: after the bias snap the file's logits equal
    the Keras model's bit for bit, as with int8 storage (the XNNPACK FULLY_CONNECTED kernel
    requantizes like the CONV_2D one)."""
    model = _quantized_tiny(bits, "per_channel", trained_like=True,
                            activation_granularity="per_layer",
                            symmetric_weights=symmetric_weights)
    pixels = _pixels()
    path = export.export_tflite(model, tmp_path / "int4.tflite", input_mean=MEAN,
                                input_std=STD, data=pixels, verbose=False,
                                weight_storage="int4", float_reference=False)
    report = json.loads(path.with_name("int4_report.json").read_text())
    assert {name: (w["op"], w["storage"]) for name, w in report["weights"].items()} == {
        "input_normalization": ("DEPTHWISE_CONV_2D", "int8"),
        "quant_conv": ("CONV_2D", "int8"), "quant_dw": ("DEPTHWISE_CONV_2D", "int8"),
        "quant_project": ("FULLY_CONNECTED", "int4"), "quant_logits": ("CONV_2D", "int8")}
    assert report["all_weight_zero_points_zero"] and report["all_distinct_within_2^bits"]
    assert report["weights"]["quant_project"]["weight_bits"] == bits
    assert report["options"]["weight_storage"] == "int4"
    assert report["fidelity"]["max_logit_difference"] == 0.0
    assert report["fidelity"]["top1_agreement"] == 1.0
    with pytest.raises(export.ExportError, match="weight_storage"):
        export.export_tflite(model, tmp_path / "x.tflite", weight_storage="int2")


def test_int4_storage_of_asymmetric_4bit_weights_warns_and_stays_int8(tmp_path):
    """A 4-bit asymmetric grid `[-z, 15 - z]` leaves int4's range: the file is still right,
    stored int8, and the warning names the option that makes 4-bit weights fit."""
    model = _quantized_tiny(4, "per_channel", trained_like=True,
                            activation_granularity="per_layer")
    with pytest.warns(UserWarning, match="symmetric_weights=True"):
        path = export.export_tflite(model, tmp_path / "a.tflite", input_mean=MEAN,
                                    input_std=STD, verbose=False, weight_storage="int4",
                                    float_reference=False)
    report = json.loads(path.with_name("a_report.json").read_text())
    assert {w["storage"] for w in report["weights"].values()} == {"int8"}
