"""Numerics of tfacd.ops: the grid, the gradients, the guards."""

import numpy as np
import pytest
import tensorflow as tf

from tfacd import ops


def _grid_index(q, lower, upper, bits):
    step = (upper - lower) / (2 ** bits - 1)
    return (q - lower) / step


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("integer_zero_point", [True, False])
def test_values_lie_on_the_grid_with_at_most_2b_levels(bits, integer_zero_point):
    rng = np.random.default_rng(bits)
    x = rng.normal(size=(16, 5, 5, 6)).astype("float32") * np.arange(1, 7, dtype="float32")
    lower = -np.linspace(0.3, 2.0, 6).astype("float32")
    upper = np.linspace(0.5, 4.0, 6).astype("float32")
    q = ops.quantize_forward(x, lower, upper, bits, axis=-1,
                             integer_zero_point=integer_zero_point).numpy()
    if integer_zero_point:
        lo, hi = (t.numpy() for t in ops.nudge_clips(lower, upper, bits))
    else:
        lo, hi = lower, upper
    index = _grid_index(q, lo, hi, bits)
    np.testing.assert_allclose(index, np.round(index), atol=1e-3)
    assert index.min() > -1e-3 and index.max() < 2 ** bits - 1 + 1e-3
    for c in range(6):
        assert len(np.unique(q[..., c])) <= 2 ** bits


def test_integer_zero_point_puts_zero_on_the_grid():
    lower, upper = tf.constant([-0.37, 0.2, -3.0]), tf.constant([1.11, 0.9, -0.5])
    lo, hi = ops.nudge_clips(lower, upper, 2)
    step = (hi - lo) / 3
    zero_point = (-lo / step).numpy()
    np.testing.assert_allclose(zero_point, np.round(zero_point), atol=1e-5)
    assert np.all(zero_point >= 0) and np.all(zero_point <= 3)
    q = ops.quantize_forward(tf.zeros([4, 3]), lower, upper, 2, axis=-1)
    np.testing.assert_array_equal(q.numpy(), 0.0)


def test_forward_matches_tensorflow_fake_quant():
    # TF's FakeQuantWithMinMaxVarsPerChannel (same nudge, same rounding) is the reference.
    rng = np.random.default_rng(1)
    x = rng.uniform(-2, 2, size=(1000, 4)).astype("float32")
    lower = np.array([-1.0, -0.5, -1.5, 0.0], "float32")
    upper = np.array([1.0, 1.5, 0.5, 1.0], "float32")
    for bits in (2, 3, 8):
        expected = tf.quantization.fake_quant_with_min_max_vars_per_channel(
            x, lower, upper, num_bits=bits).numpy()
        actual = ops.quantize_forward(x, lower, upper, bits, -1).numpy()
        np.testing.assert_allclose(actual, expected, atol=1e-5)


def test_symmetric_step_puts_8bit_weights_on_int8_levels_without_losing_range():
    # The asymmetric 8-bit grid has 256 levels, one more than int8's [-127, 127]: channel 2
    # (z = 128) reaches -128, and one-sided channels reach 255. The symmetric step keeps every
    # level an int8 integer and each channel's whole clip range.
    step = 0.01
    lower = np.array([-200, 0, -128, -55], "float32") * step
    upper = lower + 255 * step
    x = np.random.default_rng(3).uniform(-3, 3, size=(4000, 4)).astype("float32")
    plain = ops.quantize_forward(x, lower, upper, 8, -1).numpy() / step
    assert plain.min() < -127 and plain.max() > 127               # the problem is real
    q = ops.quantize_forward(x, lower, upper, 8, -1, symmetric_step=True).numpy()
    scale = np.maximum(np.abs(lower), np.abs(upper)) / 127
    index = q / scale
    np.testing.assert_allclose(index, np.round(index), atol=1e-3)
    assert np.abs(index).max() <= 127 + 1e-3
    # Nothing is cut: each channel still reaches (within a step) both of its clips.
    assert np.all(np.abs(q.min(axis=0) - lower) <= scale / 2 + 1e-6)
    assert np.all(np.abs(q.max(axis=0) - upper) <= scale / 2 + 1e-6)
    assert np.all(np.abs(q - np.clip(x, lower, upper)) <= scale / 2 + 1e-6)
    # Training sees the same forward values; the clip search uses the same grid.
    trained = ops.fake_quant(x, lower, upper, 8, -1, symmetric_step=True).numpy()
    np.testing.assert_allclose(trained, q, atol=1e-6)
    searched_lower, searched_upper = ops.init_clips_mse(x, 8, -1, symmetric_step=True)
    assert np.all(searched_lower.numpy() < 0) and np.all(searched_upper.numpy() > 0)


def _central_differences(loss, lower, upper, h=1e-6):
    """`[d loss / d lower, d loss / d upper]` per channel by central differences in numpy."""
    grads = []
    for which in range(2):
        grad = np.zeros(len(lower))
        for c in range(len(lower)):
            plus, minus = [lower.copy(), upper.copy()], [lower.copy(), upper.copy()]
            plus[which][c] += h
            minus[which][c] -= h
            grad[c] = (loss(*plus) - loss(*minus)) / (2 * h)
        grads.append(grad)
    return grads


def test_symmetric_4bit_grid_fits_int4_and_keeps_the_clips():
    # The opt-in symmetric grid below 8 bits: at 4 bits every level is an integer in
    # [-7, 7] (int4 storage), at most 15 levels, and values stay inside each channel's clips.
    lower = np.array([-0.9, -0.4, -3.0, 0.0], "float32")
    upper = np.array([0.7, 1.2, 2.5, 0.8], "float32")
    x = np.random.default_rng(5).uniform(-4, 4, size=(4000, 4)).astype("float32")
    q = ops.quantize_forward(x, lower, upper, 4, -1, symmetric_step=True).numpy()
    scale = np.maximum(np.abs(lower), np.abs(upper)) / 7
    index = q / scale
    np.testing.assert_allclose(index, np.round(index), atol=1e-4)
    assert np.abs(np.round(index)).max() == 7
    assert all(len(np.unique(np.round(index[:, c]))) <= 15 for c in range(4))
    assert np.all(q >= lower - scale / 2 - 1e-6) and np.all(q <= upper + scale / 2 + 1e-6)
    assert np.all(np.abs(q - np.clip(x, lower, upper)) <= scale / 2 + 1e-6)
    # The asymmetric 4-bit grid of the same clips does leave int4's range.
    plain = ops.quantize_forward(x, lower, upper, 4, -1).numpy()
    plain_step = np.asarray(ops.grid_step(*ops.effective_clips(lower, upper, 4), 4))
    assert np.round(plain / plain_step).max() > 7
    np.testing.assert_allclose(
        ops.fake_quant(x, lower, upper, 4, -1, symmetric_step=True).numpy(), q, atol=1e-6)


def _symmetric_surrogate(x, lower, upper, residual, limit):
    """`q~ = s (x_c / s + c)` with the residual `c = round(v) - v` frozen, s = max|clip| / L."""
    scale = np.maximum(np.abs(lower), np.abs(upper)) / limit
    return scale * (np.clip(x, lower, upper) / scale + residual)


@pytest.mark.parametrize("bits,limit", [(8, 127), (4, 7)])
def test_symmetric_step_clip_gradients_match_finite_differences(bits, limit):
    rng = np.random.default_rng(11)
    x = rng.normal(size=(256, 3)) * [0.5, 1.0, 2.0]
    weights = rng.normal(size=x.shape)
    lower = np.array([-0.9, -0.4, -3.0])            # channel 0, 2: l sets the step; 1: u does
    upper = np.array([0.7, 1.2, 2.5])
    lo_v, hi_v = tf.Variable(lower, dtype=tf.float32), tf.Variable(upper, dtype=tf.float32)
    with tf.GradientTape() as tape:
        q = ops.fake_quant(tf.constant(x, tf.float32), lo_v, hi_v, bits, axis=-1,
                           symmetric_step=True)
        loss = tf.reduce_sum(q * weights)
    analytic = [g.numpy() for g in tape.gradient(loss, [lo_v, hi_v])]
    scale = np.maximum(np.abs(lower), np.abs(upper)) / limit
    v = np.clip(x, lower, upper) / scale
    inside = (x >= lower) & (x <= upper)
    residual = np.where(inside, np.floor(v + 0.5) - v, 0.0)
    numeric = _central_differences(
        lambda lo, hi: np.sum(weights * _symmetric_surrogate(x, lo, hi, residual, limit)),
        lower, upper)
    for a, n in zip(analytic, numeric):
        np.testing.assert_allclose(a, n, rtol=2e-3, atol=2e-4)


def test_per_channel_equals_per_tensor_when_channels_share_a_range():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(8, 4, 4, 5)).astype("float32")
    per_tensor = ops.fake_quant(x, -1.2, 0.9, 2)
    per_channel = ops.fake_quant(x, tf.fill([5], -1.2), tf.fill([5], 0.9), 2, axis=-1)
    np.testing.assert_array_equal(per_tensor.numpy(), per_channel.numpy())


def test_per_channel_on_a_middle_axis():
    x = tf.random.normal([3, 3, 4, 1], seed=3)            # a depthwise kernel
    lower, upper = -tf.linspace(0.1, 1.0, 4), tf.linspace(0.2, 2.0, 4)
    q = ops.fake_quant(x, lower, upper, 2, axis=2)
    for c in range(4):
        expected = ops.fake_quant(x[:, :, c], lower[c], upper[c], 2)
        np.testing.assert_allclose(q[:, :, c].numpy(), expected.numpy(), atol=1e-6)


def _surrogate(x, lower, upper, bits, residual, axis=-1):
    """numpy float64 `q~ = l + s (v + c)` with the rounding residual `c = round(v) - v` frozen.

    Differentiating `q~` in the clips is exactly what the LSQ+ straight-through estimator
    does, so central differences of `q~` are an independent check of the implementation
    (masks, signs, the rounding term, broadcasting, reductions).
    """
    step = (upper - lower) / (2 ** bits - 1)
    v = (np.clip(x, lower, upper) - lower) / step
    return lower + step * (v + residual)


def _analytic_and_numeric(gradient, bits=2, seed=7):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(64, 4)) * [0.5, 1.0, 2.0, 1.0]
    weights = rng.normal(size=x.shape)                       # a generic upstream gradient
    lower = np.array([-0.6, -1.1, -2.5, -0.3])
    upper = np.array([0.7, 0.9, 3.1, 1.7])
    lo_v, hi_v = tf.Variable(lower, dtype=tf.float32), tf.Variable(upper, dtype=tf.float32)
    with tf.GradientTape() as tape:
        q = ops.fake_quant(tf.constant(x, tf.float32), lo_v, hi_v, bits, axis=-1,
                           gradient=gradient, integer_zero_point=False)
        loss = tf.reduce_sum(q * weights)
    analytic = [g.numpy() for g in tape.gradient(loss, [lo_v, hi_v])]
    step = (upper - lower) / (2 ** bits - 1)
    v = (np.clip(x, lower, upper) - lower) / step
    inside = (x >= lower) & (x <= upper)
    residual = np.where(inside, np.floor(v + 0.5) - v, 0.0) if gradient == "lsq" else 0.0
    numeric = _central_differences(
        lambda lo, hi: np.sum(weights * _surrogate(x, lo, hi, bits, residual)), lower, upper)
    return analytic, numeric


@pytest.mark.parametrize("gradient", ["lsq", "pact"])
def test_clip_gradients_match_finite_differences_of_the_smooth_surrogate(gradient):
    analytic, numeric = _analytic_and_numeric(gradient)
    for a, n in zip(analytic, numeric):
        np.testing.assert_allclose(a, n, rtol=2e-3, atol=2e-4)


def test_lsq_and_pact_differ_by_the_rounding_term():
    # The rounding term is what lets a loss on the quantization error shrink the clips; with
    # PACT's gradient it is absent, so the two must differ.
    lsq, _ = _analytic_and_numeric("lsq")
    pact, _ = _analytic_and_numeric("pact")
    assert np.max(np.abs(lsq[1] - pact[1])) > 0.1


def test_lsq_rounding_term_shrinks_clips_that_are_too_wide():
    # Data in [-1, 1], clips at [-3, 3]: nothing is clipped, so only the rounding term can
    # ask for a smaller range, and the MSE gradient must point inward (dl < 0 < du means
    # gradient descent raises l and lowers u).
    x = tf.constant(np.linspace(-1, 1, 10001, dtype="float32"))
    lower, upper = tf.Variable(-3.0), tf.Variable(3.0)
    with tf.GradientTape() as tape:
        q = ops.fake_quant(x, lower, upper, 2, integer_zero_point=False)
        mse = tf.reduce_mean(tf.square(x - q))
    dl, du = tape.gradient(mse, [lower, upper])
    assert float(dl) < 0 < float(du)


def test_straight_through_and_outside_gradients():
    x = tf.constant([-2.0, -0.5, 0.1, 0.4, 3.0])
    lower, upper = tf.Variable(-1.0), tf.Variable(1.0)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        q = ops.fake_quant(x, lower, upper, 2, gradient="pact", integer_zero_point=False)
        total = tf.reduce_sum(q)
    np.testing.assert_array_equal(tape.gradient(total, x).numpy(), [0, 1, 1, 1, 0])
    assert float(tape.gradient(total, lower)) == 1.0      # one element below l
    assert float(tape.gradient(total, upper)) == 1.0      # one element above u


def test_grad_scale_multiplies_clip_gradients_only():
    x = tf.constant(np.linspace(-2, 2, 101, dtype="float32"))
    lower, upper = tf.Variable(-1.0), tf.Variable(1.0)
    grads = []
    for scale in (1.0, 0.25):
        with tf.GradientTape() as tape:
            tape.watch(x)
            total = tf.reduce_sum(ops.fake_quant(x, lower, upper, 3, grad_scale=scale) * x)
        grads.append(tape.gradient(total, [x, lower, upper]))
    np.testing.assert_allclose(grads[0][0].numpy(), grads[1][0].numpy())
    np.testing.assert_allclose(float(grads[1][1]), 0.25 * float(grads[0][1]), rtol=1e-5)
    np.testing.assert_allclose(float(grads[1][2]), 0.25 * float(grads[0][2]), rtol=1e-5)


def test_sqnr_output_sends_gradients_to_the_clips_only():
    x = tf.Variable(tf.random.normal([50, 3], seed=4))
    lower, upper = tf.Variable(tf.fill([3], -0.5)), tf.Variable(tf.fill([3], 0.5))
    with tf.GradientTape() as tape:
        _, _, _, sqnr = ops.fake_quant_with_stats(x, lower, upper, 2, axis=-1, sqnr_axis=-1)
        loss = -sqnr
    gx, gl, gu = tape.gradient(loss, [x, lower, upper])
    assert gx is None or not np.any(gx.numpy())
    assert np.all(gl.numpy() != 0) and np.all(gu.numpy() != 0)
    q = ops.quantize_forward(x, lower, upper, 2, axis=-1)
    np.testing.assert_allclose(float(sqnr), float(ops.mean_sqnr_db(x, q, -1)), rtol=1e-4)


def test_sqnr_gradient_matches_finite_differences_of_the_surrogate():
    rng = np.random.default_rng(8)
    x = rng.normal(size=(200, 2)) * [1.0, 0.3]
    lower, upper = np.array([-1.2, -0.4]), np.array([0.9, 0.5])
    lo_v, hi_v = tf.Variable(lower, dtype=tf.float32), tf.Variable(upper, dtype=tf.float32)
    with tf.GradientTape() as tape:
        *_, sqnr = ops.fake_quant_with_stats(tf.constant(x, tf.float32), lo_v, hi_v, 2, -1,
                                             integer_zero_point=False, sqnr_axis=-1)
    analytic = [g.numpy() for g in tape.gradient(sqnr, [lo_v, hi_v])]
    step = (upper - lower) / 3
    v = (np.clip(x, lower, upper) - lower) / step
    inside = (x >= lower) & (x <= upper)
    residual = np.where(inside, np.floor(v + 0.5) - v, 0.0)

    def mean_sqnr(lo, hi):
        q = _surrogate(x, lo, hi, 2, residual)
        return np.mean(10 * np.log10(np.sum(x ** 2, 0) / np.sum((x - q) ** 2, 0)))

    h = 1e-6
    for which, grad in enumerate(analytic):
        for c in range(2):
            plus, minus = [lower.copy(), upper.copy()], [lower.copy(), upper.copy()]
            plus[which][c] += h
            minus[which][c] -= h
            numeric = (mean_sqnr(*plus) - mean_sqnr(*minus)) / (2 * h)
            np.testing.assert_allclose(grad[c], numeric, rtol=5e-3, atol=1e-3)


@pytest.mark.parametrize("integer_zero_point", [True, False])
def test_zero_range_channels_never_give_nan(integer_zero_point):
    x = np.zeros([4, 3, 3, 3], "float32")
    x[..., 1] = 0.7                                        # constant channel
    x[..., 2] = np.random.default_rng(5).normal(size=(4, 3, 3))
    lower, upper = ops.init_clips_minmax(x, axis=-1)
    lower_v, upper_v = tf.Variable(lower), tf.Variable(upper)
    xv = tf.Variable(x)
    with tf.GradientTape() as tape:
        q, _, _, sqnr = ops.fake_quant_with_stats(xv, lower_v, upper_v, 2, axis=-1,
                                                  integer_zero_point=integer_zero_point,
                                                  sqnr_axis=-1)
        loss = tf.reduce_sum(q) - sqnr
    grads = tape.gradient(loss, [xv, lower_v, upper_v])
    for t in [q, loss, *grads, *ops.init_clips_mse(x, 2, axis=-1)]:
        assert np.all(np.isfinite(t.numpy()))
    # Even crossed clips (l > u) stay finite: the effective range is at least MIN_RANGE.
    q = ops.fake_quant(x, tf.fill([3], 0.5), tf.fill([3], -0.5), 2, axis=-1)
    assert np.all(np.isfinite(q.numpy()))


@pytest.mark.parametrize("bad", [0, 1, 9, 16, 2.5, "4", None, True])
def test_bits_out_of_range_raise_naming_the_value(bad):
    with pytest.raises(ValueError, match=str(bad).replace(".", r"\.")):
        ops.fake_quant(tf.zeros([2]), -1.0, 1.0, bad)


def test_mse_init_beats_minmax_on_heavy_tailed_channels():
    rng = np.random.default_rng(6)
    x = np.stack([rng.standard_t(3, size=4096) * s for s in (0.1, 1.0, 5.0)], -1)
    x = x.astype("float32")
    for bits in (2, 4):
        errors = {}
        for method in ops.INIT_METHODS:
            lo, hi = ops.init_clips(x, bits, -1, method)
            q = ops.quantize_forward(x, lo, hi, bits, -1)
            errors[method] = np.mean((x - q.numpy()) ** 2, axis=0)
        assert np.all(errors["mse"] <= errors["minmax"] * 1.0001)
        assert np.all(errors["mse"] < 0.9 * errors["minmax"])


def test_minmax_init_is_per_channel_and_includes_zero():
    x = np.array([[1.0, -3.0, 0.5], [2.0, -1.0, 0.7]], "float32")
    lo, hi = ops.init_clips_minmax(x, axis=-1)
    np.testing.assert_allclose(lo.numpy(), [0.0, -3.0, 0.0])
    np.testing.assert_allclose(hi.numpy(), [2.0, 0.0, 0.7])


def test_clip_decay_moves_only_the_unused_range_with_separate_strengths():
    lower, upper = tf.constant([-2.0, -1.0]), tf.constant([3.0, 1.0])
    data_min, data_max = tf.constant([-1.0, -2.0]), tf.constant([1.0, 2.0])
    new_l, new_u = ops.clip_decay(lower, upper, data_min, data_max, 0.5, 0.25)
    # channel 0: 1 unit unused below, 2 above; channel 1: clips inside the data, untouched.
    np.testing.assert_allclose(new_l.numpy(), [-1.5, -1.0])
    np.testing.assert_allclose(new_u.numpy(), [2.5, 1.0])


def test_sqnr_of_a_known_noise():
    x = tf.constant([[1.0, 2.0], [1.0, 2.0]])
    q = x + tf.constant([[0.1, 0.2], [-0.1, -0.2]])
    sqnr, has_signal = ops.sqnr_db_per_channel(x, q, -1)
    np.testing.assert_allclose(sqnr.numpy(), [20.0, 20.0], atol=1e-3)
    np.testing.assert_array_equal(has_signal.numpy(), [1, 1])
    zero = ops.sqnr_db_per_channel(tf.zeros([3, 2]), tf.zeros([3, 2]), -1)
    np.testing.assert_array_equal(zero[1].numpy(), [0, 0])
    assert float(ops.mean_sqnr_db(tf.zeros([3, 2]), tf.zeros([3, 2]), -1)) == 0.0


def test_out_of_range_penalty_is_split_and_reaches_only_x():
    x = tf.Variable([-3.0, 0.0, 2.0])
    lower, upper = tf.Variable(-1.0), tf.Variable(1.0)
    with tf.GradientTape() as tape:
        below, above = ops.out_of_range_penalty(x, lower, upper, None)
        total = below + above
    np.testing.assert_allclose([float(below), float(above)], [4.0 / 3, 1.0 / 3])
    gx, gl, gu = tape.gradient(total, [x, lower, upper])
    np.testing.assert_allclose(gx.numpy(), [-4.0 / 3, 0.0, 2.0 / 3])
    assert gl is None and gu is None


def test_mse_search_samples_the_whole_map_not_one_column():
    # NHWC activations whose left border column is zero (a padding effect) and whose interior
    # spans [0, 6]. An evenly strided row sample (stride 32 on 32-wide maps) saw only the zero
    # column and clipped the channel to nothing; the search must see the interior.
    x = np.random.default_rng(9).uniform(0, 6, size=(64, 32, 32, 4)).astype("float32")
    x[:, :, 0, :] = 0.0
    for bits in (2, 8):
        lower, upper = ops.init_clips_mse(x, bits, axis=-1)
        np.testing.assert_allclose(lower.numpy(), 0.0)
        assert np.all(upper.numpy() > 0.6 * 6.0), upper.numpy()
        q = ops.quantize_forward(x, lower, upper, bits, -1).numpy()
        assert np.mean((x - q) ** 2) < 0.2 * np.var(x)
