"""ClipDecay (ACD)."""

import numpy as np
import pytest

import tfacd
from tfacd._keras import keras
from tfacd.callbacks import ClipDecay, schedule_value


def test_schedules():
    assert schedule_value("constant", 0.2, 0.7) == 0.2
    assert schedule_value("ramp", 0.2, 0.05, warmup=0.1) == pytest.approx(0.1)
    assert schedule_value("ramp", 0.2, 0.5, warmup=0.1) == pytest.approx(0.2)
    assert schedule_value("cosine", 0.2, 0.0) == pytest.approx(0.2)
    assert schedule_value("cosine", 0.2, 0.5) == pytest.approx(0.1)
    assert schedule_value("cosine", 0.2, 1.0) == pytest.approx(0.0)
    assert schedule_value("linear", 0.2, 0.25) == pytest.approx(0.15)
    with pytest.raises(ValueError, match="exp"):
        schedule_value("exp", 0.2, 0.5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(mode="shrink"), "shrink"), (dict(schedule="step"), "step"),
    (dict(lower_strength=1.5), "lower_strength"), (dict(upper_strength=-1), "upper_strength"),
    (dict(apply_to="biases"), "biases"), (dict(every_n_steps=0), "every_n_steps")])
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ClipDecay(**kwargs)


def _frozen_fit(model, x, y, callback, epochs=1):
    # A learning rate of 0 freezes the optimizer, so only ACD moves the clips.
    model.compile(optimizer=keras.optimizers.SGD(0.0),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model.fit(x, y, batch_size=len(x), epochs=epochs, verbose=0, callbacks=[callback])


def test_decay_moves_each_clip_toward_the_data_range_as_documented(tiny_model, tiny_data):
    x, y = tiny_data
    qat = tfacd.quantize_model(tiny_model, weight_bits=2, activation_bits=2)
    tfacd.calibrate(qat, x)
    infos = tfacd.list_quantizers(qat)
    for info in infos:                     # widen every clip beyond its data
        info.variables["lower"].assign(info.variables["lower"] - 1.0)
        info.variables["upper"].assign(info.variables["upper"] + 2.0)
    before = {id(i.variables["lower"]): (i.variables["lower"].numpy(),
                                         i.variables["upper"].numpy()) for i in infos}
    history = _frozen_fit(qat, x, y, ClipDecay(lower_strength=0.5, upper_strength=0.25,
                                               schedule="constant"))
    for info in infos:
        lower0, upper0 = before[id(info.variables["lower"])]
        data_min = info.variables["data_min"].numpy()
        data_max = info.variables["data_max"].numpy()
        expected_l = lower0 + 0.5 * np.maximum(data_min - lower0, 0)
        expected_u = upper0 - 0.25 * np.maximum(upper0 - data_max, 0)
        np.testing.assert_allclose(info.variables["lower"].numpy(), expected_l, rtol=1e-5,
                                   atol=1e-6, err_msg=f"{info.layer}/{info.tensor}")
        np.testing.assert_allclose(info.variables["upper"].numpy(), expected_u, rtol=1e-5,
                                   atol=1e-6, err_msg=f"{info.layer}/{info.tensor}")
        assert np.all(info.variables["upper"].numpy() < upper0)
    assert history.history["acd_lower_strength"] == [0.5]
    assert history.history["acd_upper_strength"] == [0.25]


def test_decay_can_target_weights_only(tiny_model, tiny_data):
    x, y = tiny_data
    qat = tfacd.quantize_model(tiny_model, weight_bits=2, activation_bits=2)
    tfacd.calibrate(qat, x)
    infos = tfacd.list_quantizers(qat)
    for info in infos:
        info.variables["upper"].assign(info.variables["upper"] + 2.0)
    before = [i.variables["upper"].numpy() for i in infos]
    _frozen_fit(qat, x, y, ClipDecay(upper_strength=0.5, schedule="constant",
                                     apply_to="weights"))
    for info, upper0 in zip(infos, before):
        moved = not np.allclose(info.variables["upper"].numpy(), upper0)
        assert moved == (info.kind == "weight"), (info.layer, info.tensor)


def test_decay_function_is_traced_once_across_fit_calls(tiny_model, tiny_data):
    # A loop that calls `fit` repeatedly (one call per epoch, say) must not re-trace it.
    x, y = tiny_data
    qat = tfacd.quantize_model(tiny_model, weight_bits=2, activation_bits=2)
    tfacd.calibrate(qat, x)
    variables = tfacd.list_quantizers(qat)[0].variables
    variables["upper"].assign(variables["upper"] + 1.0)      # above the data: decays
    callback = ClipDecay(schedule="constant")
    _frozen_fit(qat, x, y, callback)
    first = callback._apply                                  # pylint: disable=protected-access
    upper = variables["upper"].numpy()
    qat.fit(x, y, batch_size=len(x), epochs=1, verbose=0, callbacks=[callback])
    assert callback._apply is first                          # pylint: disable=protected-access
    assert first.experimental_get_tracing_count() == 1
    assert np.all(variables["upper"].numpy() < upper)        # and it still runs


def test_default_clip_decay_runs_and_logs_its_schedule(tiny_model, tiny_data):
    x, y = tiny_data
    qat = tfacd.quantize_model(tiny_model, weight_bits=2, activation_bits=2)
    tfacd.calibrate(qat, x)
    history = _frozen_fit(qat, x, y, ClipDecay(), epochs=2)
    lower = history.history["acd_lower_strength"]
    # cosine from 0.01: after 1 of 2 steps 0.005, after 2 of 2 steps 0.
    np.testing.assert_allclose(lower, [0.005, 0.0], atol=1e-9)


def test_pull_mode_sets_penalty_strengths_and_needs_pull_quantizers(tiny_model, tiny_data):
    x, y = tiny_data
    plain = tfacd.quantize_model(tiny_model, weight_bits=2, activation_bits=2)
    with pytest.raises(ValueError, match="acd_pull"):
        _frozen_fit(plain, x, y, ClipDecay(mode="pull"))
    qat = tfacd.quantize_model(tiny_model, weight_bits=2, activation_bits=2, acd_pull=True)
    tfacd.calibrate(qat, x)
    callback = ClipDecay(mode="pull", lower_strength=3.0, upper_strength=5.0,
                         schedule="constant")
    _frozen_fit(qat, x, y, callback)
    pulled = [i for i in tfacd.list_quantizers(qat) if i.quantizer.acd_pull]
    assert pulled and all(i.kind == "activation" for i in pulled)
    assert all(float(i.variables["pull_lower"]) == 3.0 for i in pulled)
    assert all(float(i.variables["pull_upper"]) == 5.0 for i in pulled)
    with_penalty = qat(x, training=True)
    assert len(qat.losses) == len(pulled)


def test_l2_mode_moves_lower_and_upper_clips_by_their_own_strengths(tiny_model, tiny_data):
    x, y = tiny_data
    qat = tfacd.quantize_model(tiny_model, weight_bits=2, activation_bits=2)
    tfacd.calibrate(qat, x)
    before = {(i.layer, i.tensor): (i.variables["lower"].numpy().copy(),
                                    i.variables["upper"].numpy().copy())
              for i in tfacd.list_quantizers(qat)}
    callback = ClipDecay(mode="l2", lower_strength=0.1, upper_strength=0.3,
                         schedule="constant")
    _frozen_fit(qat, x, y, callback)                         # one step, optimizer frozen
    for info in tfacd.list_quantizers(qat):
        lower, upper = before[(info.layer, info.tensor)]
        np.testing.assert_allclose(info.variables["lower"].numpy(), 0.9 * lower, rtol=1e-6)
        np.testing.assert_allclose(info.variables["upper"].numpy(), 0.7 * upper, rtol=1e-6)
    with pytest.raises(ValueError, match="lower_strength must be in"):
        ClipDecay(mode="l2", lower_strength=1.5)
