"""scripts/: the ablation runner, the results table (+ shipping) and the plots, end to end
on a tiny plan over a generated image folder."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from tests.test_data import make_folder

REPO = pathlib.Path(__file__).resolve().parent.parent
TINY_PLAN = """
common: {architecture: mobilenet_v2_cifar_tiny, width: 0.35, batch_size: 8, bn_momentum: 0.9,
         calibration_batches: 1, steps_per_epoch: 2}
qat: {epochs: 2, export: false, freeze_bn: true}
runs:
  c10_float: {config: configs/cifar10_float.yaml, epochs: 1}
  c10_w2a2_pl_s0: {config: configs/cifar10_w2a2_per_layer.yaml, seed: 0}
  c10_w2a2_pl_s1: {config: configs/cifar10_w2a2_per_layer.yaml, seed: 1}
  c10_w2a2_pc_s0: {config: configs/cifar10_w2a2_per_channel.yaml}
  c10_w2a2_pc_acd_sqnr_s0: {config: configs/cifar10_w2a2_per_channel_acd_sqnr.yaml,
                            export: true}
  c10_tfmot_8bit: {config: configs/cifar10_tfmot_default_8bit.yaml, export: true}
  c10_w2a2_from_w2a2: {config: configs/cifar10_w2a2_per_channel.yaml, init_from: c10_w2a2_pc_s0,
                       distill_from: c10_float, distill_weight: 0.5, epochs: 1}
"""


def run_script(name, *args, timeout=1200):
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, str(REPO / "scripts" / name), *args],
                          capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=str(REPO))


def _script_module(name):
    """`scripts/<name>.py` imported as a module (the scripts are not a package)."""
    import importlib.util  # pylint: disable=import-outside-toplevel
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
    root = tmp_path_factory.mktemp("ablation")
    folder = make_folder(root / "images", per_class=12)
    plan = root / "plan.yaml"
    plan.write_text(TINY_PLAN)
    runs = root / "runs"
    result = run_script("ablation.py", f"--plan={plan}", f"--runs_dir={runs}",
                        f"--dataset={folder}", "--parallel=2")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return plan, runs, folder, result.stdout


def test_runner_trains_every_run_from_the_float_run(ablation):
    plan, runs, _, stdout = ablation
    for name in ("c10_float", "c10_w2a2_pl_s0", "c10_w2a2_pl_s1", "c10_w2a2_pc_s0",
                 "c10_w2a2_pc_acd_sqnr_s0"):
        results = json.loads((runs / name / "results.json").read_text())
        assert (runs / f"{name}.log").is_file()
        if name != "c10_float":
            config = results["config"]
            assert config["init_from"] == str(runs / "c10_float")
            assert config["freeze_bn"] and config["epochs"] == 2
            assert [e["epoch"] for e in results["epochs"]] == [1, 2]
    assert json.loads((runs / "c10_w2a2_pl_s1" / "results.json").read_text())[
        "config"]["seed"] == 1
    assert (runs / "c10_w2a2_pc_acd_sqnr_s0" / "model.tflite").is_file()
    # tfmot's reference row is exported by tfmot's own conversion and scored the same way.
    tfmot = json.loads((runs / "c10_tfmot_8bit" / "results.json").read_text())["tflite"]
    assert tfmot["file_bytes"] > 0 and 0.0 <= tfmot["accuracy"] <= 1.0
    assert not (runs / "c10_w2a2_pc_s0" / "model.tflite").exists()
    # Status, and a rerun that finds everything done and trains nothing.
    status = run_script("ablation.py", f"--plan={plan}", f"--runs_dir={runs}", "--status")
    assert status.returncode == 0 and status.stdout.count(" done ") == 7, status.stdout
    # A stage names the run it starts from and its teacher; it ran after both.
    staged = json.loads((runs / "c10_w2a2_from_w2a2" / "results.json").read_text())
    assert staged["config"]["init_from"] == str(runs / "c10_w2a2_pc_s0")
    assert staged["config"]["distill_from"] == str(runs / "c10_float")
    assert "distill_loss" in staged["history"]
    again = run_script("ablation.py", f"--plan={plan}", f"--runs_dir={runs}", "--parallel=2")
    assert again.returncode == 0 and "start" not in again.stdout, again.stdout


def test_table_groups_seeds_and_ships_small_files(ablation, tmp_path):
    plan, runs, folder, _ = ablation
    result = run_script("results_table.py", f"--plan={plan}", f"--runs_dir={runs}",
                        "--ship=c10_w2a2_pc_acd_sqnr_s0", f"--to={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| c10")]
    assert len(rows) == 6, result.stdout                 # the two per-layer seeds are one row
    # The stage from c10_w2a2_pc_s0 is a row of its own, not a third seed of that run's row.
    assert any(r.startswith("| c10_w2a2_from_w2a2 |") for r in rows), result.stdout
    per_layer = next(r for r in rows if "c10_w2a2_pl_s0, c10_w2a2_pl_s1" in r)
    assert "±" in per_layer and "per-layer" in per_layer
    shipped = tmp_path / "c10_w2a2_pc_acd_sqnr_s0"
    assert sorted(p.name for p in shipped.iterdir()) == [
        "model.tflite", "model_report.json", "results.json"]
    # No path of this machine in the shipped files: runs/<run>, the folder by its name.
    text = (shipped / "results.json").read_text()
    assert str(runs) not in text and str(folder) not in text
    assert json.loads(text)["config"]["dataset"] == folder.name
    unfinished = run_script("results_table.py", f"--plan={plan}", f"--runs_dir={runs}",
                            "--ship=c10_nothing", f"--to={tmp_path}")
    assert unfinished.returncode == 2 and "c10_nothing" in unfinished.stderr


def test_plots_are_drawn_from_results(ablation, tmp_path):
    _, runs, _, _ = ablation
    result = run_script("plots.py", f"--runs_dir={runs}", f"--out={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("depthwise_ranges.png", "per_layer_sqnr.png", "val_accuracy.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name
    # Runs missing from the plan are named, not fatal.
    assert "c10_w2a2_pc_acd_decay" in result.stderr
    missing = run_script("plots.py", f"--runs_dir={tmp_path / 'none'}", f"--out={tmp_path}")
    assert missing.returncode == 2 and "not found" in missing.stderr


def test_the_shipped_plans_load():
    sys.path.insert(0, str(REPO / "scripts"))
    import ablation as runner  # pylint: disable=import-outside-toplevel
    for plan in sorted((REPO / "configs" / "plans").glob("*.yaml")):
        runs, float_run = runner.load_plan(str(plan), None)
        assert float_run in {r.name for r in runs}
        qat_runs = sum(r.mode == "qat" for r in runs)
        # An ablation plan holds every row; a probe plan a few short runs.
        assert qat_runs >= (2 if plan.name.startswith("probe_") else 12), plan.name
    # The recipe's float run adopts the shipped checkpoint instead of training.
    runs, float_run = runner.load_plan(str(REPO / "configs" / "plans" / "recipe_cifar10.yaml"),
                                       None)
    command = next(r for r in runs if r.name == float_run).command(REPO / "runs", None)
    checkpoint = REPO / "tfacd" / "pretrained" / "mobilenet_v2_cifar10_w0.5" / "weights"
    assert f"--init_from={checkpoint}" in command and "--epochs=0" in command
    assert pathlib.Path(str(checkpoint) + ".index").is_file()


def test_export_diff_compares_keras_baked_graph_and_interpreter(ablation):
    _, runs, _, _ = ablation
    result = run_script("export_diff.py", f"--model_dir={runs / 'c10_w2a2_pl_s0'}",
                        "--count=8", "--perturbation=0", "--layers")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "keras vs baked graph: agreement" in result.stdout
    # No perturbation: the perturbed copy is the model itself.
    assert ("keras vs keras perturbed: agreement 1.0000, max logit difference 0.0000"
            in result.stdout), result.stdout
    assert "perturbed 0 BatchNorm" not in result.stdout
    # --layers: one line per quantized activation, the input's quantizer first.
    assert "values rounded differently" in result.stdout
    assert "  quantize_layer " in result.stdout
    assert "baked graph vs tflite reference: agreement" in result.stdout
    missing = run_script("export_diff.py", f"--model_dir={runs / 'nothing'}")
    assert missing.returncode == 2 and "results.json" in missing.stderr


@pytest.mark.parametrize("plan_text, message", [
    ("runs:\n  f: {config: configs/cifar10_float.yaml, wieght_bits: 2}\n",
     "run 'f': unknown config key 'wieght_bits'"),
    ("runs:\n  q: {config: configs/cifar10_w2a2_per_layer.yaml}\n",
     "needs exactly one float run"),
    ("runs:\n  f: {config: configs/cifar10_float.yaml, model_dir: x}\n",
     "sets model_dir"),
    ("run:\n  f: {config: configs/cifar10_float.yaml}\n", "unknown top-level keys"),
    ("runs:\n  f: {config: configs/cifar10_float.yaml}\n"
     "  q: {config: configs/cifar10_w2a2_per_layer.yaml, init_from: w4}\n",
     "run 'q': init_from='w4' is not another run of the plan"),
    ("runs:\n  f: {config: configs/cifar10_float.yaml}\n"
     "  q: {config: configs/cifar10_w2a2_per_layer.yaml, init_from: w4}\n"
     "  w4: {config: configs/cifar10_w4a4_per_layer.yaml}\n",
     "listed after it"),
])
def test_bad_plans_exit_2_before_training(tmp_path, plan_text, message):
    plan = tmp_path / "plan.yaml"
    plan.write_text(plan_text)
    result = run_script("ablation.py", f"--plan={plan}", f"--runs_dir={tmp_path / 'runs'}")
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "runs").exists()


def test_table_names_mixed_granularities():
    table = _script_module("results_table")
    config = {"mode": "qat", "weight_bits": 2, "activation_bits": 2, "acd": "off",
              "sqnr_weight": 0.0, "granularity": "per_channel", "activation_granularity": ""}
    assert table.describe(config)[1] == "per-channel"
    mixed = dict(config, activation_granularity="per_layer")
    assert table.describe(mixed)[1] == "per-channel W, per-layer A"
    assert table.row_key(mixed) != table.row_key(config)      # separate rows, never averaged
    # tfmot's 8-bit and n-bit rows are rows of their own, named by scheme and bits.
    tfmot = dict(config, tfmot_default=True, tfmot_scheme="default_8bit", weight_bits=8,
                 activation_bits=8)
    n_bit = dict(tfmot, tfmot_scheme="default_n_bit", weight_bits=4, activation_bits=4)
    assert table.row_key(tfmot) != table.row_key(n_bit)
    assert table.describe(n_bit)[0] == "W4A4 (tfmot default_n_bit)"


def test_table_names_an_adopted_float_checkpoint(tmp_path):
    """A float run that adopted a checkpoint (`epochs: 0`) shows the checkpoint's folder and
    no training time, not "0 epochs in 0 hours"."""
    table = _script_module("results_table")
    run_dir = tmp_path / "c10_float"
    run_dir.mkdir()
    (run_dir / "results.json").write_text(json.dumps({
        "config": {"mode": "float", "epochs": 0,
                   "init_from": "tfacd/pretrained/mobilenet_v2_cifar10_w0.5/weights"},
        "val_accuracy": 0.8568, "train_seconds": 4e-6, "train_seconds_total": None}))
    run = table.ablation.Run("c10_float", "configs/cifar10_float.yaml", {}, "float")
    text, unfinished = table.table(tmp_path, [run])
    row = next(line for line in text.splitlines() if line.startswith("| c10_float"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[5] == "checkpoint mobilenet_v2_cifar10_w0.5" and cells[6] == "85.68"
    assert cells[-1] == "-" and not unfinished and "*" not in text


def test_table_keeps_progressive_and_longer_runs_apart_from_the_seeds_they_resemble(tmp_path):
    """Seeds of one row share it, whatever settings their results.json predates and
    wherever they were run; a stage from another QAT run, or a longer schedule, is a row of
    its own, and the stage's epochs name the run it started from."""
    table = _script_module("results_table")
    base = {"mode": "qat", "weight_bits": 2, "activation_bits": 2, "acd": "decay",
            "sqnr_weight": 0.05, "granularity": "per_channel", "epochs": 15}
    configs = {
        "w4a4": dict(base, weight_bits=4, activation_bits=4, init_from="elsewhere/c10_float"),
        "s0": dict(base, seed=0, init_from="runs/c10_float", dataset="cifar10-jpeg"),
        "s1": dict(base, seed=1, init_from=str(tmp_path / "c10_float"),
                   dataset="/data/cifar10-jpeg", requantization="float"),
        "prog": dict(base, init_from=str(tmp_path / "w4a4")),
        "e40": dict(base, epochs=40, init_from=str(tmp_path / "c10_float"))}
    runs = []
    for name, config in configs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps({
            "config": config, "val_accuracy": 0.5, "train_seconds_total": 3600}))
        runs.append(table.ablation.Run(name, "configs/x.yaml", {}, "qat"))
    text, _ = table.table(tmp_path, runs)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
            for line in text.splitlines()[2:] if line.startswith("|")}
    assert set(rows) == {"w4a4", "s0, s1", "prog", "e40"}, text
    assert rows["prog"][5] == "15 after w4a4" and rows["e40"][5] == "40"
    assert rows["s0, s1"][5] == "15"


def test_plots_find_a_variant_under_its_recipe_plan_name(tmp_path, capsys):
    """The recipe plan names per-channel + ACD `c10_w2a2_pc_acd` (the older ablation plan
    `c10_w2a2_pc_acd_decay`): the figures draw whichever is there."""
    plots = _script_module("plots")
    (tmp_path / "c10_w2a2_pc_acd").mkdir()
    (tmp_path / "c10_w2a2_pc_acd" / "results.json").write_text(json.dumps({"val_accuracy": 0.5}))
    found = plots.load_results(tmp_path, plots.W2A2_VARIANTS)
    assert found == {"per-channel + ACD decay": {"val_accuracy": 0.5}}
    assert "c10_w2a2_pl_s0" in capsys.readouterr().err


def test_first_divergence_finds_where_runtimes_part_and_names_bad_input():
    # The shipped `float`-policy W2A2 file on 2 sample images: XNNPACK and the builtin
    # kernels part at the int8 input's DEQUANTIZE (an ulp) and in the stem convolution.
    result = run_script("diagnostics/first_divergence.py",
                        "--tflite=results/c10_w2a2_pc_acd_sqnr_s0/model.tflite",
                        "--data=tfacd/samples/cifar10", "--count=2", "--ops=3", timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("op ")]
    assert len(lines) == 3
    assert any("DEQUANTIZE" in line for line in lines)
    # The per-tensor int8 file with portable requantization computes alike on both.
    same = run_script("diagnostics/first_divergence.py",
                      "--tflite=results/c10_w2a2_micro_portable/model.tflite",
                      "--data=tfacd/samples/cifar10", "--count=2", timeout=600)
    assert same.returncode == 0, same.stderr[-2000:]
    assert "compute every op's output alike" in same.stdout
    missing = run_script("diagnostics/first_divergence.py", "--tflite=nowhere.tflite",
                         "--data=tfacd/samples/cifar10")
    assert missing.returncode == 2 and "no TFLite file" in missing.stderr
