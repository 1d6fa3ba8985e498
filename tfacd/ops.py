"""The quantization math of tfacd, in one place.

Everything here is TensorFlow on tensors, no Keras, no tfmot; the quantizer's two elementwise
passes run in tfacd's own C++ ops (`tfacd.kernels`) where they build, else in XLA. The
Keras/tfmot glue lives in `tfacd.quantizers`; this module only says what numbers come out and
which gradients flow back.

Notation (used in every docstring below)
---------------------------------------
* `b` bits, `n = 2^b - 1` quantization steps.
* `l`, `u` the lower and upper clipping values, one pair per tensor or per channel.
* `s = (u - l) / n` the step.
* `v = (clip(x, l, u) - l) / s` the input in step units, `k = round(v)` its grid index.

Forward pass (asymmetric uniform fake quantization)::

    q(x) = l + s * round((clip(x, l, u) - l) / s)

With `integer_zero_point=True` (the default of the quantizers) the grid origin is first moved
to a multiple of the step, the way TensorFlow's `FakeQuant*` ops and every integer inference
engine (TFLite) need it, so that zero is exactly representable and the exported integer model
holds the same values::

    z = clamp(round(-l / s), 0, n),   l' = -z * s,   u' = l' + n * s

and `(l', u')` replace `(l, u)` in the formula above. The move is at most `s / 2`; gradients
pass straight through it (`dl'/dl = du'/du = 1`).

8-bit weights (`symmetric_step=True`, what the weight quantizers use at 8 bits) take their
step from the larger clip instead, so that every level is an int8 integer in `[-127, 127]`,
as TFLite's int8 weights (symmetric, zero point 0) require::

    s = max(|l|, |u|) / L,   q(x) = s * round(clip(x, l, u) / s),   L = 2^(b-1) - 1

(`L = 127` at 8 bits.) The same grid at fewer bits is opt-in
(`QuantizeScheme(symmetric_weights=True)`): at 4 bits its integers lie in `[-7, 7]`, which
int4 storage holds (`tfacd.export.pack_int4_weights`) also after a batch-norm fold flips a
channel's sign; the asymmetric 4-bit grid `[-z, 15 - z]` fits int4's `[-8, 7]` only for
`z = 8`. It has `2L + 1` levels (15 at 4 bits, 3 at 2 bits), and a channel whose clips are
one-sided uses only those on its side.

Below 8 bits the nudged asymmetric grid's indices `[-z, n - z]` already lie inside
`[-127, 127]`; at 8 bits it has 256 levels and int8's symmetric range 255, so a weight on level
`-128` (or `128`) would be changed by the export, and a 2-bit network downstream is chaotic
enough to turn that one-step change into different predictions (measured: 3 such weights
cost a trained W2A2 model 29% of its top-1 agreement). The clips stay asymmetric and
learnable; a one-sided channel uses fewer than 255 levels (at least 128), an 8-bit grid's
worth of precision either way.

Backward pass (LSQ+ style, the default)::

    dq/dx = 1                 if l <= x <= u, else 0          (straight-through estimator)
    dq/du = (k - v) / n       if l <= x <= u;  1 if x > u;  0 if x < l
    dq/dl = -(k - v) / n      if l <= x <= u;  0 if x > u;  1 if x < l

With `symmetric_step` the inside-range term goes to the clip that sets the step,
`(q - x) / max(|l|, |u|)` to `u` when `u >= -l`, its negative to `l` otherwise (LSQ's
`dq/ds = round(x/s) - x/s` times `ds/du = 1/L` or `ds/dl = -1/L`, at any `L`); the clipped
terms are unchanged.

Both clip gradients are multiplied by the LSQ gradient scale `g = 1 / sqrt(N * n)`, where
`N` is the number of elements that share one clip (per sample, for activations). The
inside-range term `(k - v) / n` is the rounding error's dependence on the step; without it a
loss on the quantization error could only ever widen the clips.

The PACT-style backward pass (`gradient="pact"`) keeps only the clipped elements::

    dq/du = 1 if x > u else 0,   dq/dl = 1 if x < l else 0

which is what `tf.quantization.fake_quant_with_min_max_vars*` provide.

SQNR (`fake_quant_with_stats(..., sqnr_axis=...)`), per channel `c`::

    SQNR_c = 10 log10(sum x^2 / (sum (x - q)^2 + eps))

Its gradient reaches the clips through the same terms (the noise power's derivative,
`-2 (x - q)`, is fed to `dq/dl`, `dq/du`) and never reaches `x`, so a loss on it tunes clips.

The rounding is half up, `floor(v + 0.5)`, as in TensorFlow's FakeQuant kernels, whose output
this reproduces for the same (nudged) clips.

References:
* Esser et al., "Learned Step Size Quantization", ICLR 2020 (arXiv:1902.08153).
* Bhalgat et al., "LSQ+: Improving low-bit quantization through learnable offsets and better
  initialization", CVPR Workshops 2020 (arXiv:2004.09576).
* Choi et al., "PACT: Parameterized Clipping Activation for Quantized Neural Networks",
  2018 (arXiv:1805.06085).
* Jacob et al., "Quantization and Training of Neural Networks for Efficient
  Integer-Arithmetic-Only Inference", CVPR 2018 (the zero-point nudge).
"""

from __future__ import annotations

import math

import tensorflow as tf
from tensorflow.python.ops import control_flow_util  # pylint: disable=no-name-in-module

from tfacd import kernels

MIN_BITS = 2
MAX_BITS = 8

#: The smallest clipping range. Keeps `s > 0` for channels whose data range is zero (dead ReLU
#: channels, constant depthwise filters), so no division by zero in forward or backward.
MIN_RANGE = 1e-6


GRADIENTS = ("lsq", "pact")


def check_bits(num_bits) -> int:
    """Returns `num_bits` as an int, or raises a `ValueError` that names the bad value."""
    if isinstance(num_bits, bool) or not isinstance(num_bits, (int,)) and not (
            isinstance(num_bits, float) and float(num_bits).is_integer()):
        raise ValueError(f"num_bits must be an integer from {MIN_BITS} to {MAX_BITS}, "
                         f"got {num_bits!r}")
    num_bits = int(num_bits)
    if not MIN_BITS <= num_bits <= MAX_BITS:
        raise ValueError(f"num_bits must be from {MIN_BITS} to {MAX_BITS}, got {num_bits}")
    return num_bits


def check_gradient(gradient: str) -> str:
    if gradient not in GRADIENTS:
        raise ValueError(f"gradient must be one of {GRADIENTS}, got {gradient!r}")
    return gradient


def num_levels(num_bits: int) -> int:
    """`n = 2^b - 1`, the number of steps between the lowest and the highest level."""
    return 2 ** check_bits(num_bits) - 1


def ordered_clips(lower, upper):
    """The effective clips `(l, max(u, l + MIN_RANGE))`: `l < u` always holds in the math.

    The stored variables may cross (an optimizer step can push them past each other); the
    forward pass never sees that. Where the range is at its minimum, the upper clip's gradient
    goes to the lower clip, so training moves the pair together.
    """
    lower = tf.convert_to_tensor(lower, tf.float32)
    upper = tf.convert_to_tensor(upper, tf.float32)
    return lower, lower + tf.maximum(upper - lower, MIN_RANGE)


def nudge_clips(lower, upper, num_bits: int):
    """Moves `(l, u)` so that zero lies exactly on the grid (TF's `FakeQuant` nudge).

    Returns `(l', u')` with `l' = -z s`, `u' = (n - z) s`, `z = clamp(round(-l / s), 0, n)`.
    Rounding is half away from zero, as in TensorFlow's kernel, so the fused op applied to the
    nudged clips reproduces them exactly. Gradients pass straight through the rounding.
    """
    n = float(num_levels(num_bits))
    lower, upper = ordered_clips(lower, upper)
    scale = (upper - lower) / n
    zero_point = tf.clip_by_value(-lower / scale, 0.0, n)
    zero_point = tf.sign(zero_point) * tf.floor(tf.abs(zero_point) + 0.5)
    nudged_lower = -zero_point * scale
    # Straight-through: forward takes the nudged value, backward treats it as the identity.
    nudged_lower = lower + tf.stop_gradient(nudged_lower - lower)
    return nudged_lower, nudged_lower + n * scale


def _channel_shape(rank: int, axis: int | None):
    """Shape that broadcasts a `[C]` vector of clips along `axis` of a rank-`rank` tensor."""
    if axis is None:
        return None
    shape = [1] * rank
    shape[axis] = -1
    return shape


def _other_axes(rank: int, axis: int | None) -> tuple:
    axis = None if axis is None else axis % rank
    return tuple(d for d in range(rank) if d != axis)


def _reduce_to_clip(t, axis: int | None):
    """Sums `t` over every dimension except the channel `axis` (over all when per tensor)."""
    return tf.reduce_sum(t, axis=_other_axes(t.shape.rank, axis))


def _normalize_axis(x, axis):
    if axis is None:
        return None
    rank = x.shape.rank
    if not -rank <= axis < rank:
        raise ValueError(f"axis {axis} is out of range for a tensor of rank {rank}")
    return axis % rank


def _plain_fake_quant(x, lower, upper, num_bits: int, axis: int | None,
                      symmetric_step: bool = False):
    """The forward formula with plain broadcasting ops (clip search, arbitrary layouts).

    Rounds half up, `floor(v + 0.5)`, like TensorFlow's FakeQuant kernels.
    """
    shape = _channel_shape(x.shape.rank, axis)
    if shape is not None:
        lower, upper = tf.reshape(lower, shape), tf.reshape(upper, shape)
    clipped = tf.minimum(tf.maximum(x, lower), upper)
    scale = grid_step(lower, upper, num_bits, symmetric_step)
    if symmetric_step:
        return scale * tf.floor(clipped / scale + 0.5)
    return lower + scale * tf.floor((clipped - lower) / scale + 0.5)


def symmetric_limit(num_bits: int) -> int:
    """`L = 2^(b-1) - 1`, the number of steps on each side of zero of a `symmetric_step` grid
    (127 at 8 bits: TFLite's int8 weights, symmetric with zero point 0; 7 at 4 bits)."""
    return 2 ** (check_bits(num_bits) - 1) - 1


def symmetric_scale(lower, upper, limit):
    """`s = max(|l|, |u|) / L`, the step of a `symmetric_step` grid (> 0 since u - l > 0)."""
    return tf.maximum(tf.abs(lower), tf.abs(upper)) / limit


def grid_step(lower, upper, num_bits: int, symmetric_step: bool = False):
    """The step `s` of the grid that effective clips `(l, u)` (`effective_clips`) define."""
    if symmetric_step:
        return symmetric_scale(lower, upper, float(symmetric_limit(num_bits)))
    return (upper - lower) / float(num_levels(num_bits))


# The elementwise work of a quantizer: as separate TF ops, the forward and the backward pass
# each read and write the whole activation tensor about ten times (and TF's own per-channel
# FakeQuant kernel is slower still, ~15x a ReLU on NHWC data). Each pass is one sweep in
# tfacd's C++ kernels (`tfacd.kernels`, vectorized, on every core), or, where those cannot
# be built, in the two XLA-compiled functions below (each loop fusion on one thread: about
# 2-3x slower). Both compute the formulas of the module docstring; convolutions stay on
# TensorFlow's own kernels (XLA's CPU convolutions are far slower).

def _on_grid(x, lower, upper, levels, integer_zero_point, symmetric_step):
    """`q(x)` of the module docstring (inside the fused passes; `levels` is `n`)."""
    clipped = tf.minimum(tf.maximum(x, lower), upper)
    if symmetric_step:
        # n = 2^b - 1 = 2L + 1.
        scale = symmetric_scale(lower, upper, (levels - 1.0) * 0.5)
        return tf.floor(clipped * (1.0 / scale) + 0.5) * scale
    scale = (upper - lower) / levels
    # q = (k - z) s with z = -l / s: with a nudged l, z is an integer and zero maps to
    # exactly 0.0 (k s + l would leave a rounding residue of ~1e-8).
    zero_point = tf.round(-lower / scale) if integer_zero_point else -lower / scale
    return (tf.floor((clipped - lower) * (1.0 / scale) + 0.5) - zero_point) * scale


def _sum_pair(a, b, axis):
    """`(sum(a), sum(b))` over `axis` in one reduction: XLA's CPU reductions cost more than
    the elementwise work around them (each about a ReLU's sweep over the tensor), and a
    complex64 sum carries both float32 sums, exactly as two reductions would, in one sweep."""
    total = tf.reduce_sum(tf.complex(a, b), axis=axis)
    return tf.math.real(total), tf.math.imag(total)


@tf.function(jit_compile=True, autograph=False)
def _fused_forward(x, lower, upper, levels, clip_axes, stat_axes, with_noise,
                   integer_zero_point, symmetric_step):
    """q, per-clip data min/max and, optionally, per-channel signal and noise powers."""
    q = _on_grid(x, lower, upper, levels, integer_zero_point, symmetric_step)
    outputs = [q, tf.reduce_min(x, axis=clip_axes), tf.reduce_max(x, axis=clip_axes)]
    if with_noise:
        outputs += list(_sum_pair(tf.square(x), tf.square(x - q), stat_axes))
    return outputs


@tf.function(jit_compile=True, autograph=False)
def _fused_backward(x, dq, dnoise, lower, upper, levels, clip_axes, lsq,
                    integer_zero_point, symmetric_step):
    """dx, dl, du of the module docstring; `dnoise` feeds the clips only (SQNR loss).

    `q` is recomputed rather than kept from the forward pass: reading it back costs more
    than the arithmetic."""
    q = _on_grid(x, lower, upper, levels, integer_zero_point, symmetric_step)
    below = x < lower
    above = x > upper
    inside = tf.logical_not(tf.logical_or(below, above))
    zeros = tf.zeros_like(x)
    dx = tf.where(inside, dq, zeros)
    # d(sum (x - q)^2)/dq = -2 (x - q): the noise power's gradient, sent to the clips only.
    dclip = dq - 2.0 * dnoise * (x - q)
    dl = tf.where(below, dclip, zeros)
    du = tf.where(above, dclip, zeros)
    if lsq and symmetric_step:
        # s = max(|l|, |u|) / L: only the clip that sets the step gets the rounding term.
        largest = tf.maximum(tf.abs(lower), tf.abs(upper))
        rounding = tf.where(inside, dclip * (q - x) / largest, zeros)
        upper_sets_step = tf.cast(upper >= -lower, tf.float32)
        dl = dl - rounding * (1.0 - upper_sets_step)
        du = du + rounding * upper_sets_step
    elif lsq:
        # (k - v) / n = (q - x) / (u - l) inside the range.
        rounding = tf.where(inside, dclip * (q - x) / (upper - lower), zeros)
        dl = dl - rounding
        du = du + rounding
    return (dx,) + _sum_pair(dl, du, clip_axes)


NO_RELU = (-math.inf, math.inf)


def _cpp_library():
    """tfacd's C++ ops, or None where they cannot run: not built (`tfacd.kernels`), or inside
    a function XLA compiles (`jit_compile=True`), which has no kernel for them."""
    if control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()):
        return None
    return kernels.library()


def _forward_pass(rows, lower, upper, levels: float, with_noise: bool,
                  integer_zero_point: bool, symmetric_step: bool, relu=NO_RELU):
    """`_fused_forward` on `[rows, C]`, in tfacd's C++ kernel where it is built
    (`tfacd.kernels`: same math, one vectorized multi-threaded sweep), else in XLA.
    `relu`: the `(floor, ceiling)` of a ReLU fused in front (`fusible_relu`; C++ only)."""
    library = _cpp_library()
    if library is None:
        return _fused_forward(rows, lower, upper, tf.constant(levels), (0,), (0,), with_noise,
                              integer_zero_point, symmetric_step)
    outputs = library.tfacd_fake_quant_forward(
        rows, lower, upper, levels=levels, integer_zero_point=integer_zero_point,
        symmetric_step=symmetric_step, with_noise=with_noise, input_min=relu[0],
        input_max=relu[1])
    return list(outputs) if with_noise else list(outputs[:3])


def _backward_pass(rows, dq, dnoise, lower, upper, levels: float, lsq: bool,
                   integer_zero_point: bool, symmetric_step: bool, relu=NO_RELU):
    """`_fused_backward` on `[rows, C]` (see `_forward_pass`): `(dx, dl, du)`."""
    library = _cpp_library()
    if library is None:
        return _fused_backward(rows, dq, dnoise, lower, upper, tf.constant(levels), (0,), lsq,
                               integer_zero_point, symmetric_step)
    return tuple(library.tfacd_fake_quant_backward(
        rows, dq, dnoise, lower, upper, levels=levels, integer_zero_point=integer_zero_point,
        symmetric_step=symmetric_step, lsq=lsq, input_min=relu[0], input_max=relu[1]))


_RELU_BOUNDS = {"Relu": (0.0, math.inf), "Relu6": (0.0, 6.0)}


def apply_relu(x, relu):
    """`clamp(x, *relu)`: the ReLU that `fusible_relu` found, recomputed where something other
    than the quantizer needs its output (e.g. a lazy clip initialization)."""
    if relu == NO_RELU:
        return x
    return tf.minimum(tf.maximum(x, relu[0]), relu[1])


def fusible_relu(x):
    """`(relu input, (floor, ceiling))` when `x` is a ReLU/ReLU6 op's output in a graph being
    traced and the C++ kernels are in use, else `(x, NO_RELU)`. `fake_quant_with_stats` and
    `quantize_forward` call it themselves.

    The kernels then quantize `clamp(input, floor, ceiling)` and pass the gradient where
    `floor < input < ceiling`: the same numbers as the ReLU op followed by the quantizer,
    and the ReLU's gradient op after the quantizer's. Nothing reads the ReLU op's output any
    more, so TensorFlow prunes it and its gradient (as long as the caller does not read the
    ReLU's output either: see `apply_relu`): a sweep over the tensor fewer in each pass, and
    most of a MobileNetV2's activations follow a ReLU6."""
    if tf.executing_eagerly() or not hasattr(x, "op") or x.dtype != tf.float32:
        return x, NO_RELU
    bounds = _RELU_BOUNDS.get(x.op.type)
    if bounds is None or _cpp_library() is None:
        return x, NO_RELU
    return x.op.inputs[0], bounds


def _to_rows(x, channel_axis: int):
    """`x` as `[rows, C]` with the channel axis last: XLA's CPU reductions over the leading
    axis of a 2-D array are ~7x faster than over three axes of NHWC. Returns the rows and a
    function that turns a rows-shaped tensor back into `x`'s layout."""
    rank = x.shape.rank
    shape = tf.shape(x)
    if channel_axis == rank - 1:
        return tf.reshape(x, [-1, x.shape[-1]]), lambda rows: tf.reshape(rows, shape)
    perm = [d for d in range(rank) if d != channel_axis] + [channel_axis]
    inverse = [perm.index(d) for d in range(rank)]
    moved_shape = tf.gather(shape, perm)
    rows = tf.reshape(tf.transpose(x, perm), [-1, x.shape[channel_axis]])
    return rows, lambda r: tf.transpose(tf.reshape(r, moved_shape), inverse)


def _prepare(x, lower, upper, num_bits, axis, integer_zero_point, channel_axis,
             symmetric_step=False):
    """Shared set-up of the fused passes: checked args, clips, and `x` as rows."""
    num_bits = check_bits(num_bits)
    x = tf.convert_to_tensor(x, tf.float32)
    axis = _normalize_axis(x, axis)
    if axis is not None:
        channel_axis = axis
    lower, upper = effective_clips(lower, upper, num_bits, integer_zero_point, symmetric_step)
    if axis is not None:
        lower, upper = tf.reshape(lower, [1, -1]), tf.reshape(upper, [1, -1])
    rows, restore = _to_rows(x, _normalize_axis(x, channel_axis))
    # XLA reduces rows over axis 0 only (its fast pattern); per-tensor clips then reduce the
    # per-column results outside, on C values.
    finish = (lambda t, reduce: t) if axis is not None else (lambda t, reduce: reduce(t))
    return x, rows, restore, lower, upper, finish, float(num_levels(num_bits))


def effective_clips(lower, upper, num_bits: int, integer_zero_point: bool = True,
                    symmetric_step: bool = False):
    """The `(l, u)` the forward pass uses: ordered, and nudged where the grid needs it (a
    `symmetric_step` grid has zero on it already)."""
    if integer_zero_point and not symmetric_step:
        return nudge_clips(lower, upper, num_bits)
    return ordered_clips(lower, upper)


def quantize_forward(x, lower, upper, num_bits: int, axis: int | None = None,
                     integer_zero_point: bool = True, symmetric_step: bool = False):
    """The forward pass only (no custom gradient): inference and measurements."""
    x, relu = fusible_relu(tf.convert_to_tensor(x, tf.float32))
    _, rows, restore, lower, upper, _, levels = _prepare(
        x, lower, upper, num_bits, axis, integer_zero_point, x.shape.rank - 1, symmetric_step)
    return restore(_forward_pass(rows, lower, upper, levels, False, integer_zero_point,
                                 symmetric_step, relu)[0])


def fake_quant_with_stats(x, lower, upper, num_bits: int, axis: int | None = None, *,
                          gradient: str = "lsq", integer_zero_point: bool = True,
                          grad_scale: float = 1.0, sqnr_axis: int | None = None,
                          symmetric_step: bool = False):
    """`q(x)` with the gradients of the module docstring, plus statistics from the same sweep.

    Args:
      x: float tensor.
      lower, upper: clips; scalars (per tensor) or `[C]` vectors along `axis` (per channel).
      num_bits: 2 to 8.
      axis: the channel axis for per-channel clips, `None` for per-tensor clips.
      gradient: `"lsq"` (rounding-error term inside the range, LSQ+) or `"pact"` (clipped
        elements only).
      integer_zero_point: nudge the grid so zero is on it (needed by integer engines).
      symmetric_step: the symmetric weight grid, `s = max(|l|, |u|) / (2^(b-1) - 1)` (module
        docstring; int8's at 8 bits).
      grad_scale: multiplies the clip gradients (LSQ's `1 / sqrt(N * n)`).
      sqnr_axis: when given, also compute the mean per-channel SQNR (dB) along this axis.
        Its gradient reaches only the clips (through the same LSQ+/PACT terms), never `x`:
        a loss on it tunes the clips, not the weights.

    Returns:
      `(q, data_min, data_max, sqnr_db)`: `data_min`/`data_max` are the data's range per clip
      (no gradient); `sqnr_db` is None unless `sqnr_axis` is given.
    """
    check_gradient(gradient)
    x, relu = fusible_relu(tf.convert_to_tensor(x, tf.float32))
    with_noise = sqnr_axis is not None
    if with_noise and axis is not None and _normalize_axis(x, sqnr_axis) != \
            _normalize_axis(x, axis):
        raise ValueError(f"per-channel SQNR must use the clip axis {axis}, got {sqnr_axis}")
    x, rows, restore, lower, upper, finish, levels = _prepare(
        x, lower, upper, num_bits, axis, integer_zero_point,
        sqnr_axis if with_noise else x.shape.rank - 1, symmetric_step)

    @tf.custom_gradient
    def _quantize(rows, lower, upper):
        outputs = _forward_pass(rows, lower, upper, levels, with_noise, integer_zero_point,
                                symmetric_step, relu)

        def grad(dq, *unused_and_dnoise):
            dnoise = unused_and_dnoise[-1] if with_noise else None
            dnoise = tf.zeros([], tf.float32) if dnoise is None else tf.reshape(dnoise, [1, -1])
            if dq is None:
                dq = tf.zeros_like(rows)
            drows, dl, du = _backward_pass(rows, dq, dnoise, lower, upper, levels,
                                           gradient == "lsq", integer_zero_point,
                                           symmetric_step, relu)
            dl, du = finish(dl, tf.reduce_sum), finish(du, tf.reduce_sum)
            return (drows, tf.reshape(dl * grad_scale, tf.shape(lower)),
                    tf.reshape(du * grad_scale, tf.shape(upper)))

        return outputs, grad

    outputs = _quantize(rows, lower, upper)
    q = restore(outputs[0])
    data_min = tf.stop_gradient(finish(outputs[1], tf.reduce_min))
    data_max = tf.stop_gradient(finish(outputs[2], tf.reduce_max))
    sqnr = None
    if with_noise:
        sqnr = _mean_sqnr_from_powers(tf.stop_gradient(outputs[3]), outputs[4])
    return q, data_min, data_max, sqnr


def fake_quant(x, lower, upper, num_bits: int, axis: int | None = None, *,
               gradient: str = "lsq", integer_zero_point: bool = True,
               grad_scale: float = 1.0, symmetric_step: bool = False):
    """Fake-quantizes `x` with learnable clips; see the module docstring for the formulas.

    The arguments are those of `fake_quant_with_stats`, which this calls, returning `q(x)`.
    """
    return fake_quant_with_stats(x, lower, upper, num_bits, axis, gradient=gradient,
                                 integer_zero_point=integer_zero_point,
                                 grad_scale=grad_scale, symmetric_step=symmetric_step)[0]


def lsq_grad_scale(num_elements_per_clip: int, num_bits: int) -> float:
    """LSQ's gradient scale `1 / sqrt(N * n)`."""
    return 1.0 / math.sqrt(max(int(num_elements_per_clip), 1) * num_levels(num_bits))


# --------------------------------------------------------------------------------------------
# SQNR
# --------------------------------------------------------------------------------------------

#: Relative floor on the noise power: caps a channel's SQNR at 100 dB, so one channel that
#: happens to quantize exactly (a constant filter) does not dominate the mean.
_NOISE_FLOOR = 1e-10
_TINY = 1e-20


def _sqnr_from_powers(signal, noise):
    ratio = (signal + _TINY) / (noise + _NOISE_FLOOR * signal + _TINY)
    return 10.0 * tf.math.log(ratio) / math.log(10.0), tf.cast(signal > _TINY, tf.float32)


def _mean_sqnr_from_powers(signal, noise):
    sqnr, has_signal = _sqnr_from_powers(signal, noise)
    return tf.reduce_sum(sqnr * has_signal) / tf.maximum(tf.reduce_sum(has_signal), 1.0)


def sqnr_db_per_channel(x, q, axis: int | None):
    """`SQNR_c = 10 log10(sum x^2 / (sum (x - q)^2 + eps))` per channel of `axis`, in dB.

    Sums run over every other dimension (over everything for `axis=None`, giving one value).
    `eps = 1e-10 * sum x^2` (a 100 dB cap) plus a tiny absolute term, so all-zero channels give
    0 dB instead of NaN. Returns `(sqnr_db, has_signal)`: channels with no signal power are
    flagged so means can leave them out.
    """
    x = tf.convert_to_tensor(x, tf.float32)
    return _sqnr_from_powers(_reduce_to_clip(tf.square(x), axis),
                             _reduce_to_clip(tf.square(x - q), axis))


def mean_sqnr_db(x, q, axis: int | None):
    """Mean per-channel SQNR in dB over the channels that carry signal (0 if none do)."""
    x = tf.convert_to_tensor(x, tf.float32)
    return _mean_sqnr_from_powers(_reduce_to_clip(tf.square(x), axis),
                                  _reduce_to_clip(tf.square(x - q), axis))


# --------------------------------------------------------------------------------------------
# Clip initialization
# --------------------------------------------------------------------------------------------

def _as_rows(x, axis: int | None, max_rows: int | None):
    """Reshapes `x` to `[rows, C]` (C=1 per tensor), keeping at most `max_rows` rows.

    The kept rows are drawn at random with a fixed seed. (An evenly strided pick aliases with
    the image width: a stride of 32 on 32-wide NHWC maps keeps only the left border column.)
    """
    x = tf.convert_to_tensor(x, tf.float32)
    if axis is None:
        rows = tf.reshape(x, [-1, 1])
    else:
        axis = _normalize_axis(x, axis)
        rank = x.shape.rank
        perm = [d for d in range(rank) if d != axis] + [axis]
        rows = tf.reshape(tf.transpose(x, perm), [-1, x.shape[axis]])
    if max_rows is not None:
        count = tf.shape(rows)[0]
        picked = tf.random.stateless_uniform([max_rows], seed=[17, 29], minval=0,
                                             maxval=count, dtype=tf.int32)
        rows = tf.cond(count > max_rows, lambda: tf.gather(rows, picked), lambda: rows)
    return rows


def _squeeze_clips(values, axis):
    return tf.reshape(values, []) if axis is None else values


def init_clips_minmax(x, axis: int | None = None):
    """Clips at the data's min and max per channel, widened to include zero.

    Including zero keeps the zero point inside `[0, n]`, where integer engines need it, and
    matches what the nudged forward pass would do anyway.
    """
    rows = _as_rows(x, axis, None)
    lower = tf.minimum(tf.reduce_min(rows, axis=0), 0.0)
    upper = tf.maximum(tf.reduce_max(rows, axis=0), 0.0)
    upper = tf.maximum(upper, lower + MIN_RANGE)
    return _squeeze_clips(lower, axis), _squeeze_clips(upper, axis)


def init_clips_mse(x, num_bits: int, axis: int | None = None, *, integer_zero_point=True,
                   num_candidates: int = 20, min_fraction: float = 0.2, passes: int = 2,
                   max_rows: int = 2048, symmetric_step: bool = False):
    """Per-channel clips that minimize the quantization MSE, by grid search.

    Starting from min/max (`init_clips_minmax`), coordinate descent: the upper clip is searched
    over `u = f * max` for `num_candidates` fractions `f` in `[min_fraction, 1]` with the lower
    clip fixed, then the lower clip the same way with the upper fixed, `passes` times. Lower and
    upper are searched separately because activations and depthwise weights are rarely
    symmetric. The candidates span the full data range; the error is measured on at most
    `max_rows` positions per channel drawn at random (fixed seed), which keeps the search cheap
    on large activation tensors.
    """
    num_bits = check_bits(num_bits)
    data_min, data_max = init_clips_minmax(x, axis)                # full range, [C]
    data_min, data_max = tf.reshape(data_min, [-1]), tf.reshape(data_max, [-1])
    rows = _as_rows(x, axis, max_rows)                              # [R, C] sample
    fractions = tf.linspace(min_fraction, 1.0, num_candidates)[:, None]  # [K, 1]

    def errors(lowers, uppers):                                     # [K, C] each -> [K, C]
        lo, hi = lowers[:, None, :], uppers[:, None, :]
        lo, hi = effective_clips(lo, hi, num_bits, integer_zero_point, symmetric_step)
        q = _plain_fake_quant(rows[None], lo, hi, num_bits, None, symmetric_step)
        return tf.reduce_mean(tf.square(q - rows[None]), axis=1)

    def best(candidates, err):                                      # per channel argmin
        pick = tf.one_hot(tf.argmin(err, axis=0), num_candidates, axis=0)
        return tf.reduce_sum(candidates * pick, axis=0)

    lower, upper = data_min, data_max
    for _ in range(passes):
        cand_u = tf.maximum(fractions * data_max[None], lower[None] + MIN_RANGE)
        upper = best(cand_u, errors(tf.broadcast_to(lower[None], tf.shape(cand_u)), cand_u))
        cand_l = tf.minimum(fractions * data_min[None], upper[None] - MIN_RANGE)
        lower = best(cand_l, errors(cand_l, tf.broadcast_to(upper[None], tf.shape(cand_l))))
    return _squeeze_clips(lower, axis), _squeeze_clips(upper, axis)


INIT_METHODS = ("minmax", "mse")


def check_init_method(method: str) -> str:
    if method not in INIT_METHODS:
        raise ValueError(f"init_method must be one of {INIT_METHODS}, got {method!r}")
    return method


def init_clips(x, num_bits: int, axis: int | None, method: str, integer_zero_point=True,
               symmetric_step: bool = False):
    """Dispatches to `init_clips_minmax` or `init_clips_mse`."""
    if check_init_method(method) == "minmax":
        return init_clips_minmax(x, axis)
    return init_clips_mse(x, num_bits, axis, integer_zero_point=integer_zero_point,
                          symmetric_step=symmetric_step)


# --------------------------------------------------------------------------------------------
# ACD: asymmetric clipping-value decay
# --------------------------------------------------------------------------------------------

def clip_decay(lower, upper, data_min, data_max, lower_strength, upper_strength):
    """One ACD step: each clip moves toward the data's range, lower and upper separately.

    ::

        u <- u - lambda_u * max(u - m_max, 0)
        l <- l + lambda_l * max(m_min - l, 0)

    where `m_min`, `m_max` are the channel's tracked data range and `lambda_l`, `lambda_u` in
    `[0, 1]` the lower and upper strengths. Only the part of the clipping range that the data
    does not occupy decays: levels there are never used, so removing it shrinks the step `s`
    for free. Clips inside the data range (deliberate clipping, learned by the task loss) are
    left to the optimizer. The result keeps `u - l >= MIN_RANGE`.
    """
    lower = tf.convert_to_tensor(lower, tf.float32)
    upper = tf.convert_to_tensor(upper, tf.float32)
    new_upper = upper - upper_strength * tf.maximum(upper - data_max, 0.0)
    new_lower = lower + lower_strength * tf.maximum(data_min - lower, 0.0)
    new_upper = tf.maximum(new_upper, new_lower + MIN_RANGE)
    return new_lower, new_upper


def clip_l2_decay(lower, upper, lower_strength, upper_strength):
    """One ACD step in the "l2" reading: decoupled L2 decay of the clips toward zero.

    ::

        l <- (1 - lambda_l) * l
        u <- (1 - lambda_u) * u

    PACT (Choi et al. 2018) puts an L2 penalty on its learnable clip; with Adam such a penalty
    in the loss is rescaled by the optimizer, so here it is applied to the variables directly
    after each step (as AdamW decouples weight decay), with separate strengths `lambda_l`,
    `lambda_u` in `[0, 1]` for the lower and upper clip. Unlike `clip_decay` it pulls every
    clip inward whatever the data range, and the task loss pushes back where clipping hurts.
    The result keeps `u - l >= MIN_RANGE`.
    """
    lower = tf.convert_to_tensor(lower, tf.float32)
    upper = tf.convert_to_tensor(upper, tf.float32)
    new_lower = (1.0 - lower_strength) * lower
    new_upper = tf.maximum((1.0 - upper_strength) * upper, new_lower + MIN_RANGE)
    return new_lower, new_upper


def out_of_range_penalty(x, lower, upper, axis: int | None):
    """ACD, "pull" reading: the activations' excursions outside the clips, clips held fixed.

    Returns `(mean(relu(l - x)^2), mean(relu(x - u)^2))`, the parts below and above the range,
    so the two sides can be weighted separately (`lambda_l`, `lambda_u`). Added to the loss,
    they pull activations into the current clipping range instead of moving the clips: their
    gradient reaches `x` (and through it the weights), never `l` or `u`.
    """
    x = tf.convert_to_tensor(x, tf.float32)
    shape = _channel_shape(x.shape.rank, _normalize_axis(x, axis))
    lower, upper = tf.stop_gradient(lower), tf.stop_gradient(upper)
    if shape is not None:
        lower, upper = tf.reshape(lower, shape), tf.reshape(upper, shape)
    return (tf.reduce_mean(tf.square(tf.nn.relu(lower - x))),
            tf.reduce_mean(tf.square(tf.nn.relu(x - upper))))
