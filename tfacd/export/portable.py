"""Portable requantization: scales that every TFLite runtime requantizes alike.

`tfacd.export.requantization` has the two arithmetics: XNNPACK multiplies the int32
accumulator by the float multiplier `M` and rounds once; LiteRT's builtin kernels and
TensorFlow Lite Micro compute `r1 = round(acc M0 / 2^31)` and then `round(r1 / 2^e)`, two
roundings (and LiteRT's optimized kernels break negative ties upwards, the reference kernels
away from zero). They agree on every accumulator when

1. the first rounding is exact: `M = q 2^-p` with `q` odd, `2^(t-1) <= q < 2^t`, so that
   `M0 = q 2^(31-t)` and `acc M0 / 2^31 = acc q / 2^t` is an integer whenever `2^t | acc`;
2. there are no ties: `acc / 2^t` odd, so that `acc M = (odd) 2^-(p-t)` is never a
   half-integer when `p - t >= 2`. Its distance to the nearest half-integer is then at
   least `2^-(p-t)` output steps, far beyond float32's rounding of the product.

Both hold for every input when each output channel's stored integers are multiples of
`2^(t+1)` (the weight spread `K` of `tfacd.export.weights` is chosen so: `K m` with
`K ≡ 0 mod 2^(t+1)`) and its int32 bias is `≡ 2^t (mod 2^(t+1))`: then `acc ≡ 2^t
(mod 2^(t+1))` whatever the activations. What remains free is the channel's ratio
`R = s_in s' / s_out = K M` (`s'` the BN-folded weight step): it must be one of the values
`K q 2^-p`. `plan_portable` picks, per channel, the nearest such value to the trained ratio
(about 6 to 12 per octave at 2 bits: within 3 to 6 %), `apply_portable_scales` moves the
Keras model onto it (the folded BatchNorm's gamma, or the channel's weight clips and kernel,
times `r = R_portable / R`), and the bias snap puts the biases on their residue class.
The Keras model then computes what every runtime computes.

Training with the ratios in place (`train_main.py --portable_in_place`): snap once
(`tfacd.export.snap_to_portable`: the ratios, then the biases onto their residue classes),
then train with every quantity a ratio or a bias class depends on held fixed
(`ratio_variables`: the clips, which set `s_in`, `s_out` and the weight step, and the folded
BatchNorms' gamma; `bias_variables`: the BatchNorms' beta and the layers' own biases; the
moving statistics are frozen with the BatchNorm). The kernels keep training, so the network
learns around the snapped ratios and biases, and the export's plan finds them in place.
Spreads are chosen for every integer a channel's grid holds (`grid_reach`), so a weight
that trains onto an integer its channel did not use yet keeps the channel's spread, ratio
and bias class.

Layers this cannot reach are named in the plan with the reason: 8-bit weights (their
integers fill int8, so `K = 1`), layers whose input or output is not an int8 tensor (the
`float` policy's float layers), and per-tensor weights without a BatchNorm to carry a
per-channel factor.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from tfacd.export._common import ExportError, _INT8_MAX, _content
from tfacd.export.flatbuffer import (_flatbuffer, _layer_for_tensor, _op_name, _schema,
                                     _tensor_name, _weight_op_entries)
from tfacd.export.requantization import requantize_fixed_point, requantize_float
from tfacd.export.weights import (_batch_norm_folds, _inner, _kernel_attribute,
                                  _weight_quantizers, grid_reach)
from tfacd.quantizers import clip_variables

# (t, q): the multiplier's mantissa q / 2^t, q odd in [2^(t-1), 2^t).
_FAMILIES = tuple((t, q) for t in range(1, 5) for q in range(2 ** (t - 1) | 1, 2 ** t, 2))


@dataclasses.dataclass
class PortableLayer:
    """One layer's portable requantization, per output channel."""

    scale: np.ndarray        # r: the factor on the channel's folded weight step
    spread: np.ndarray       # K: stored integers = K m, a multiple of `modulus`
    modulus: np.ndarray      # 2^(t+1)
    residue: np.ndarray      # 2^t: the int32 bias's class modulo `modulus`


@dataclasses.dataclass
class PortablePlan:
    layers: dict             # layer name -> PortableLayer
    skipped: dict            # layer name -> why it cannot be portable

    def summary(self) -> dict:
        changes = [np.abs(layer.scale - 1).max() for layer in self.layers.values()
                   if layer.scale.size]
        return {"layers": len(self.layers), "skipped": dict(self.skipped),
                "largest_weight_step_change": float(max(changes, default=0.0))}


def _choose(ratio: float, largest: int) -> tuple[float, int, int, int]:
    """`(R, K, t, p)`: the portable ratio `K q 2^-p` nearest to `ratio` (in log) for a
    channel whose k-bit integers reach `largest` in magnitude."""
    best = None
    for t, q in _FAMILIES:
        modulus = 2 ** (t + 1)
        for spread in range(modulus, _INT8_MAX // max(largest, 1) + 1, modulus):
            exponent = max(round(math.log2(spread * q / ratio)), t + 2)
            for p in (exponent - 1, exponent, exponent + 1):
                if p < t + 2:
                    continue
                value = spread * q * 2.0 ** -p
                error = abs(math.log(value / ratio))
                # Ties in error: the larger spread (a finer bias grid).
                key = (round(error, 12), -spread)
                if best is None or key < best[0]:
                    best = (key, value, spread, t, p)
    if best is None:
        return None
    _, value, spread, t, p = best
    return value, spread, t, p


def plan_portable(qat_model, baked, tflite) -> PortablePlan:
    """Per weight layer of the file `tflite` (the model's export, `baked` its bake), the
    portable ratio of every output channel (module docstring).

    Each channel's spread is chosen for every integer its weight grid holds (`grid_reach`),
    not only the ones its kernel holds now: after training with the ratios in place (where
    weights move onto integers a channel did not use yet) the export then finds the same
    ratio, spread and bias residue class that the snap at the start chose.
    """
    model = _flatbuffer(_content(tflite))
    types = _schema().TensorType
    names = [layer.name for layer in qat_model.layers]
    folds = _batch_norm_folds(qat_model)
    layers, skipped = {}, {}
    for subgraph, op, _ in _weight_op_entries(model):
        filter_tensor = subgraph.tensors[op.inputs[1]]
        name = _layer_for_tensor(_tensor_name(filter_tensor), names)
        if name is None or name not in baked.weights:
            continue                                 # the input normalization
        x, y = subgraph.tensors[op.inputs[0]], subgraph.tensors[op.outputs[0]]
        weights = baked.weights[name]
        if x.type != types.INT8 or y.type != types.INT8 or filter_tensor.type != types.INT8 \
                or weights.integers is None:
            skipped[name] = "its input, output or filter is not an int8 tensor"
            continue
        s_in, s_out = float(x.quantization.scale[0]), float(y.quantization.scale[0])
        channels = weights.step.size
        spread = weights.spread.astype(np.int64)
        folded_step = weights.step.astype(np.float64) * spread
        largest = np.abs(weights.integers.reshape(-1, channels)).max(axis=0) // spread
        layer = qat_model.get_layer(name)
        largest = np.maximum(largest, grid_reach(layer))
        if largest.max() * 4 > _INT8_MAX:
            skipped[name] = (f"{weights.bits}-bit weights fill int8 (integers up to "
                             f"{int(largest.max())}), no room for a spread")
            continue
        quantizer = _weight_quantizers(layer).get(_kernel_attribute(layer),
                                                   (None, None, None))[1]
        bn = folds.get(name)
        if not (bn is not None and _inner(bn).scale) and \
                not (quantizer is not None and quantizer.per_channel):
            skipped[name] = "per-tensor weights and no BatchNorm gamma to carry a per-channel factor"
            continue
        scale = np.ones(channels)
        new_spread = np.zeros(channels, np.int64)
        modulus = np.zeros(channels, np.int64)
        for c in range(channels):
            ratio = s_in * folded_step[c] / s_out
            chosen = _choose(ratio, int(largest[c])) if ratio > 0 else None
            if chosen is None:
                break
            value, new_spread[c], t, _ = chosen
            scale[c] = value / ratio
            modulus[c] = 2 ** (t + 1)
        else:
            layers[name] = PortableLayer(scale, new_spread, modulus, modulus // 2)
            continue
        skipped[name] = "a channel with no portable ratio"
    return PortablePlan(layers, skipped)


def apply_portable_scales(qat_model, plan: PortablePlan):
    """Multiplies each planned channel's folded weight step by its factor `r`, in the Keras
    model: the folded BatchNorm's gamma when there is one, else the channel's weight clips
    and float kernel (so its integers stay the same)."""
    folds = _batch_norm_folds(qat_model)
    for name, portable in plan.layers.items():
        layer = qat_model.get_layer(name)
        bn = folds.get(name)
        if bn is not None and _inner(bn).scale:
            gamma = _inner(bn).gamma
            gamma.assign((gamma.numpy().astype(np.float64) * portable.scale).astype(np.float32))
            continue
        inner = _inner(layer)
        kernel, _, variables = _weight_quantizers(layer)[_kernel_attribute(layer)]
        factor = portable.scale
        if type(inner).__name__ == "DepthwiseConv2D":
            # Output channel c = input channel * multiplier + m: the last two axes.
            factor = factor.reshape(kernel.shape[2], kernel.shape[3])
        kernel.assign((kernel.numpy().astype(np.float64) * factor).astype(np.float32))
        for clip in ("lower", "upper"):
            value = variables[clip].numpy().astype(np.float64)
            variables[clip].assign(
                (value * np.reshape(portable.scale, value.shape)).astype(np.float32))


def bias_variables(qat_model) -> list:
    """The trainable variables a weight layer's (folded) bias depends on, for every weight
    layer: the beta of the BatchNorm folded into it, and its own bias. Snapped onto their
    portable residue classes at the start of a stage with the ratios in place and then held
    fixed, the export's bias snap moves none of them (on a trained W2A2 model, moving them
    there at export alone changed a fifth of its predictions)."""
    found = {}
    folds = _batch_norm_folds(qat_model)
    for layer in qat_model.layers:
        inner = _inner(layer)
        if type(inner).__name__ not in ("Conv2D", "DepthwiseConv2D", "Dense"):
            continue
        if inner.use_bias and inner.bias.trainable:
            found[inner.bias.ref()] = inner.bias
        bn = folds.get(layer.name)
        if bn is not None and _inner(bn).center and _inner(bn).beta.trainable:
            found[_inner(bn).beta.ref()] = _inner(bn).beta
    return list(found.values())


def ratio_variables(qat_model) -> list:
    """The trainable variables the portable ratios `R = s_in s' / s_out` depend on: every
    tfacd quantizer's clips (activation scales and weight steps) and the gamma of every
    BatchNorm folded into a weight layer (the folded step `s'`; the moving variance is not
    trainable). Holding these fixed keeps snapped ratios portable while the kernels and
    biases train."""
    # A fixed-range quantizer's clips (the pixel-grid input) are not trainable: nothing to hold.
    found = {v.ref(): v for v in clip_variables(qat_model) if v.trainable}
    for bn in _batch_norm_folds(qat_model).values():
        inner = _inner(bn)
        if inner.scale:
            found[inner.gamma.ref()] = inner.gamma
    return list(found.values())


def check_portable(tflite, plan: PortablePlan, qat_model, accumulator_bound: int = 1 << 14):
    """Checks the file against the plan, and that for every accumulator of each planned
    channel's residue class up to `accumulator_bound` in magnitude, the fixed-point and the
    float requantization give the same integer. Returns the number of channels checked;
    raises `ExportError` naming the first layer that fails."""
    model = _flatbuffer(_content(tflite))
    names = [layer.name for layer in qat_model.layers]
    checked = 0
    for subgraph, op, op_name in _weight_op_entries(model):
        filter_tensor = subgraph.tensors[op.inputs[1]]
        name = _layer_for_tensor(_tensor_name(filter_tensor), names)
        if name not in plan.layers:
            continue
        portable = plan.layers[name]
        x, y = subgraph.tensors[op.inputs[0]], subgraph.tensors[op.outputs[0]]
        bias_tensor = subgraph.tensors[op.inputs[2]]
        filters = np.frombuffer(bytes(model.buffers[filter_tensor.buffer].data), np.int8)
        channels = portable.scale.size
        # TFLite keeps the output channel last in DEPTHWISE_CONV_2D filters, first in
        # CONV_2D and FULLY_CONNECTED ones.
        filters = filters.reshape(-1, channels) if op_name == "DEPTHWISE_CONV_2D" \
            else filters.reshape(channels, -1).T
        bias = np.frombuffer(bytes(model.buffers[bias_tensor.buffer].data), np.int32)
        modulus, residue = portable.modulus, portable.residue
        if np.any(filters.astype(np.int64) % modulus[None, :]):
            raise ExportError(f"{name}: stored weight integers are not multiples of 2^(t+1)")
        if np.any(bias.astype(np.int64) % modulus != residue):
            raise ExportError(f"{name}: int32 biases are not in their residue class")
        multiplier = (float(x.quantization.scale[0])
                      * np.asarray(filter_tensor.quantization.scale, np.float64)
                      / float(y.quantization.scale[0]))
        for c in range(channels):
            count = accumulator_bound // int(modulus[c])
            acc = int(residue[c]) + int(modulus[c]) * np.arange(-count, count + 1)
            if not np.array_equal(requantize_fixed_point(acc, multiplier[c]),
                                  requantize_float(acc, multiplier[c])):
                raise ExportError(f"{name}: channel {c} requantizes differently in fixed "
                                  "point and in float")
            checked += 1
    return checked


def fixed_point_gaps(tflite, plan: PortablePlan | None, baked) -> list[str]:
    """Why LiteRT's builtin kernels and TensorFlow Lite Micro may compute other integers than
    XNNPACK on the file `tflite` (and so than the Keras model): `[]` when the design makes
    them equal. Read at export into the report's `runtimes` (`exact`, `inexact_why`).

    Named: `requantization='float'` (scales as trained: fixed point rounds some
    accumulators otherwise), weight layers the portable plan skipped, float layers of the
    `float` activation policy (float sums in another order), and `MEAN` ops that rescale
    their sum (a rounded pooled output: `QuantizeScheme(exact_average_pooling=True)`).
    Residual `ADD`s are not named: the three runtimes compute TFLite's int8 ADD alike for
    any scales (`test_int8_add_is_the_same_integer_on_every_runtime`)."""
    gaps = []
    if plan is None:
        gaps.append("requantization='float': the scales as trained, which fixed-point "
                    "requantization rounds differently on some accumulators "
                    "(requantization='portable' makes every runtime alike)")
    elif plan.skipped:
        gaps.append("weight layers without portable scales: " + ", ".join(sorted(plan.skipped)))
    if baked.activations and any(p.per_channel for p in baked.activations):
        gaps.append("per-channel activations: their layers compute in float, summed in "
                    "another order by each runtime")
    model = _flatbuffer(_content(tflite))
    for subgraph in model.subgraphs:
        for op in subgraph.operators:
            if _op_name(model, op) != "MEAN":
                continue
            x, y = subgraph.tensors[op.inputs[0]], subgraph.tensors[op.outputs[0]]
            if x.quantization is None or x.quantization.scale is None:
                continue
            count = int(np.prod(x.shape)) // max(int(np.prod(y.shape)), 1)
            ratio = float(x.quantization.scale[0]) / (count * float(y.quantization.scale[0]))
            if abs(ratio - 1.0) > 1e-6:
                gaps.append(f"{_tensor_name(y)}: MEAN rescales its sum by {ratio:.4g} and "
                            "rounds (QuantizeScheme(exact_average_pooling=True) keeps it "
                            "exact)")
    return gaps
