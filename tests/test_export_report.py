"""`tfacd.export.report` and `.flatbuffer`: sizes and shared quantization vectors."""

import json

import numpy as np
import pytest

from tfacd import export

from export_models import MEAN, STD, _pixels, _quantized_tiny


def test_report_sizes_and_true_bit_memory(tmp_path):
    model = _quantized_tiny(2, "per_channel")
    export.export_tflite(model, tmp_path / "s.tflite", input_mean=MEAN, input_std=STD,
                         verbose=False)
    report = json.loads((tmp_path / "s_report.json").read_text())
    assert report["file_bytes"] == (tmp_path / "s.tflite").stat().st_size
    assert report["float_file_bytes"] > 0
    assert report["size_vs_float"] == pytest.approx(report["file_bytes"]
                                                    / report["float_file_bytes"])
    # Weight bits: conv and logits 8, dw and project 2.
    sizes = {name: w.kernel.size for name, w in export.bake(model, MEAN, STD).weights.items()}
    expected = (8 * (sizes["quant_conv"] + sizes["quant_logits"])
                + 2 * (sizes["quant_dw"] + sizes["quant_project"])) / 8
    assert report["weight_memory_bytes_true_bits"] == pytest.approx(expected)


def test_quantization_vectors_are_stored_once(tmp_path):
    """The converter writes one scale and one zero-point vector per tensor; the export
    shares equal ones. Same model (outputs bit-equal), fewer bytes, and the size breakdown
    counts what is stored."""
    # pylint: disable-next=import-outside-toplevel
    from tensorflow.lite.tools import flatbuffer_utils
    model = _quantized_tiny(2, "per_channel")
    content = export.convert._convert(export.bake(model, MEAN, STD))  # pylint: disable=protected-access
    unshared = bytes(flatbuffer_utils.convert_object_to_bytearray(
        export.flatbuffer._flatbuffer(content)))                          # pylint: disable=protected-access
    # Zero-point vectors: one per quantized tensor before, one per distinct length after.
    tensors = [t for sg in export.flatbuffer._flatbuffer(content).subgraphs  # pylint: disable=protected-access
               for t in sg.tensors if t.quantization is not None
               and t.quantization.zeroPoint is not None]
    distinct = {tuple(t.quantization.zeroPoint) for t in tensors}
    saved = sum(8 * len(t.quantization.zeroPoint) for t in tensors) - \
        sum(8 * len(v) for v in distinct)
    assert saved > 0
    assert len(unshared) - len(content) >= saved
    pixels = _pixels(50)
    np.testing.assert_array_equal(export.run_tflite(content, pixels),
                                  export.run_tflite(unshared, pixels))
    assert export.size_breakdown(content)["quantization_parameters"] < \
        export.size_breakdown(unshared)["quantization_parameters"]
