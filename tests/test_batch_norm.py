"""tfacd.batch_norm: re-estimation sets the documented statistics and nothing else."""

import numpy as np
import pytest
import tensorflow as tf

import tfacd
from tfacd._keras import keras
from tfacd.batch_norm import BatchNormReestimation, batch_norm_layers, reestimate_batch_norm
from tests.conftest import tiny_cnn


def _qat(x):
    model = tfacd.quantize_model(tiny_cnn(), weight_bits=2, activation_bits=2)
    tfacd.calibrate(model, x)
    return model


def test_reestimation_averages_batch_statistics_and_keeps_every_other_variable(tiny_data):
    x, _ = tiny_data
    model = _qat(x)
    layers = batch_norm_layers(model)
    assert len(layers) == 3
    moving = {v.ref() for bn in layers for v in (bn.moving_mean, bn.moving_variance)}
    others = {v.name: v.numpy().copy() for v in model.variables if v.ref() not in moving}
    before = [bn.moving_mean.numpy().copy() for bn in layers]

    # What it should compute: each batch's statistics of the BN input, averaged.
    batches = [x[i:i + 16] for i in range(0, 64, 16)]
    inputs = {bn.name: keras.Model(model.inputs, _bn_input(model, bn)) for bn in layers}
    assert reestimate_batch_norm(model, x, num_batches=4) == 4
    for variable in model.variables:
        if variable.ref() not in moving:
            np.testing.assert_array_equal(variable.numpy(), others[variable.name])
    # (The check below runs parts of the model in training mode, which moves earlier
    # BatchNorms' statistics and the quantizers' tracked ranges: each BN is checked before
    # any pass through it.)
    for bn, old in zip(layers, before):
        # The BN's input depends on earlier BNs, which are re-estimated too but act in
        # training mode (batch statistics) during the passes: compare with that pass.
        means, variances = [], []
        for batch in batches:
            h = inputs[bn.name](batch, training=True).numpy()
            means.append(h.mean(axis=(0, 1, 2)))
            variances.append(h.var(axis=(0, 1, 2)))
        np.testing.assert_allclose(bn.moving_mean.numpy(), np.mean(means, 0), rtol=1e-4,
                                   atol=1e-5)
        np.testing.assert_allclose(bn.moving_variance.numpy(), np.mean(variances, 0),
                                   rtol=1e-3, atol=1e-5)
        assert not np.allclose(bn.moving_mean.numpy(), old)


def _bn_input(model, bn):
    for layer in model.layers:
        if getattr(layer, "layer", None) is bn or layer is bn:
            return layer.input
    raise AssertionError(bn.name)


def test_frozen_batch_norms_are_reestimated_and_stay_frozen(tiny_data):
    from tfacd.train import freeze_batch_norms  # pylint: disable=import-outside-toplevel
    x, _ = tiny_data
    model = _qat(x)
    freeze_batch_norms(model)
    before = [bn.moving_variance.numpy().copy() for bn in batch_norm_layers(model)]
    reestimate_batch_norm(model, tf.data.Dataset.from_tensor_slices(x).batch(32), 2)
    after = [bn.moving_variance.numpy() for bn in batch_norm_layers(model)]
    assert all(not np.allclose(b, a) for b, a in zip(before, after))
    assert all(not bn.trainable and bn.momentum == 0.5 for bn in batch_norm_layers(model))


def test_callback_reestimates_before_validation_and_at_the_end(tiny_data):
    x, y = tiny_data
    model = _qat(x)
    model.compile(keras.optimizers.Adam(0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    calls = []
    original = tfacd.batch_norm.reestimate_batch_norm

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    data = tf.data.Dataset.from_tensor_slices(x).batch(16)
    tfacd.batch_norm.reestimate_batch_norm = counting
    try:
        model.fit(x, y, batch_size=16, epochs=2, verbose=0, validation_data=(x, y),
                  callbacks=[BatchNormReestimation(data, num_batches=2)])
        model.evaluate(x, y, verbose=0, callbacks=[BatchNormReestimation(data, 2)])
    finally:
        tfacd.batch_norm.reestimate_batch_norm = original
    assert len(calls) == 3                         # two validations, the end; not evaluate
    # After the end-of-training pass the moving statistics are the re-estimated ones.
    expected = [bn.moving_mean.numpy().copy() for bn in batch_norm_layers(model)]
    reestimate_batch_norm(model, data, 2)
    for bn, want in zip(batch_norm_layers(model), expected):
        np.testing.assert_allclose(bn.moving_mean.numpy(), want, rtol=1e-5, atol=1e-6)


def test_bad_input():
    model = tiny_cnn()
    with pytest.raises(ValueError, match="num_batches"):
        reestimate_batch_norm(model, np.zeros((4, 8, 8, 3), "float32"), 0)
    with pytest.raises(ValueError, match="no BatchNormalization"):
        inputs = keras.Input((4,))
        reestimate_batch_norm(keras.Model(inputs, keras.layers.Dense(2)(inputs)),
                              np.zeros((4, 4), "float32"), 1)
    with pytest.raises(ValueError, match="no batch"):
        reestimate_batch_norm(model, tf.data.Dataset.from_tensor_slices(
            np.zeros((0, 8, 8, 3), "float32")).batch(2), 1)
