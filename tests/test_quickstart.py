"""The main job (`make train`, `python -m tfacd.quickstart`) on a tiny budget, and its data
choice: tensorflow-datasets when it can, else the embedded sample, said in one line."""

import json
import os
import pathlib
import subprocess
import sys

from tfacd import data as data_lib
from tfacd import quickstart

REPO = pathlib.Path(__file__).resolve().parent.parent


def test_offline_it_names_and_uses_the_embedded_sample(monkeypatch):
    monkeypatch.setattr(data_lib, "tfds_prepared", lambda name: False)
    monkeypatch.setattr(data_lib, "online", lambda: False)
    dataset, line = quickstart.choose_dataset("cifar10")
    assert dataset == str(quickstart.SAMPLE) and "offline" in line and "sample" in line
    monkeypatch.setattr(data_lib, "online", lambda: True)
    assert quickstart.choose_dataset("cifar10")[0] == "cifar10"
    monkeypatch.setattr(data_lib, "tfds_prepared", lambda name: True)
    dataset, line = quickstart.choose_dataset("cifar10")
    assert dataset == "cifar10" and "tensorflow-datasets" in line
    assert quickstart.choose_dataset("/my/folder") == ("/my/folder",
                                                       "data: /my/folder (as requested)")


def test_the_embedded_sample_and_checkpoint_are_shipped():
    splits = data_lib.load(str(quickstart.SAMPLE), val_fraction=0.0)
    assert splits.x_train.shape == (3000, 32, 32, 3) and splits.x_test.shape[0] == 1000
    assert splits.class_names[:3] == ["airplane", "automobile", "bird"]
    assert (quickstart.PRETRAINED / "weights.index").is_file()
    assert "Validation top-1" in (quickstart.PRETRAINED / "README.md").read_text()


def test_main_job_runs_the_whole_path_on_a_tiny_budget(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(
        [sys.executable, "-m", "tfacd.quickstart", f"--dataset={quickstart.SAMPLE}",
         f"--model_dir={tmp_path}", "--epochs=1", "--steps_per_epoch=2", "--batch_size=16",
         "--bn_reestimate_batches=1", "--calibration_batches=1"],
        capture_output=True, text=True, timeout=1500, env=env, cwd=str(REPO))
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    for phase in ("data:", "float model", "calibration", "BatchNorm statistics re-estimated",
                  "evaluation", "TFLite export and LiteRT evaluation"):
        assert phase in out, phase
    assert "done in" in out
    results = json.loads((tmp_path / "results.json").read_text())
    tflite = results["tflite"]
    assert (tmp_path / "model.tflite").stat().st_size == tflite["file_bytes"]
    assert tflite["num_examples"] == 1000                   # the sample's test images
    summary = out[out.index("tfacd quickstart:"):]
    assert f"{100 * tflite['accuracy']:6.2f} %" in summary
    assert f"{100 * tflite['top1_agreement']:6.2f} %   top-1 agreement" in summary
    assert "x the float file" in summary and "train_main.py" in summary
    assert tflite["top1_agreement"] >= 0.99
