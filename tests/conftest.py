"""Shared fixtures: tiny models that build and train in seconds on 2 CPU cores."""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

import tfacd  # noqa: E402
from tfacd._keras import keras  # noqa: E402

layers = keras.layers


def tiny_cnn(num_classes=4, regularize=False):
    """Conv-BN-ReLU, a depthwise-separable block with a residual Add, pooling and a Dense."""
    reg = keras.regularizers.l2(1e-4) if regularize else None
    inputs = keras.Input((8, 8, 3), name="image")
    x = layers.Conv2D(8, 3, padding="same", use_bias=False, kernel_regularizer=reg,
                      name="conv")(inputs)
    x = layers.BatchNormalization(momentum=0.5, name="conv_bn")(x)
    x = layers.ReLU(6.0, name="conv_relu")(x)
    shortcut = x
    x = layers.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(x)
    x = layers.BatchNormalization(momentum=0.5, name="dw_bn")(x)
    x = layers.ReLU(6.0, name="dw_relu")(x)
    x = layers.Conv2D(8, 1, use_bias=False, name="project")(x)
    x = layers.BatchNormalization(momentum=0.5, name="project_bn")(x)
    x = layers.Add(name="add")([shortcut, x])
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="tiny_cnn")


@pytest.fixture(autouse=True)
def _same_seeds_for_every_test():
    """Every test starts from the same random state, whatever ran before it. Unseeded tf_keras
    initializers draw their seeds from Python's `random` (tf_keras `backend._create_seed`),
    which `tf.random.set_seed` does not reset: without this a test's initial weights depended
    on the tests before it in the process, and a near-tie assertion could fail in one order
    and pass in another."""
    keras.utils.set_random_seed(0)


@pytest.fixture
def tiny_model():
    tf.random.set_seed(0)
    return tiny_cnn()


@pytest.fixture
def tiny_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8, 8, 3)).astype("float32")
    # Learnable labels: the class is the channel-mean sign pattern of the image.
    y = ((x[..., 0].mean(axis=(1, 2)) > 0).astype(int) * 2
         + (x[..., 1].mean(axis=(1, 2)) > 0).astype(int))
    return x, y


def compile_model(model, learning_rate=1e-2):
    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model
