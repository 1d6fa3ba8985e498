"""Shared by every export module: the options' names, `ExportError`, reading and writing files.
"""

from __future__ import annotations

import pathlib

import tensorflow as tf


ACTIVATION_POLICIES = ("clamp", "round", "float")


IO_TYPES = {"float32": tf.float32, "int8": tf.int8, "uint8": tf.uint8}


WEIGHT_STORAGES = ("int8", "int4")


_INT8_MAX = 127


_INT4_MIN, _INT4_MAX = -8, 7


_WEIGHT_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")


class ExportError(ValueError):
    """The model or the options cannot be exported; the message says why."""


def _writable(output_path) -> pathlib.Path:
    """`output_path` as a Path, checked writable now (before minutes of work) by opening it
    for appending; a file this creates stays empty until written."""
    path = pathlib.Path(output_path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab"):
            pass
    except OSError as error:
        raise ExportError(f"cannot write {path}: {error.strerror or error}") from None
    return path


def _content(model_path_or_bytes) -> bytes:
    if isinstance(model_path_or_bytes, (bytes, bytearray)):
        return bytes(model_path_or_bytes)
    path = pathlib.Path(model_path_or_bytes)
    if not path.is_file():
        raise ExportError(f"TFLite file not found: {path}")
    return path.read_bytes()
# How convolution outputs are requantized: as trained (exact on XNNPACK's float rescale), or
# on scales every runtime requantizes alike (tfacd.export.portable).
REQUANTIZATIONS = ("float", "portable")
