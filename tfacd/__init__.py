"""tfacd: ultra-low-precision (2-4 bit) QAT for lightweight CNNs, as a tfmot extension.

Per-channel learnable asymmetric clips, ACD (asymmetric clipping-value decay) and an SQNR
loss. Start with `tfacd.quantize_model(model, weight_bits=2, activation_bits=2)`.
"""

import os

# tfmot works only with tf_keras (Keras 2): select it before TensorFlow is imported.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

from tfacd import batch_norm, callbacks, distill, ops, optimizers, progressive, sqnr  # noqa: E402
from tfacd.models import mobilenet_v2_cifar  # noqa: E402
from tfacd.quantizers import ClipQuantizer, QuantizerInfo, iter_quantizers, list_quantizers  # noqa: E402
from tfacd.registry import ClipQuantizeConfig, ClipQuantizeRegistry  # noqa: E402
from tfacd.scheme import QuantizeScheme, calibrate, quantize_model, quantize_scope  # noqa: E402
from tfacd import models  # noqa: E402
from tfacd.export import ExportError, export_tflite  # noqa: E402
from tfacd.model_summary import summary  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "ClipQuantizeConfig", "ClipQuantizeRegistry", "ClipQuantizer", "ExportError", "QuantizeScheme",
    "QuantizerInfo", "batch_norm", "calibrate", "callbacks", "distill", "progressive",
    "iter_quantizers", "list_quantizers", "models", "optimizers",
    "mobilenet_v2_cifar", "ops", "quantize_model", "quantize_scope", "sqnr", "summary",
    "export_tflite",
]
