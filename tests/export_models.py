"""Tiny quantized models and pixels shared by the export tests."""


import numpy as np
import tensorflow as tf

import tfacd
from tfacd._keras import keras

from tfacd.data import PIXEL_GRID, PIXEL_GRID_RANGE

from conftest import tiny_cnn


MEAN = np.array([125.0, 120.0, 110.0])


STD = np.array([60.0, 58.0, 62.0])


def _pixels(count=200, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(count, 8, 8, 3)).astype("float32")


def _trained_like(model, seed=0):
    """Gives every BatchNormalization of `model` the kind of statistics and offsets training
    leaves (the untrained ones fold to zero biases, which sit on any grid)."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        inner = getattr(layer, "layer", layer)
        if isinstance(inner, keras.layers.BatchNormalization):
            channels = inner.beta.shape[0]
            inner.beta.assign(rng.normal(0.3, 0.5, channels).astype("float32"))
            inner.gamma.assign(rng.uniform(0.5, 1.5, channels).astype("float32"))
            inner.moving_mean.assign(rng.normal(0, 0.3, channels).astype("float32"))
            inner.moving_variance.assign(rng.uniform(0.5, 2.0, channels).astype("float32"))
    return model


def _quantized_tiny(bits, granularity, first_last_bits=8, trained_like=False,
                    activation_granularity=None, symmetric_weights=False, pixel_grid=False,
                    exact_average_pooling=False):
    """A tiny QAT model, calibrated on inputs normalized with MEAN/STD, or with
    `pixel_grid` on `(p - 128) / 64` with the input quantizer fixed on that grid."""
    tf.random.set_seed(0)
    float_model = _trained_like(tiny_cnn()) if trained_like else tiny_cnn()
    model = tfacd.quantize_model(float_model, weight_bits=bits, activation_bits=bits,
                                 granularity=granularity, first_last_bits=first_last_bits,
                                 activation_granularity=activation_granularity,
                                 symmetric_weights=symmetric_weights,
                                 exact_average_pooling=exact_average_pooling,
                                 input_range=PIXEL_GRID_RANGE if pixel_grid else None)
    mean, std = PIXEL_GRID if pixel_grid else (MEAN, STD)
    tfacd.calibrate(model, ((_pixels(64, seed=1) - mean) / std).astype("float32"))
    return model
