"""The ablation's figures, drawn only from the runs' results.json files.

    python scripts/plots.py --runs_dir RUNS --out docs/img

1. depthwise_ranges.png: one depthwise layer's per-channel activation ranges (validation
   batch) with the clips each run learned: a per-layer run has one [l, u] for all channels,
   a per-channel run one per channel. The picture of why per-channel clips matter.
2. per_layer_sqnr.png: SQNR (dB) of every quantizer for the per-layer, per-channel and
   per-channel + ACD + SQNR runs.
3. val_accuracy.png: validation top-1 after every QAT epoch for each W2A2 variant.

Run names are those of configs/plans/ablation_cifar10.yaml or configs/plans/recipe_cifar10.yaml;
a missing run is skipped with a note (so the script also works on a partly finished plan).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=wrong-import-position
import numpy as np  # noqa: E402  pylint: disable=wrong-import-position

# Label -> the run's name in configs/plans/ablation_cifar10.yaml, then in
# configs/plans/recipe_cifar10.yaml where it differs; the first one present is drawn.
W2A2_VARIANTS = {
    "per-layer": ("c10_w2a2_pl_s0", "c10_w2a2_pl_s1"),
    "per-channel": ("c10_w2a2_pc_s0",),
    "per-channel + ACD decay": ("c10_w2a2_pc_acd_decay", "c10_w2a2_pc_acd"),
    "per-channel + ACD pull": ("c10_w2a2_pc_acd_pull",),
    "per-channel + SQNR": ("c10_w2a2_pc_sqnr",),
    "per-channel + ACD + SQNR": ("c10_w2a2_pc_acd_sqnr_s0",),
    "per-channel W, per-layer A": ("c10_w2a2_pcw_pla_s0",),
    "per-channel W, per-layer A + ACD + SQNR": ("c10_w2a2_pcw_pla_acd_sqnr_s0",
                                                "c10_w2a2_pcw_pla_acd_sqnr"),
}
SQNR_RUNS = ("per-layer", "per-channel", "per-channel + ACD + SQNR")


def load_results(runs_dir: pathlib.Path, names: dict[str, tuple]) -> dict[str, dict]:
    found = {}
    for label, candidates in names.items():
        path = next((runs_dir / name / "results.json" for name in candidates
                     if (runs_dir / name / "results.json").is_file()), None)
        if path is not None:
            found[label] = json.loads(path.read_text())
        else:
            print(f"note: no results.json for {' or '.join(candidates)} in {runs_dir}; "
                  f"'{label}' left out", file=sys.stderr)
    return found


def pick_depthwise_layer(results: dict[str, dict], layer: str | None) -> str | None:
    """The requested layer, or the one whose channel ranges differ most (max/median of the
    per-channel range widths) in the first run that has any."""
    for run in results.values():
        ranges = run.get("depthwise_activation_ranges") or {}
        if layer:
            matches = [name for name in ranges if layer in name]
            if matches:
                return matches[0]
            continue
        if ranges:
            def spread(name):
                width = np.subtract(ranges[name]["channel_max"], ranges[name]["channel_min"])
                return float(width.max() / max(np.median(width), 1e-6))
            return max(ranges, key=spread)
    return None


def plot_depthwise_ranges(results: dict[str, dict], layer: str, path: pathlib.Path):
    runs = {label: r for label, r in results.items()
            if layer in (r.get("depthwise_activation_ranges") or {})}
    fig, axes = plt.subplots(len(runs), 1, figsize=(10, 3.2 * len(runs)), squeeze=False)
    for ax, (label, run) in zip(axes[:, 0], runs.items()):
        info = run["depthwise_activation_ranges"][layer]
        low, high = np.array(info["channel_min"]), np.array(info["channel_max"])
        order = np.argsort(high - low)
        channels = np.arange(len(order))
        ax.vlines(channels, low[order], high[order], color="0.6", lw=1.5,
                  label="data range per channel")
        lower = np.broadcast_to(np.array(info["lower"]), low.shape)[order]
        upper = np.broadcast_to(np.array(info["upper"]), high.shape)[order]
        ax.plot(channels, upper, "r.", ms=3, label="learned upper clip")
        ax.plot(channels, lower, "b.", ms=3, label="learned lower clip")
        ax.set_title(f"{label}: {layer} ({info['granularity']}, {info['num_bits']} bits)",
                     fontsize=10)
        ax.set_ylabel("activation")
        ax.legend(fontsize=8, loc="upper left")
    axes[-1, 0].set_xlabel("channel (sorted by data range)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sqnr(results: dict[str, dict], path: pathlib.Path):
    fig, ax = plt.subplots(figsize=(11, 4))
    names = None
    for label in SQNR_RUNS:
        if label not in results:
            continue
        per_layer = results[label].get("per_layer_sqnr_db") or {}
        names = names or list(per_layer)
        ax.plot(range(len(names)), [per_layer.get(n, np.nan) for n in names], ".-", lw=0.8,
                label=f"{label} (mean {results[label].get('mean_sqnr_db', float('nan')):.1f} dB)")
    if names:
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([n.replace("quant_", "") for n in names], rotation=90, fontsize=5)
    ax.set_ylabel("SQNR (dB), validation batch")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _val_curve(run: dict) -> list[float]:
    epochs = run.get("epochs") or []
    if epochs and all("val_accuracy" in e for e in epochs):
        return [e["val_accuracy"] for e in epochs]
    return run.get("history", {}).get("val_accuracy", [])


def plot_val_accuracy(results: dict[str, dict], path: pathlib.Path):
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, run in results.items():
        curve = _val_curve(run)
        if curve:
            ax.plot(range(1, len(curve) + 1), [100 * v for v in curve], "o-", label=label)
    ax.set_xlabel("QAT epoch")
    ax.set_ylabel("validation top-1 (%)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs_dir", required=True)
    parser.add_argument("--out", default="docs/img")
    parser.add_argument("--layer", default="", help="depthwise layer name (part) for plot 1")
    args = parser.parse_args(argv)
    runs_dir, out = pathlib.Path(args.runs_dir), pathlib.Path(args.out)
    if not runs_dir.is_dir():
        print(f"error: runs directory not found: {runs_dir}", file=sys.stderr)
        return 2
    results = load_results(runs_dir, W2A2_VARIANTS)
    if not results:
        print(f"error: no W2A2 run with results.json in {runs_dir}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    written = []
    layer = pick_depthwise_layer(
        {k: results[k] for k in SQNR_RUNS if k in results}, args.layer or None)
    if layer:
        plot_depthwise_ranges({k: results[k] for k in SQNR_RUNS if k in results}, layer,
                              out / "depthwise_ranges.png")
        written.append("depthwise_ranges.png")
    plot_sqnr(results, out / "per_layer_sqnr.png")
    plot_val_accuracy(results, out / "val_accuracy.png")
    written += ["per_layer_sqnr.png", "val_accuracy.png"]
    print(f"wrote {', '.join(written)} to {out}" + (f" (depthwise layer {layer})" if layer else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
