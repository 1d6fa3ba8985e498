"""The Keras that tfmot works with: tf_keras (Keras 2).

tfmot rejects Keras 3 models, so tfacd builds everything with `tf_keras`. `TF_USE_LEGACY_KERAS`
is set before TensorFlow is imported (by `tfacd/__init__.py`) so `tf.keras` agrees, as tfmot
expects; users need not set it themselves.
"""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import tf_keras as keras  # noqa: E402  pylint: disable=wrong-import-position

__all__ = ["keras"]
