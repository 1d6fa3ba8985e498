"""tfmot `Quantizer`s with learnable asymmetric clips, per tensor or per channel.

The math (formulas, gradients, references) is in `tfacd.ops`; this module holds the state a
quantizer keeps in its layer (clip variables, data-range statistics) and the Keras-side
behaviour: lazy initialization from data, the SQNR loss and the ACD "pull" penalty via
`add_loss`, and inspection helpers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref

import numpy as np
import tensorflow as tf
from tensorflow_model_optimization.python.core.quantization.keras import quantize_layer
from tensorflow_model_optimization.python.core.quantization.keras import quantize_wrapper
from tensorflow_model_optimization.python.core.quantization.keras import quantizers as tfmot_quantizers

from tfacd import ops
from tfacd._keras import keras

KINDS = ("weight", "activation")
GRANULARITIES = ("per_channel", "per_layer")

# Set by `calibrating()`: quantizers called while it is active (re)initialize their clips from
# the data they see with their `init_method`. Used eagerly by `tfacd.calibrate`.
_CALIBRATING = False


@contextlib.contextmanager
def calibrating():
    """Within this context, every quantizer call sets its clips from the data it sees."""
    global _CALIBRATING
    previous, _CALIBRATING = _CALIBRATING, True
    try:
        yield
    finally:
        _CALIBRATING = previous


# Set by `recording_sqnr()`: quantizers called while it is active write their SQNR to their
# `sqnr_db` variable even in inference, so SQNR can be measured on any batch.
_RECORD_SQNR = False


@contextlib.contextmanager
def recording_sqnr():
    """Within this context, every quantizer call stores its mean SQNR (dB) in `sqnr_db`."""
    global _RECORD_SQNR
    previous, _RECORD_SQNR = _RECORD_SQNR, True
    try:
        yield
    finally:
        _RECORD_SQNR = previous


# Set by `recording_ranges()`: a dict that eager quantizer calls fill with the per-channel
# (last axis) min and max of their input, whatever their granularity.
_RECORDED_RANGES = None


@contextlib.contextmanager
def recording_ranges():
    """Within this context, eager quantizer calls record `{id(quantizer): (min, max)}` of
    their input per channel (last axis) into the yielded dict."""
    global _RECORDED_RANGES
    previous, _RECORDED_RANGES = _RECORDED_RANGES, {}
    try:
        yield _RECORDED_RANGES
    finally:
        _RECORDED_RANGES = previous


def check_range(name: str, value):
    """`value` as a `(lower, upper)` tuple of floats with lower < upper, or None."""
    if value is None:
        return None
    try:
        lower, upper = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be (lower, upper), got {value!r}") from None
    if not lower < upper:
        raise ValueError(f"{name} must be (lower, upper) with lower < upper, got {value!r}")
    return lower, upper


@keras.utils.register_keras_serializable(package="tfacd")
class ClipQuantizer(tfmot_quantizers.Quantizer):
    """Uniform asymmetric fake quantizer with learnable lower and upper clips.

    Forward: `q(x) = l + s * round((clip(x, l, u) - l) / s)`, `s = (u - l) / (2^b - 1)`, with
    the zero-point nudge of `tfacd.ops` when `integer_zero_point`. Backward: straight-through
    for `x` inside `[l, u]`; LSQ+ (default) or PACT gradients for `l` and `u`, scaled by
    `1 / sqrt(N * (2^b - 1))` (see `tfacd.ops.fake_quant`). 8-bit weights use int8's grid
    instead, `q(x) = s * round(clip(x, l, u) / s)` with `s = max(|l|, |u|) / 127`
    (`symmetric_step`), so that TFLite's symmetric int8 weights hold them exactly; with
    `symmetric_grid` weights of any width do, `s = max(|l|, |u|) / (2^(b-1) - 1)`.

    State, created in `build` on the layer that owns the quantizer:

    * `lower`, `upper`: the clips (trainable), shape `[C]` per channel or `[]` per tensor.
    * `initialized`: 0 until the clips are set from data. `tfacd.quantize_model` sets weight
      clips from the kernels and `tfacd.calibrate` activation clips from a batch, both with
      `init_method`. A quantizer still uninitialized at its first call (e.g. a model made
      with a bare `quantize_apply`) takes min/max of that first batch: the cheap method, because
      this initializer is part of the traced graph.
    * `data_min`, `data_max`: the data range per clip. Weights: the current kernel's range.
      Activations: an exponential moving average of batch min/max (`range_momentum`). ACD
      (`tfacd.callbacks.ClipDecay`) decays the clips toward it.
    * `sqnr_db`: the last measured mean SQNR.
    * `pull_lower`, `pull_upper`: the weights of the ACD "pull" penalty below `l` and above
      `u`, set by `ClipDecay`.

    Args:
      num_bits: 2 to 8.
      per_channel: one clip pair per channel of `axis` (True) or one per tensor (False).
      axis: the channel axis, e.g. -1 for Conv2D/Dense kernels and NHWC activations, 2 for
        DepthwiseConv2D kernels (one pair per input channel).
      kind: "weight" or "activation" (sets the data-range tracking and the LSQ `N`).
      gradient: "lsq" or "pact".
      init_method: "mse" (per-channel error-minimizing search) or "minmax".
      integer_zero_point: snap the grid so zero is on it, as integer engines require.
      sqnr_loss_weight: when > 0, `-sqnr_loss_weight * mean SQNR (dB)` is added to the
        layer's losses in training, with gradients to the clips only.
      acd_pull: when True, `pull_lower * mean(relu(l-x)^2) + pull_upper * mean(relu(x-u)^2)`
        is added to the layer's losses in training (the "pull" reading of ACD).
      range_momentum: EMA momentum of the activation range statistics.
      symmetric_grid: weights only; the symmetric grid `s = max(|l|, |u|) / (2^(b-1) - 1)`
        at every width, not only at 8 bits: at 4 bits its integers fit int4 (`[-7, 7]`), so
        `tfacd.export` can store the weights as int4. The clips stay asymmetric and learnable.
      fixed_range: `(l, u)`: clips fixed at these values, neither trained, calibrated nor
        decayed (the data range is still tracked). The model input on the pixel grid uses it
        (`tfacd.data.PIXEL_GRID`): 8 bits over `[-2, 127/64]` hold `(p - 128) / 64` for every
        pixel value `p` exactly, so the input quantizer is lossless and every TFLite runtime
        reads the same integers (`p - 128`).

    Reference: Esser et al. 2020 (LSQ); Bhalgat et al. 2020 (LSQ+); Choi et al. 2018 (PACT).
    """

    def __init__(self, num_bits: int, per_channel: bool = True, axis: int = -1,
                 kind: str = "activation", gradient: str = "lsq", init_method: str = "mse",
                 integer_zero_point: bool = True, sqnr_loss_weight: float = 0.0,
                 acd_pull: bool = False, range_momentum: float = 0.9,
                 symmetric_grid: bool = False, fixed_range=None):
        self.num_bits = ops.check_bits(num_bits)
        self.per_channel = bool(per_channel)
        self.axis = int(axis)
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.kind = kind
        self.gradient = ops.check_gradient(gradient)
        self.init_method = ops.check_init_method(init_method)
        self.integer_zero_point = bool(integer_zero_point)
        if not float(sqnr_loss_weight) >= 0.0:
            raise ValueError(f"sqnr_loss_weight must be >= 0, got {sqnr_loss_weight!r}")
        self.sqnr_loss_weight = float(sqnr_loss_weight)
        self.acd_pull = bool(acd_pull)
        if not 0.0 <= float(range_momentum) < 1.0:
            raise ValueError(f"range_momentum must be in [0, 1), got {range_momentum!r}")
        self.range_momentum = float(range_momentum)
        if symmetric_grid and kind != "weight":
            raise ValueError("symmetric_grid is for weight quantizers; activations keep the "
                             f"asymmetric grid (kind={kind!r})")
        self.symmetric_grid = bool(symmetric_grid)
        self.fixed_range = check_range("fixed_range", fixed_range)
        self._layer_ref = None

    @property
    def symmetric_step(self) -> bool:
        """8-bit weights use the int8 grid `s = max(|l|, |u|) / 127` (`tfacd.ops`): TFLite's
        int8 weights are symmetric with 255 levels, and an asymmetric 8-bit grid's 256th level
        would be changed by the export. Below 8 bits the asymmetric grid fits int8 as it is;
        `symmetric_grid` asks for the symmetric one there too (int4 storage at 4 bits)."""
        return self.kind == "weight" and self.integer_zero_point and (
            self.num_bits == 8 or self.symmetric_grid)

    @property
    def granularity(self) -> str:
        return "per_channel" if self.per_channel else "per_layer"

    # ---------------------------------------------------------------- tfmot Quantizer API

    def build(self, tensor_shape, name, layer):
        shape = tf.TensorShape(tensor_shape)
        if self.per_channel:
            if shape.rank is None or not -shape.rank <= self.axis < shape.rank:
                raise ValueError(f"{layer.name}/{name}: per-channel axis {self.axis} does not "
                                 f"exist in a tensor of shape {shape}")
            channels = shape[self.axis]
            if channels is None:
                raise ValueError(f"{layer.name}/{name}: the channel dimension of {shape} must "
                                 "be known to build per-channel clips")
            clip_shape = (int(channels),)
        else:
            clip_shape = ()
        self._layer_ref = weakref.ref(layer)
        self._name = name

        def add(suffix, init, trainable, shape=clip_shape):
            return layer.add_weight(
                f"{name}_{suffix}", shape=shape, dtype=tf.float32, trainable=trainable,
                initializer=keras.initializers.Constant(init))

        # Placeholder clips until data arrives ([-1, 1] never produces a NaN).
        lower, upper = self.fixed_range or (-1.0, 1.0)
        fixed = self.fixed_range is not None
        return {
            "lower": add("lower", lower, not fixed),
            "upper": add("upper", upper, not fixed),
            "initialized": add("initialized", float(fixed), False, ()),
            "data_min": add("data_min", 0.0, False),
            "data_max": add("data_max", 0.0, False),
            "sqnr_db": add("sqnr_db", 0.0, False, ()),
            "pull_lower": add("pull_lower", 0.0, False, ()),
            "pull_upper": add("pull_upper", 0.0, False, ()),
        }

    # Plain Python control flow only: no autograph conversion (it made tracing 10x slower).
    @tf.autograph.experimental.do_not_convert
    def __call__(self, inputs, training, weights, **kwargs):
        x = tf.convert_to_tensor(inputs)
        axis = self._axis_for(x)
        if _RECORDED_RANGES is not None and tf.executing_eagerly():
            reduce = list(range(x.shape.rank - 1))
            _RECORDED_RANGES[id(self)] = (tf.reduce_min(x, reduce).numpy(),
                                          tf.reduce_max(x, reduce).numpy())
        if _CALIBRATING:
            self.initialize(x, weights)
        # The lazy initialization reads the data only in its first-call branch, recomputing a
        # ReLU that the kernels fuse (ops.fusible_relu), so that the ReLU op itself has no
        # reader left and is pruned from the train step.
        source, relu = ops.fusible_relu(x)
        init_done = self._initialize_if_needed(lambda: ops.apply_relu(source, relu), weights)
        with tf.control_dependencies([init_done]):
            lower = tf.identity(weights["lower"])
            upper = tf.identity(weights["upper"])

        if not training:
            if not _RECORD_SQNR:
                return ops.quantize_forward(x, lower, upper, self.num_bits, axis,
                                            integer_zero_point=self.integer_zero_point,
                                            symmetric_step=self.symmetric_step)
            q, _, _, sqnr = ops.fake_quant_with_stats(
                x, lower, upper, self.num_bits, axis, sqnr_axis=self._sqnr_axis(x),
                integer_zero_point=self.integer_zero_point, symmetric_step=self.symmetric_step)
            weights["sqnr_db"].assign(sqnr)
            return q

        with_sqnr = self.sqnr_loss_weight > 0.0 or _RECORD_SQNR
        q, data_min, data_max, sqnr = ops.fake_quant_with_stats(
            x, lower, upper, self.num_bits, axis, gradient=self.gradient,
            integer_zero_point=self.integer_zero_point, symmetric_step=self.symmetric_step,
            grad_scale=ops.lsq_grad_scale(self._elements_per_clip(x), self.num_bits),
            sqnr_axis=self._sqnr_axis(x) if with_sqnr else None)
        self._track_range(data_min, data_max, weights)
        layer = self._layer_ref() if self._layer_ref is not None else None
        if with_sqnr:
            weights["sqnr_db"].assign(tf.stop_gradient(sqnr))
            if self.sqnr_loss_weight > 0.0 and layer is not None:
                layer.add_loss(-self.sqnr_loss_weight * sqnr)
        if self.acd_pull and layer is not None:
            below, above = ops.out_of_range_penalty(x, lower, upper, axis)
            layer.add_loss(weights["pull_lower"] * below + weights["pull_upper"] * above)
        return q

    def get_config(self):
        return {
            "num_bits": self.num_bits,
            "per_channel": self.per_channel,
            "axis": self.axis,
            "kind": self.kind,
            "gradient": self.gradient,
            "init_method": self.init_method,
            "integer_zero_point": self.integer_zero_point,
            "sqnr_loss_weight": self.sqnr_loss_weight,
            "acd_pull": self.acd_pull,
            "range_momentum": self.range_momentum,
            "symmetric_grid": self.symmetric_grid,
            "fixed_range": self.fixed_range,
        }

    def __eq__(self, other):
        return isinstance(other, ClipQuantizer) and self.get_config() == other.get_config()

    def __ne__(self, other):
        return not self.__eq__(other)

    def __deepcopy__(self, memo):
        # The weak reference to the owning layer is not copied: a copy belongs to no layer yet.
        return type(self).from_config(self.get_config())

    # ---------------------------------------------------------------- helpers

    def _axis_for(self, x):
        return (self.axis % x.shape.rank) if self.per_channel else None

    def _sqnr_axis(self, x):
        # SQNR is reported per channel for per-layer quantizers too, so the two granularities
        # are measured the same way. Weights: the clip axis; activations: the last (channel).
        return self.axis % x.shape.rank if self.kind == "weight" else x.shape.rank - 1

    def _elements_per_clip(self, x) -> int:
        dims = list(x.shape) if self.kind == "weight" else list(x.shape[1:])
        if any(d is None for d in dims):
            return 1
        total = int(np.prod(dims)) if dims else 1
        if self.per_channel:
            total //= int(x.shape[self.axis])
        return total

    def initialize(self, x, weights, method: str | None = None):
        """Sets the clips and range statistics from data `x` with `method` (default: the
        quantizer's `init_method`)."""
        x = tf.stop_gradient(tf.convert_to_tensor(x, tf.float32))
        axis = self._axis_for(x)
        if self.fixed_range is not None:
            lower, upper = (tf.constant(v, tf.float32) for v in self.fixed_range)
        else:
            lower, upper = ops.init_clips(x, self.num_bits, axis, method or self.init_method,
                                          self.integer_zero_point, self.symmetric_step)
        data_min, data_max = ops.init_clips_minmax(x, axis)
        return tf.group(weights["lower"].assign(lower), weights["upper"].assign(upper),
                        weights["data_min"].assign(data_min),
                        weights["data_max"].assign(data_max),
                        weights["initialized"].assign(1.0))

    def _initialize_if_needed(self, make_x, weights):
        """Min/max clips from the data `make_x()` if nothing initialized this quantizer yet
        (see class doc)."""
        return tf.cond(weights["initialized"] > 0.5, tf.no_op,
                       lambda: self.initialize(make_x(), weights, "minmax"))

    def _track_range(self, batch_min, batch_max, weights):
        """Data range per clip, including zero: the kernel's for weights, an EMA for
        activations."""
        batch_min, batch_max = tf.minimum(batch_min, 0.0), tf.maximum(batch_max, 0.0)
        momentum = 0.0 if self.kind == "weight" else self.range_momentum
        weights["data_min"].assign(momentum * weights["data_min"] + (1 - momentum) * batch_min)
        weights["data_max"].assign(momentum * weights["data_max"] + (1 - momentum) * batch_max)


# ------------------------------------------------------------------------------------------
# Inspection
# ------------------------------------------------------------------------------------------

@dataclasses.dataclass
class QuantizerInfo:
    """One quantizer of a model: where it sits, what it quantizes, and its current clips."""

    layer: str
    tensor: str
    kind: str
    granularity: str
    num_bits: int
    lower: np.ndarray
    upper: np.ndarray
    sqnr_db: float
    quantizer: ClipQuantizer = dataclasses.field(repr=False)
    variables: dict = dataclasses.field(repr=False)


def iter_quantizers(model):
    """Yields `(layer, tensor_name, quantizer, variables)` for every tfacd quantizer in `model`.

    Nested trainable models are searched too (a `tfacd.distill.Distiller`'s student); a nested
    model set non-trainable (its frozen teacher) is not: callbacks that move clips must never
    reach a model that does not train."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            if layer.trainable:
                yield from iter_quantizers(layer)
        elif isinstance(layer, quantize_wrapper.QuantizeWrapper):
            for weight, quantizer, variables in getattr(layer, "_weight_vars", []):
                if isinstance(quantizer, ClipQuantizer):
                    yield layer, weight.name.split("/")[-1].split(":")[0], quantizer, variables
            outputs = getattr(layer, "_output_quantizers", None) or []
            if outputs and isinstance(outputs[0], ClipQuantizer):
                yield layer, "output", outputs[0], layer._output_quantizer_vars  # pylint: disable=protected-access
        elif isinstance(layer, quantize_layer.QuantizeLayer):
            if isinstance(layer.quantizer, ClipQuantizer):
                yield layer, "input", layer.quantizer, layer.quantizer_vars


def clip_variables(model) -> list:
    """The `lower` and `upper` clip variables of every tfacd quantizer in `model`
    (`iter_quantizers`), each once: quantizers can share theirs."""
    found = {}
    for _, _, _, variables in iter_quantizers(model):
        for clip in (variables["lower"], variables["upper"]):
            found[clip.ref()] = clip
    return list(found.values())


def list_quantizers(model) -> list[QuantizerInfo]:
    """Every tfacd quantizer in `model` with its layer, kind, granularity, bits and clips.

    Clips are the effective ones (after the `l < u` guard and, where enabled, the zero-point
    nudge), i.e. the range the forward pass actually uses.
    """
    infos = []
    for layer, tensor, quantizer, variables in iter_quantizers(model):
        lower, upper = effective_clips(quantizer, variables)
        infos.append(QuantizerInfo(
            layer=layer.name, tensor=tensor, kind=quantizer.kind,
            granularity=quantizer.granularity, num_bits=quantizer.num_bits,
            lower=lower, upper=upper, sqnr_db=float(variables["sqnr_db"].numpy()),
            quantizer=quantizer, variables=variables))
    return infos


def channel_ranges(model, x) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """`{"<layer>/<tensor>": (min, max)}`: the per-channel (last axis) range of every
    quantizer's input on the inference pass of batch `x`, for per-layer quantizers too.

    This is the data each quantizer's clips are meant to fit: comparing it with the clips
    shows what a per-tensor range wastes on channels with small ranges.
    """
    with recording_ranges() as ranges:
        model(tf.convert_to_tensor(x), training=False)
    return {f"{layer.name}/{tensor}": ranges[id(quantizer)]
            for layer, tensor, quantizer, _ in iter_quantizers(model)
            if id(quantizer) in ranges}


def effective_clips(quantizer: ClipQuantizer, variables) -> tuple[np.ndarray, np.ndarray]:
    """The `(l, u)` the forward pass uses, as numpy arrays."""
    lower, upper = ops.effective_clips(variables["lower"], variables["upper"],
                                       quantizer.num_bits, quantizer.integer_zero_point,
                                       quantizer.symmetric_step)
    return lower.numpy(), upper.numpy()
