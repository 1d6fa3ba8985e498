"""The ablation table (Markdown) from the runs' results.json files; optionally ships runs.

    python scripts/results_table.py --plan configs/plans/ablation_cifar10.yaml --runs_dir RUNS
    python scripts/results_table.py --plan ... --runs_dir RUNS --ship c10_float,... --to results

One row per configuration: runs that differ only in `seed` are one row, with the mean and the
spread (sample standard deviation; the seeds' values are listed too). Columns: W/A bits,
granularity, ACD, SQNR loss weight, epochs, validation top-1, TFLite top-1 (the exported file on the
same validation images), mean SQNR (dB, validation batch), wall time of the training
(summed over resumed invocations). A float run that adopted a checkpoint (`epochs: 0`)
names the checkpoint's folder instead of epochs. Unfinished runs are listed under the
table.

`--ship` copies a run's small files (model.tflite, results.json, model_report.json) into
`<to>/<run>/`, so anyone can check the numbers without retraining.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import shutil
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import ablation  # noqa: E402  pylint: disable=wrong-import-position
from tfacd import config as config_lib  # noqa: E402  pylint: disable=wrong-import-position

SHIPPED_FILES = ("model.tflite", "results.json", "model_report.json")


# Settings that only tell repeats of one row apart: the seed, and where the run was written.
_REPEAT_FIELDS = ("seed", "model_dir", "overwrite")
# Settings that name a run or a folder: compared by the folder's name (the same row may have
# been run with another runs_dir or data path).
_PATH_FIELDS = ("dataset", "data_dir", "init_from", "distill_from")


def row_key(config: dict) -> tuple:
    """Runs share a row when everything but the seed is the same (a progressive stage's
    `init_from`, a longer schedule or a portable stage make rows of their own). Settings a
    run's results.json predates count as their defaults."""
    full = {**dataclasses.asdict(config_lib.ExperimentConfig()), **config}
    for key in _PATH_FIELDS:
        full[key] = pathlib.Path(str(full[key] or "")).name
    return tuple(sorted((key, json.dumps(value, sort_keys=True))
                        for key, value in full.items() if key not in _REPEAT_FIELDS))


def _granularity(config: dict) -> str:
    """"per-channel", "per-layer", or "per-channel W, per-layer A" when the two differ."""
    weights = config["granularity"]
    activations = config.get("activation_granularity") or weights
    if activations == weights:
        return weights.replace("_", "-")
    return f"{weights.replace('_', '-')} W, {activations.replace('_', '-')} A"


def describe(config: dict) -> list[str]:
    if config["mode"] == "float":
        return ["float", "-", "-", "-"]
    if config.get("tfmot_default"):
        if config.get("tfmot_scheme", "default_8bit") == "default_8bit":
            return ["W8A8 (tfmot default)", "per-channel W, per-layer A", "-", "-"]
        return [f"W{config['weight_bits']}A{config['activation_bits']} (tfmot "
                f"{config['tfmot_scheme']})", "per-channel W, per-layer A", "-", "-"]
    return [f"W{config['weight_bits']}A{config['activation_bits']}",
            _granularity(config),
            config["acd"] if config["acd"] != "off" else "-",
            f"{config['sqnr_weight']:g}" if config["sqnr_weight"] else "-"]


def _percent(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{100 * values[0]:.2f}"
    listed = ", ".join(f"{100 * v:.2f}" for v in values)
    return f"{100 * np.mean(values):.2f} ± {100 * np.std(values, ddof=1):.2f} ({listed})"


def _mean(values, fmt):
    values = [v for v in values if v is not None]
    return fmt.format(np.mean(values)) if values else "-"


def _epochs(config: dict) -> str:
    """The epochs cell: the count, or the adopted checkpoint's folder (`epochs: 0`); for a
    QAT run that starts from another QAT run (a progressive or portable stage), the count
    and that run."""
    if not config["epochs"]:
        return "checkpoint " + pathlib.Path(config["init_from"]).parent.name
    source = pathlib.Path(config.get("init_from") or "")
    saved = source / "results.json"
    if config["mode"] == "qat" and saved.is_file() and \
            json.loads(saved.read_text())["config"]["mode"] == "qat":
        return f"{config['epochs']} after {source.name}"
    return str(config["epochs"])


def table(runs_dir: pathlib.Path, runs: list) -> tuple[str, list[str]]:
    """(Markdown table, names of unfinished runs)."""
    rows, order, unfinished, footnote = {}, [], [], False
    for run in runs:
        path = runs_dir / run.name / "results.json"
        if not path.is_file():
            unfinished.append(run.name)
            continue
        results = json.loads(path.read_text())
        key = row_key(results["config"])
        if key not in rows:
            rows[key] = []
            order.append(key)
        rows[key].append((run.name, results))
    header = ("| runs | W/A bits | granularity | ACD | SQNR weight | epochs | val top-1 % | "
              "TFLite top-1 % | mean SQNR dB | train time h |")
    lines = [header, "|---" * (header.count("|") - 1) + "|"]
    for key in order:
        members = rows[key]
        results = [r for _, r in members]
        seconds = [r.get("train_seconds_total") or r.get("train_seconds") for r in results]
        # A run that predates the epoch log knows only its last invocation's time.
        partial_time = any(not r.get("train_seconds_total") for r in results)
        if any(not r["config"]["epochs"] for r in results):
            # A float checkpoint adopted as a run (`epochs: 0`): trained elsewhere, by the
            # command its folder's README gives.
            seconds = [None] * len(results)
            partial_time = False
        lines.append("| " + " | ".join([
            ", ".join(name for name, _ in members),
            *describe(results[0]["config"]),
            "/".join(sorted({_epochs(r["config"]) for r in results})),
            _percent([r.get("val_accuracy") for r in results]),
            _percent([(r.get("tflite") or {}).get("accuracy") for r in results]),
            _mean([r.get("mean_sqnr_db") for r in results], "{:.2f}"),
            _mean([s / 3600 if s else None for s in seconds], "{:.2f}")
            + ("*" if partial_time else ""),
        ]) + " |")
        footnote = footnote or partial_time
    if footnote:
        lines.append("\n\\* the last invocation only: the run predates the epoch log that sums "
                     "the wall time over resumed invocations")
    return "\n".join(lines), unfinished


def ship(runs_dir: pathlib.Path, names: list[str], to: pathlib.Path) -> list[pathlib.Path]:
    copied = []
    for name in names:
        source = runs_dir / name
        if not (source / "results.json").is_file():
            raise ablation.PlanError(f"--ship: {source} has no results.json (not finished)")
        target = to / name
        target.mkdir(parents=True, exist_ok=True)
        for file in SHIPPED_FILES:
            if not (source / file).is_file():
                continue
            if file.endswith(".json"):
                # Paths of this machine's run folder become "runs/...": a shipped file
                # names the run, not where it happened to live.
                text = (source / file).read_text()
                for prefix in {str(runs_dir), str(runs_dir.resolve())}:
                    text = text.replace(prefix.rstrip("/") + "/", "runs/")
                # ... and an image folder given by its absolute path, by its name.
                dataset = json.loads((source / "results.json").read_text()).get(
                    "config", {}).get("dataset", "")
                if os.path.isabs(dataset):
                    text = text.replace(json.dumps(dataset)[1:-1],
                                        pathlib.Path(dataset).name)
                (target / file).write_text(text)
            else:
                shutil.copy2(source / file, target / file)
            copied.append(target / file)
    return copied


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--plan", required=True)
    parser.add_argument("--runs_dir", required=True)
    parser.add_argument("--ship", default="", help="comma-separated run names to ship")
    parser.add_argument("--to", default="results", help="where shipped runs go")
    args = parser.parse_args(argv)
    runs_dir = pathlib.Path(args.runs_dir)
    try:
        runs, _ = ablation.load_plan(args.plan, None)
        text, unfinished = table(runs_dir, runs)
        print(text)
        if unfinished:
            print(f"\nnot finished: {', '.join(unfinished)}")
        if args.ship:
            for path in ship(runs_dir, args.ship.split(","), pathlib.Path(args.to)):
                print(f"shipped {path} ({path.stat().st_size:,} bytes)")
    except ablation.PlanError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
