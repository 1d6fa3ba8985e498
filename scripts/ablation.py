"""Runs an ablation plan: a float run, then QAT runs that start from it or from each other.

    python scripts/ablation.py --plan configs/plans/ablation_cifar10.yaml --runs_dir RUNS \\
        --dataset ../shared/data/cifar10-jpeg --parallel 2
    python scripts/ablation.py --plan configs/plans/ablation_cifar10.yaml --runs_dir RUNS --status

The plan (YAML) names every run with its experiment config and flag overrides; `qat` holds
the flags every QAT run shares (the common budget). A QAT run starts from the float run,
or from the run its `init_from` names (a progressive stage, e.g. W4A4 -> W2A2), and may
name its distillation teacher with `distill_from`; a run waits for the runs it names. The
float run may instead adopt a float checkpoint, `{init_from: PATH, epochs: 0}` (the shipped
`tfacd/pretrained/...` model): scored and saved as a run, not trained.
Each run is `train_main.py` in its own process with its log in `RUNS/<name>.log`, so the
plan is resumable at any moment: a run with
`results.json` is done and skipped; an unfinished one continues from its last finished epoch
(Keras BackupAndRestore in train.py); rerunning this command picks everything up. With
`--parallel N` the QAT runs go N at a time, each pinned to its own share of the CPUs (on this
2-core machine two 1-thread runs train ~25% more images per second in total than one 2-thread
run). A failing run is reported and the others go on; the exit status is 1 if any failed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import fcntl
import json
import os
import pathlib
import subprocess
import sys
import time

import yaml

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tfacd import config as config_lib  # noqa: E402  pylint: disable=wrong-import-position
from tfacd import train  # noqa: E402  pylint: disable=wrong-import-position


class PlanError(ValueError):
    pass


RUN_REFERENCES = ("init_from", "distill_from")      # keys whose value names a plan run


@dataclasses.dataclass
class Run:
    name: str
    config_file: str
    overrides: dict
    mode: str
    references: dict = dataclasses.field(default_factory=dict)   # init_from/distill_from

    def needs(self, float_run: str) -> set[str]:
        """The runs that must be finished before this one starts."""
        needed = set(self.references.values())
        if self.mode == "qat" and "init_from" not in self.references:
            needed.add(float_run)
        return needed

    def command(self, runs_dir: pathlib.Path, float_run: str | None) -> list[str]:
        args = [sys.executable, str(REPO / "train_main.py"),
                f"--config={REPO / self.config_file}", f"--model_dir={runs_dir / self.name}"]
        if self.mode == "qat":
            args.append(f"--init_from={runs_dir / self.references.get('init_from', float_run)}")
        if "distill_from" in self.references:
            args.append(f"--distill_from={runs_dir / self.references['distill_from']}")
        args += [f"--{key}={_flag_value(value)}" for key, value in self.overrides.items()]
        return args


def _flag_value(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def load_plan(path: str, dataset: str | None) -> tuple[list[Run], str]:
    """The plan's runs (every config checked now, before anything trains) and the name of
    its float run."""
    file = pathlib.Path(path)
    if not file.is_file():
        raise PlanError(f"plan not found: {path}")
    plan = yaml.safe_load(file.read_text()) or {}
    unknown = set(plan) - {"common", "qat", "runs"}
    if unknown:
        raise PlanError(f"{path}: unknown top-level keys {sorted(unknown)} "
                        "(expected common, qat, runs)")
    runs, float_runs = [], []
    for name, spec in (plan.get("runs") or {}).items():
        spec = dict(spec or {})
        config_file = spec.pop("config", None)
        if not config_file:
            raise PlanError(f"{path}: run {name!r} has no 'config'")
        base = config_lib.load_yaml(str(REPO / config_file))
        overrides = dict(plan.get("common") or {})
        if dataset:
            overrides["dataset"] = dataset
        if base.mode == "qat":
            overrides.update(plan.get("qat") or {})
        if base.mode == "float" and "init_from" in spec:
            # A float run may adopt a checkpoint (with `epochs: 0`, a shipped float model)
            # instead of training from scratch: a path, relative to the repository.
            checkpoint = pathlib.Path(str(spec.pop("init_from")))
            overrides["init_from"] = str(checkpoint if checkpoint.is_absolute()
                                         else REPO / checkpoint)
        references = {key: spec.pop(key) for key in RUN_REFERENCES if key in spec}
        overrides.update(spec)
        if "model_dir" in overrides:
            raise PlanError(f"{path}: run {name!r} sets model_dir; the runner does")
        if base.init_from or base.distill_from:
            raise PlanError(f"{path}: run {name!r}: {config_file} sets init_from or "
                            "distill_from; in a plan, name a plan run instead")
        try:
            checked = config_lib.from_dict(overrides, base).validate()
        except config_lib.ConfigError as error:
            raise PlanError(f"{path}: run {name!r}: {error}") from None
        runs.append(Run(name, config_file, overrides, checked.mode, references))
        if checked.mode == "float":
            float_runs.append(name)
    if len(float_runs) != 1:
        raise PlanError(f"{path}: needs exactly one float run, found {float_runs}")
    names = [run.name for run in runs]
    for run in runs:
        for key, target in run.references.items():
            if target not in names or target == run.name:
                raise PlanError(f"{path}: run {run.name!r}: {key}={target!r} is not another "
                                f"run of the plan")
            if key == "init_from" and names.index(target) > names.index(run.name):
                raise PlanError(f"{path}: run {run.name!r} starts from {target!r}, which is "
                                "listed after it: list the stages in order")
    return runs, float_runs[0]


def status(runs_dir: pathlib.Path, run: Run) -> dict:
    """done / partial (n epochs) / not started, with the numbers a finished run reports."""
    run_dir = runs_dir / run.name
    results_path = run_dir / "results.json"
    epochs = len(train.read_epoch_log(run_dir / train.EPOCH_LOG))
    if results_path.is_file():
        results = json.loads(results_path.read_text())
        tflite = results.get("tflite") or {}
        return {"state": "done", "epochs": epochs, "val": results.get("val_accuracy"),
                "tflite": tflite.get("accuracy"),
                "hours": (results.get("train_seconds_total")
                          or results.get("train_seconds") or 0) / 3600}
    if run_dir.exists():
        return {"state": "partial", "epochs": epochs}
    return {"state": "not started", "epochs": 0}


def _done(runs_dir: pathlib.Path, name: str) -> bool:
    return (runs_dir / name / "results.json").is_file()


def print_status(runs_dir: pathlib.Path, runs: list[Run]):
    for run in runs:
        info = status(runs_dir, run)
        extra = ""
        if info["state"] == "done":
            val = "-" if info["val"] is None else f"{100 * info['val']:.2f}%"
            tfl = "-" if info["tflite"] is None else f"{100 * info['tflite']:.2f}%"
            extra = f"  val {val}  tflite {tfl}  {info['hours']:.2f} h"
        print(f"{run.name:32s} {info['state']:12s} epochs {info['epochs']:3d}{extra}")


def _cpu_groups(parallel: int) -> list[list[int]]:
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cpus) < parallel:
        return [cpus] * parallel
    size = len(cpus) // parallel
    return [cpus[i * size:(i + 1) * size] for i in range(parallel)]


def execute(run: Run, runs_dir: pathlib.Path, float_run: str, cpus: list[int]) -> int:
    command = run.command(runs_dir, float_run)
    threads = str(max(len(cpus), 1))
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2",
               TF_NUM_INTRAOP_THREADS=threads, TF_NUM_INTEROP_THREADS="1")
    pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    log_path = runs_dir / f"{run.name}.log"
    # One runner per run: a second `ablation.py` on the same runs_dir skips what the first
    # is training instead of training it twice into the same directory.
    lock = (runs_dir / f".{run.name}.lock").open("w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"skip {run.name}: another runner is training it", flush=True)
        lock.close()
        return 0
    start = time.time()
    print(f"[{time.strftime('%H:%M:%S')}] start {run.name} on cpus {cpus or 'all'} "
          f"(log {log_path})", flush=True)
    with lock, log_path.open("a") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n")
        log.flush()
        code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                               cwd=str(REPO), preexec_fn=pin)
    print(f"[{time.strftime('%H:%M:%S')}] {run.name}: exit {code} after "
          f"{(time.time() - start) / 60:.1f} min", flush=True)
    return code


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--plan", required=True)
    parser.add_argument("--runs_dir", required=True)
    parser.add_argument("--dataset", default="", help="overrides every run's dataset")
    parser.add_argument("--parallel", type=int, default=1, help="QAT runs at a time")
    parser.add_argument("--only", default="", help="comma-separated run names")
    parser.add_argument("--status", action="store_true", help="print progress and exit")
    parser.add_argument("--dry_run", action="store_true", help="print the commands and exit")
    args = parser.parse_args(argv)
    try:
        if args.parallel < 1:
            raise PlanError(f"--parallel must be >= 1, got {args.parallel}")
        runs, float_run = load_plan(args.plan, args.dataset or None)
        if args.only:
            wanted = args.only.split(",")
            missing = sorted(set(wanted) - {r.name for r in runs})
            if missing:
                raise PlanError(f"--only: no run named {missing} in {args.plan}")
            runs = [r for r in runs if r.name in wanted]
    except (PlanError, config_lib.ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    runs_dir = pathlib.Path(args.runs_dir)
    if args.status:
        print_status(runs_dir, runs)
        return 0
    if args.dry_run:
        for run in runs:
            print(" ".join(run.command(runs_dir, float_run)))
        return 0
    runs_dir.mkdir(parents=True, exist_ok=True)
    todo = [r for r in runs if status(runs_dir, r)["state"] != "done"]
    failed = []
    # The float run first, on every CPU: all QAT runs start from it.
    for run in [r for r in todo if r.mode == "float"]:
        if execute(run, runs_dir, float_run, _cpu_groups(1)[0]) != 0:
            failed.append(run.name)
    qat = [r for r in todo if r.mode == "qat"]
    if qat and not _done(runs_dir, float_run):
        print(f"error: the float run {float_run} is not finished; QAT runs need it",
              file=sys.stderr)
        return 1
    groups = _cpu_groups(args.parallel)
    free = list(range(args.parallel))
    with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
        pending = {}
        queue = list(qat)
        while queue or pending:
            # Start, in plan order, every run whose own starting points are finished; a run
            # whose starting point failed fails too.
            for run in list(queue):
                needed = run.needs(float_run)
                if needed & set(failed):
                    queue.remove(run)
                    failed.append(run.name)
                    print(f"skip {run.name}: it needs {sorted(needed & set(failed))}, which "
                          "failed", flush=True)
                elif free and all(_done(runs_dir, name) for name in needed):
                    queue.remove(run)
                    slot = free.pop(0)
                    pending[pool.submit(execute, run, runs_dir, float_run, groups[slot])] = (
                        run, slot)
            if not pending:
                if queue:
                    print(f"error: {[r.name for r in queue]} wait for runs that are not in "
                          "this invocation (see --only)", file=sys.stderr)
                    failed.extend(r.name for r in queue)
                break
            finished, _ = concurrent.futures.wait(
                pending, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in finished:
                run, slot = pending.pop(future)
                free.append(slot)
                if future.result() != 0:
                    failed.append(run.name)
    print_status(runs_dir, runs)
    if failed:
        print(f"failed: {', '.join(failed)} (see their logs in {runs_dir})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
