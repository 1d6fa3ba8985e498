"""tfacd.kernels: the C++ quantizer kernels compute what the formulas (and the XLA functions)
compute, over several blocks and threads, and tfacd falls back cleanly without them."""

import warnings

import numpy as np
import pytest
import tensorflow as tf

from tfacd import kernels, ops


@pytest.fixture(scope="module")
def library():
    """The C++ ops. Where they cannot be built (no compiler) tfacd runs on XLA and these tests
    skip, unless TFACD_KERNELS=cpp (what .ci/run sets), where the build failing is an error."""
    lib = kernels.library()
    if lib is None:
        pytest.skip(f"C++ kernels unavailable here (TFACD_KERNELS={kernels.backend_setting()}); "
                    "tfacd runs on the XLA functions")
    return lib


def _float32_formula(rows, lower, upper, levels, integer_zero_point, symmetric_step):
    """The forward formula of tfacd.ops, evaluated by numpy in float32, op by op."""
    f = np.float32
    clipped = np.minimum(np.maximum(rows, lower), upper)
    if symmetric_step:
        scale = np.maximum(np.abs(lower), np.abs(upper)) / f((levels - 1) * 0.5)
        return np.floor(clipped * (f(1) / scale) + f(0.5)) * scale
    scale = (upper - lower) / f(levels)
    zero_point = -lower / scale
    if integer_zero_point:
        zero_point = np.round(zero_point)          # ties to even, as tf.round
    return (np.floor((clipped - lower) * (f(1) / scale) + f(0.5)) - zero_point) * scale


def _clips(rng, channels, per_channel, bits, integer_zero_point, symmetric_step):
    shape = (channels,) if per_channel else ()
    lower = rng.uniform(-3.0, -0.1, shape).astype(np.float32)
    upper = rng.uniform(0.1, 3.0, shape).astype(np.float32)
    if per_channel:
        lower[0], upper[0] = 0.0, 1e-6            # a dead channel: range at its minimum
    lower, upper = ops.effective_clips(lower, upper, bits, integer_zero_point, symmetric_step)
    if per_channel:
        return tf.reshape(lower, [1, -1]), tf.reshape(upper, [1, -1])
    return lower, upper


# Rows enough for several blocks of the kernels' row split (32768 / C rows each).
ROWS, CHANNELS = 20_000, 7


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("symmetric_step", [False, True])
@pytest.mark.parametrize("integer_zero_point", [True, False])
def test_forward_is_the_formula_in_float32_and_sums_every_block(
        library, per_channel, symmetric_step, integer_zero_point):
    rng = np.random.default_rng(int(per_channel) + 2 * symmetric_step + 4 * integer_zero_point)
    rows = (rng.normal(size=(ROWS, CHANNELS)) * 2).astype(np.float32)
    bits = 2
    lower, upper = _clips(rng, CHANNELS, per_channel, bits, integer_zero_point, symmetric_step)
    q, data_min, data_max, signal, noise = library.tfacd_fake_quant_forward(
        rows, lower, upper, levels=float(ops.num_levels(bits)),
        integer_zero_point=integer_zero_point, symmetric_step=symmetric_step, with_noise=True,
        input_min=-np.inf, input_max=np.inf)
    expected = _float32_formula(rows, lower.numpy(), upper.numpy(), ops.num_levels(bits),
                                integer_zero_point, symmetric_step)
    np.testing.assert_array_equal(q.numpy(), expected)
    np.testing.assert_array_equal(data_min.numpy(), rows.min(axis=0))
    np.testing.assert_array_equal(data_max.numpy(), rows.max(axis=0))
    rows64, q64 = rows.astype(np.float64), expected.astype(np.float64)
    np.testing.assert_allclose(signal.numpy(), (rows64 ** 2).sum(axis=0), rtol=1e-5)
    np.testing.assert_allclose(noise.numpy(), ((rows64 - q64) ** 2).sum(axis=0), rtol=1e-5)


@pytest.mark.parametrize("symmetric_step", [False, True])
@pytest.mark.parametrize("lsq", [True, False])
def test_backward_is_the_formula_summed_over_every_block(library, symmetric_step, lsq):
    rng = np.random.default_rng(10 + symmetric_step + 2 * lsq)
    rows = (rng.normal(size=(ROWS, CHANNELS)) * 2).astype(np.float32)
    dq = rng.normal(size=rows.shape).astype(np.float32)
    dnoise = rng.uniform(0.0, 1.0, (1, CHANNELS)).astype(np.float32)
    lower, upper = _clips(rng, CHANNELS, True, 3, True, symmetric_step)
    dx, dl, du = library.tfacd_fake_quant_backward(
        rows, dq, dnoise, lower, upper, levels=7.0, integer_zero_point=True,
        symmetric_step=symmetric_step, lsq=lsq, input_min=-np.inf, input_max=np.inf)
    lo, hi = lower.numpy().astype(np.float64), upper.numpy().astype(np.float64)
    q = _float32_formula(rows, lower.numpy(), upper.numpy(), 7, True,
                         symmetric_step).astype(np.float64)
    x, g = rows.astype(np.float64), dq.astype(np.float64)
    below, above = x < lo, x > hi
    inside = ~(below | above)
    np.testing.assert_array_equal(dx.numpy(), np.where(inside, dq, 0.0))
    dclip = g - 2.0 * dnoise * (x - q)
    want_l = np.where(below, dclip, 0.0)
    want_u = np.where(above, dclip, 0.0)
    if lsq:
        largest = np.maximum(np.abs(lo), np.abs(hi))
        rounding = np.where(inside, dclip * (q - x) / (largest if symmetric_step else hi - lo),
                            0.0)
        upper_sets = (hi >= -lo) if symmetric_step else np.ones_like(hi, bool)
        lower_gets = ~upper_sets if symmetric_step else np.ones_like(hi, bool)
        want_l = want_l - rounding * lower_gets
        want_u = want_u + rounding * upper_sets
    scale = np.abs(want_l).sum(axis=0) + np.abs(want_u).sum(axis=0)
    np.testing.assert_allclose(dl.numpy(), want_l.sum(axis=0), atol=1e-5 * scale.max())
    np.testing.assert_allclose(du.numpy(), want_u.sum(axis=0), atol=1e-5 * scale.max())


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("gradient", ["lsq", "pact"])
@pytest.mark.parametrize("symmetric_step", [False, True])
def test_cpp_and_xla_quantizers_agree(library, per_channel, gradient, symmetric_step):
    """The same quantizer, with SQNR, through each backend: values, statistics, gradients."""
    rng = np.random.default_rng(3)
    x = tf.constant((rng.normal(size=(8, 16, 16, 12)) * 2).astype(np.float32))
    shape = (12,) if per_channel else ()
    lower = tf.Variable(rng.uniform(-2.0, -0.2, shape).astype(np.float32))
    upper = tf.Variable(rng.uniform(0.2, 2.0, shape).astype(np.float32))
    results = {}
    for backend in ("cpp", "xla"):
        with kernels.forced(backend), tf.GradientTape() as tape:
            tape.watch(x)
            q, data_min, data_max, sqnr = ops.fake_quant_with_stats(
                x, lower, upper, 4, -1 if per_channel else None, gradient=gradient,
                symmetric_step=symmetric_step, sqnr_axis=-1)
            loss = tf.reduce_sum(q * tf.cos(x)) - 0.1 * sqnr
        results[backend] = [q, data_min, data_max, sqnr,
                            *tape.gradient(loss, [x, lower, upper])]
    cpp, xla = ([t.numpy() for t in results[b]] for b in ("cpp", "xla"))
    # XLA's arithmetic is not exactly the float32 formula: a value at a rounding tie may
    # land one step apart (2 in 75M elements measured; none here).
    assert np.mean(cpp[0] != xla[0]) < 1e-4
    for got, want in zip(cpp[1:3], xla[1:3]):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(cpp[3], xla[3], rtol=1e-5)
    np.testing.assert_array_equal(cpp[4], xla[4])                       # dx
    for got, want in zip(cpp[5:], xla[5:]):                              # dl, du
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("relu", ["relu", "relu6"])
@pytest.mark.parametrize("per_channel", [True, False])
def test_a_relu_fused_into_the_quantizer_changes_no_number(library, relu, per_channel):
    """Traced, a quantizer after a ReLU/ReLU6 op reads the ReLU's input and does the ReLU
    itself (ops.fusible_relu); with an Identity between them nothing is fused. Both give
    the same values and gradients, the ReLU's own gradient included."""
    activation = {"relu": tf.nn.relu, "relu6": tf.nn.relu6}[relu]
    rng = np.random.default_rng(4)
    # Pre-activations on both sides of 0 and 6, some exactly at them.
    z = (rng.normal(size=(4, 9, 9, 5)) * 4 + 2).astype(np.float32)
    z[0, 0, 0, :] = [0.0, 6.0, -1.0, 7.0, 3.0]
    z = tf.constant(z)
    shape = (5,) if per_channel else ()
    lower = tf.Variable(np.full(shape, 0.0, np.float32))
    upper = tf.Variable(rng.uniform(3.0, 7.5, shape).astype(np.float32))

    def run(z, fuse):
        with tf.GradientTape() as tape:
            tape.watch(z)
            a = activation(z) if fuse else tf.identity(activation(z))
            q, data_min, data_max, sqnr = ops.fake_quant_with_stats(
                a, lower, upper, 3, -1 if per_channel else None, sqnr_axis=-1)
            loss = tf.reduce_sum(q * tf.sin(z)) - 0.1 * sqnr
        return [q, data_min, data_max, sqnr, *tape.gradient(loss, [z, lower, upper])]

    fused_fn, plain_fn = tf.function(lambda z: run(z, True)), tf.function(lambda z: run(z, False))
    bounds = {}
    for name, function in (("fused", fused_fn), ("plain", plain_fn)):
        graph = function.get_concrete_function(z).graph
        bounds[name] = [(op.get_attr("input_min"), op.get_attr("input_max"))
                        for op in graph.get_operations()
                        if op.type in ("TfacdFakeQuantForward", "TfacdFakeQuantBackward")]
    assert bounds["fused"] == [(0.0, 6.0 if relu == "relu6" else np.inf)] * 2
    assert bounds["plain"] == [(-np.inf, np.inf)] * 2
    fused = [t.numpy() for t in fused_fn(z)]
    eager = [t.numpy() for t in plain_fn(z)]
    for got, want in zip(fused[:3], eager[:3]):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(fused[3], eager[3], rtol=1e-6)
    np.testing.assert_array_equal(fused[4], eager[4])                   # dz: ReLU's mask
    for got, want in zip(fused[5:], eager[5:]):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


def test_a_quantizer_inside_an_xla_compiled_function_runs_on_the_xla_functions(library):
    """XLA has no kernel for tfacd's C++ ops: under `jit_compile=True` (e.g. a user's
    `model.compile(jit_compile=True)`) the quantizer uses the XLA functions instead."""
    x = tf.constant(np.linspace(-3.0, 3.0, 60, dtype=np.float32).reshape(2, 5, 6))
    lower, upper = tf.Variable(-np.ones(6, np.float32)), tf.Variable(np.ones(6, np.float32))

    def quantize(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            q = ops.fake_quant(tf.nn.relu6(x), lower, upper, 2, axis=-1)
        return [q, *tape.gradient(q, [x, lower, upper], output_gradients=tf.cos(x))]

    compiled = tf.function(quantize, jit_compile=True)
    graph_ops = {op.type for op in compiled.get_concrete_function(x).graph.get_operations()}
    assert not any(name.startswith("Tfacd") for name in graph_ops)
    for got, want in zip(compiled(x), tf.function(quantize)(x)):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-6, atol=1e-6)


def test_kernels_reject_clips_of_the_wrong_size(library):
    with pytest.raises(tf.errors.InvalidArgumentError, match="clips must have 1 or 4"):
        library.tfacd_fake_quant_forward(tf.zeros([3, 4]), tf.zeros([3]), tf.ones([3]),
                                         levels=3.0, integer_zero_point=True,
                                         symmetric_step=False, with_noise=False,
                                         input_min=-np.inf, input_max=np.inf)


def test_a_bad_backend_setting_is_named(monkeypatch):
    monkeypatch.setenv("TFACD_KERNELS", "cuda")
    with pytest.raises(ValueError, match="'cuda'"):
        ops.fake_quant(tf.zeros([2, 3]), -1.0, 1.0, 2)
    with pytest.raises(ValueError, match="'fast'"):
        with kernels.forced("fast"):
            pass


def test_without_a_compiler_tfacd_warns_once_and_runs_on_xla(monkeypatch, tmp_path):
    monkeypatch.setattr(kernels, "_library", None)
    monkeypatch.setattr(kernels, "_failure", None)
    monkeypatch.setenv("TFACD_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("TFACD_KERNELS", "auto")
    x = tf.constant(np.linspace(-2.0, 2.0, 24, dtype=np.float32).reshape(4, 6))
    with pytest.warns(RuntimeWarning, match="using the XLA functions"):
        q = ops.fake_quant(x, -1.0, 1.0, 2)
    assert kernels.backend() == "xla"
    with warnings.catch_warnings():
        warnings.simplefilter("error")                  # once: no second warning
        np.testing.assert_array_equal(ops.fake_quant(x, -1.0, 1.0, 2).numpy(), q.numpy())
    lower, upper = (t.numpy() for t in ops.effective_clips(-1.0, 1.0, 2))
    np.testing.assert_array_equal(q.numpy(),
                                  _float32_formula(x.numpy(), lower, upper, 3, True, False))
    monkeypatch.setenv("TFACD_KERNELS", "cpp")
    with pytest.raises(RuntimeError, match="TFACD_KERNELS=cpp"):
        kernels.library()
