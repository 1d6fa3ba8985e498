"""BatchNorm re-estimation: moving statistics recomputed with the quantized forward pass.

During QAT, BatchNorm's moving mean and variance are exponential averages of batch
statistics taken while the weights and clips moved; at 2 bits the late batches' statistics
differ from the early ones', and the depthwise layers' most of all, so inference runs on
statistics of a network that no longer exists. Re-estimation (as in Qualcomm's
oscillations-qat, Nagel et al. 2022, "Overcoming oscillations in quantization-aware
training") recomputes them for the current network: for N batches `x_1..x_N` run in
training mode,

    moving_mean     <- (1/N) sum_i mean_B(h(x_i))
    moving_variance <- (1/N) sum_i var_B(h(x_i))

per channel, where `h` is the BatchNorm's input under the quantized forward pass and
`mean_B`, `var_B` the batch statistics Keras' BatchNorm computes in training. Nothing else
changes: kernels, gamma, beta, clips and the quantizers' tracked ranges are restored to
their values before the passes.

`reestimate_batch_norm(model, data, num_batches)` does it once (before evaluation or
export); `BatchNormReestimation` does it before every evaluation inside `fit` (the
validation at each epoch's end) and at the end of training.
"""

from __future__ import annotations

import time
import weakref

import numpy as np
import tensorflow as tf

from tfacd._keras import keras
from tfacd.scheme import _BATCH_NORMS  # the layer types the scheme treats as BatchNorm


def batch_norm_layers(model) -> list:
    """Every BatchNormalization layer of `model` (inside tfmot wrappers and trainable nested
    models too; a frozen nested model, such as a distiller's teacher, is skipped)."""
    found = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            if layer.trainable:
                found.extend(batch_norm_layers(layer))
            continue
        inner = getattr(layer, "layer", layer)
        if type(inner).__name__ in _BATCH_NORMS:
            found.append(inner)
    return found


def _batches(data, num_batches: int):
    if isinstance(data, tf.data.Dataset):
        for element in data.take(num_batches):
            yield element[0] if isinstance(element, (tuple, list)) else element
        return
    array = np.asarray(data)
    size = max(1, -(-len(array) // num_batches))
    for start in range(0, len(array), size):
        yield array[start:start + size]


def _training_forward(model):
    """The model's training-mode forward pass as a tf.function, traced once per model and
    kept on it: tracing a MobileNetV2 costs tens of seconds, and `BatchNormReestimation` runs
    at every epoch. The trace holds momentum 0 and trainable BatchNorms, the state
    `reestimate_batch_norm` sets before each call."""
    forward = _FORWARDS.get(model)
    if forward is None:
        forward = tf.function(lambda x: model(x, training=True))
        _FORWARDS[model] = forward
    return forward


# Not an attribute of the model: Keras would track the function as part of the model.
_FORWARDS = weakref.WeakKeyDictionary()


def reestimate_batch_norm(model, data, num_batches: int = 50) -> int:
    """Recomputes every BatchNorm's moving statistics on `num_batches` batches of `data` (a
    `tf.data.Dataset` of `x` or `(x, y)` batches, or an array cut into `num_batches` batches)
    with `model`'s own (quantized) forward pass in training mode. Returns how many batches
    were used. Every variable other than the moving statistics keeps its value.

    Raises:
      ValueError: `num_batches` < 1, no BatchNorm in the model, or no data.
    """
    if not (isinstance(num_batches, int) and num_batches >= 1):
        raise ValueError(f"num_batches must be an integer >= 1, got {num_batches!r}")
    layers = batch_norm_layers(model)
    if not layers:
        raise ValueError(f"model {model.name} has no BatchNormalization layer to re-estimate")
    statistics = [v for bn in layers for v in (bn.moving_mean, bn.moving_variance)]
    moving = {v.ref() for v in statistics}
    others = [v for v in model.variables if v.ref() not in moving]
    saved = [v.numpy() for v in others]
    settings = [(bn.momentum, bn.trainable) for bn in layers]
    sums = [np.zeros(v.shape, np.float64) for v in statistics]
    used = 0
    try:
        for bn in layers:
            # Momentum 0: after each pass the moving statistics are that batch's statistics,
            # which are summed here. trainable: a frozen BN (`freeze_bn`) ignores training=True.
            bn.momentum, bn.trainable = 0.0, True
        forward = _training_forward(model)
        for x in _batches(data, num_batches):
            forward(tf.convert_to_tensor(x))
            for total, variable in zip(sums, statistics):
                total += variable.numpy()
            used += 1
    finally:
        for bn, (momentum, trainable) in zip(layers, settings):
            bn.momentum, bn.trainable = momentum, trainable
        for variable, value in zip(others, saved):
            variable.assign(value)
    if not used:
        raise ValueError("reestimate_batch_norm: the data holds no batch")
    for variable, total in zip(statistics, sums):
        variable.assign((total / used).astype(variable.dtype.as_numpy_dtype))
    return used


class BatchNormReestimation(keras.callbacks.Callback):
    """Re-estimates BatchNorm statistics (`reestimate_batch_norm`) before every evaluation
    `fit` runs (its validation at the end of each epoch) and at the end of training, so that
    validation, the final evaluation and an export all see statistics of the current network.

    Args:
      data: a `tf.data.Dataset` of training batches (augmented as in training is fine).
      num_batches: batches per re-estimation.
      verbose: print a line with the time each re-estimation took.
    """

    def __init__(self, data, num_batches: int = 50, verbose: bool = False):
        super().__init__()
        if not (isinstance(num_batches, int) and num_batches >= 1):
            raise ValueError(f"num_batches must be an integer >= 1, got {num_batches!r}")
        self.data = data
        self.num_batches = num_batches
        self.verbose = verbose
        self._training = False

    def get_config(self):
        return {"num_batches": self.num_batches}

    def on_train_begin(self, logs=None):
        self._training = True

    def on_test_begin(self, logs=None):
        if self._training:        # fit's validation; a bare evaluate() is left alone
            self._reestimate()

    def on_train_end(self, logs=None):
        self._training = False
        self._reestimate()

    def _reestimate(self):
        start = time.perf_counter()
        used = reestimate_batch_norm(self.model, self.data, self.num_batches)
        if self.verbose:
            print(f"\n[tfacd] BatchNorm statistics re-estimated on {used} batches in "
                  f"{time.perf_counter() - start:.1f} s", flush=True)
