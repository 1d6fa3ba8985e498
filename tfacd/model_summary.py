"""`tfacd.summary(model)`: every layer with its bit widths, parameters and memory, in the
spirit of larq's `lq.models.summary`. (The module is `tfacd.model_summary`, so that the name
`tfacd.summary` can be the function.)"""

from __future__ import annotations

import dataclasses

import numpy as np
from tensorflow_model_optimization.python.core.quantization.keras import quantize_layer
from tensorflow_model_optimization.python.core.quantization.keras import quantize_wrapper

from tfacd.quantizers import iter_quantizers


@dataclasses.dataclass
class LayerRow:
    name: str
    type: str
    weight_bits: str
    activation_bits: str
    granularity: str
    parameters: int
    memory_bytes: float           # weights at their true bit widths, the rest float32
    float32_bytes: float
    sqnr_db: float | None


def layer_rows(model, sqnr: dict | None = None) -> list[LayerRow]:
    """One `LayerRow` per layer. `sqnr`: `tfacd.sqnr.measure(model, x)` output, to show
    measured SQNR; without it the last value each quantizer recorded (0 if never)."""
    by_layer = {}
    for layer, tensor, quantizer, variables in iter_quantizers(model):
        by_layer.setdefault(layer.name, []).append((tensor, quantizer, variables))
    quantizer_state = {id(v) for entries in by_layer.values() for _, _, variables in entries
                       for v in variables.values()}
    rows = []
    for layer in model.layers:
        inner = layer.layer if isinstance(layer, quantize_wrapper.QuantizeWrapper) else layer
        entries = by_layer.get(layer.name, [])
        weights = [(t, q, v) for t, q, v in entries if q.kind == "weight"]
        outputs = [(t, q, v) for t, q, v in entries if q.kind == "activation"]
        quantized_bits = {}
        for tensor, quantizer, _ in weights:
            quantized_bits[tensor] = quantizer.num_bits
        parameters, memory = 0, 0.0
        # A wrapper keeps the float kernels it quantizes in `_weight_vars`, not in the inner
        # layer's weights; the quantizers' own state (clips, statistics) is not a parameter.
        own_weights = {}
        if not isinstance(layer, quantize_layer.QuantizeLayer):
            for weight in list(inner.weights) + [w for w, _, _ in
                                                  getattr(layer, "_weight_vars", [])]:
                own_weights.setdefault(id(weight), weight)
        own_weights = [w for key, w in own_weights.items() if key not in quantizer_state]
        for weight in own_weights:
            short = weight.name.split("/")[-1].split(":")[0]
            count = int(np.prod(weight.shape))
            parameters += count
            memory += count * quantized_bits.get(short, 32) / 8
        sqnr_values = []
        for tensor, _, variables in entries:
            key = f"{layer.name}/{tensor}"
            value = sqnr.get(key) if sqnr is not None else float(variables["sqnr_db"].numpy())
            if value is not None:
                sqnr_values.append(value)
        granularities = sorted({q.granularity for _, q, _ in entries})
        rows.append(LayerRow(
            name=layer.name,
            type=("QuantizeLayer" if isinstance(layer, quantize_layer.QuantizeLayer)
                  else type(inner).__name__),
            weight_bits="/".join(str(q.num_bits) for _, q, _ in weights) or
            ("32" if parameters else "-"),
            activation_bits="/".join(str(q.num_bits) for _, q, _ in outputs) or "-",
            granularity="/".join(granularities) or "-",
            parameters=parameters, memory_bytes=memory, float32_bytes=parameters * 4.0,
            sqnr_db=float(np.mean(sqnr_values)) if sqnr_values else None))
    return rows


def summary(model, sqnr: dict | None = None, print_fn=print) -> str:
    """Prints (and returns) a table of every layer: weight and activation bits, granularity,
    parameter count, memory at the true bit widths vs float32, and mean SQNR (dB).

    Memory counts each quantized weight at its bit width and every other parameter (biases,
    BatchNorm) at 32 bits, i.e. what a bit-packed deployment would store.
    """
    rows = layer_rows(model, sqnr)
    header = ("Layer", "Type", "W bits", "A bits", "Granularity", "Params", "Memory (KiB)",
              "Float32 (KiB)", "SQNR (dB)")
    table = [header]
    for row in rows:
        table.append((row.name, row.type, row.weight_bits, row.activation_bits,
                      row.granularity, f"{row.parameters:,}", f"{row.memory_bytes / 1024:.2f}",
                      f"{row.float32_bytes / 1024:.2f}",
                      "-" if row.sqnr_db is None else f"{row.sqnr_db:.1f}"))
    total_params = sum(r.parameters for r in rows)
    memory = sum(r.memory_bytes for r in rows)
    float_memory = sum(r.float32_bytes for r in rows)
    table.append(("Total", "", "", "", "", f"{total_params:,}", f"{memory / 1024:.2f}",
                  f"{float_memory / 1024:.2f}", ""))
    widths = [max(len(str(line[i])) for line in table) for i in range(len(header))]
    lines = []
    for index, line in enumerate(table):
        lines.append("  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)))
        if index == 0 or index == len(table) - 2:
            lines.append("  ".join("-" * width for width in widths))
    ratio = memory / float_memory if float_memory else 1.0
    lines.append(f"Model memory: {memory / 1024:.2f} KiB at true bit widths vs "
                 f"{float_memory / 1024:.2f} KiB float32 ({ratio:.3f}x)")
    text = "\n".join(lines)
    if print_fn is not None:
        print_fn(text)
    return text
