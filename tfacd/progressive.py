"""Progressive precision: start a QAT model at lower bits from a trained one at higher bits.

Lowering the bits in stages (for example W8A8 -> W4A4 -> W2A2) lets each stage begin where
the network already tolerates quantization noise, instead of jumping from float to 2 bits;
PROFIT (Park and Yoo 2020) steps MobileNets 8 -> 5 -> 4 bits this way, and tfmot's
maintainers suggest lowering bits gradually (tensorflow/model-optimization#430).

A stage carries the network's own weights (kernels, biases, BatchNorm's gamma, beta and
moving statistics) and nothing of the quantizers: clips learned for 4 bits are not clips for
2 bits (a 2-bit grid has 3 steps where a 4-bit grid has 15, and the error-minimizing clips
of the two differ), so the new stage derives its clips again for its own bits, weights from
their kernels (`tfacd.quantize_model`) and activations from data (`tfacd.calibrate`)::

    float_model = build_model()                       # the architecture, untrained
    tfacd.progressive.transfer_weights(w4a4_model, float_model)
    w2a2_model = tfacd.quantize_model(float_model, weight_bits=2, activation_bits=2)
    tfacd.calibrate(w2a2_model, calibration_images)

`train_main.py --init_from=RUN` does this when RUN is a QAT run; a plan chains the stages
(`configs/plans/`).
"""

from __future__ import annotations


def _short_name(variable, layer_name: str) -> str:
    """"conv/kernel:0" -> "kernel" for a variable of layer "conv"."""
    name = variable.name.split(":")[0]
    marker = layer_name + "/"
    return name[name.index(marker) + len(marker):] if marker in name else name.split("/")[-1]


def _own_weights(model) -> dict:
    """{layer name: {weight name: variable}} of the network's own weights. A tfmot
    QuantizeWrapper tracks its inner layer's quantized kernel itself (the inner layer no longer
    lists it), so the variables are taken from the wrapper, by the inner layer's name."""
    found = {}
    for layer in model.layers:
        inner = getattr(layer, "layer", layer)
        own = {_short_name(v, inner.name): v for v in layer.weights
               if v.name.startswith(inner.name + "/")}
        if own:
            found[inner.name] = own
    return found


def transfer_weights(source, target) -> int:
    """Copies every layer's own weights from `source` (a float or QAT model) into `target`
    (a float model of the same architecture), by layer and weight name. Quantizer variables
    are not copied. Returns the number of layers copied.

    Raises:
      ValueError: a weight of `target` missing in `source`, or of another shape (the message
        names every such layer).
    """
    sources = _own_weights(source)
    problems, copied = [], 0
    for name, weights in _own_weights(target).items():
        theirs = sources.get(name)
        if theirs is None or set(theirs) != set(weights):
            problems.append(f"{name}: not in {source.name}" if theirs is None else
                            f"{name}: weights {sorted(theirs)} in {source.name}, "
                            f"{sorted(weights)} here")
            continue
        mismatched = [k for k in weights if weights[k].shape != theirs[k].shape]
        if mismatched:
            problems.append(f"{name}: shapes " + ", ".join(
                f"{k} {tuple(theirs[k].shape)} in {source.name}, {tuple(weights[k].shape)} here"
                for k in mismatched))
            continue
        for key, variable in weights.items():
            variable.assign(theirs[key])
        copied += 1
    if problems:
        raise ValueError("cannot carry the weights over: " + "; ".join(problems))
    return copied
