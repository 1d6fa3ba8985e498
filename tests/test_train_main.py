"""train_main.py end to end on tiny data: float run, QAT from it, eval, resume, bad input."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.test_data import make_folder

REPO = pathlib.Path(__file__).resolve().parent.parent
TINY = ["--architecture=mobilenet_v2_cifar_tiny", "--width=0.35", "--batch_size=8",
        "--bn_momentum=0.9", "--calibration_batches=1"]


def run_cli(*args, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, str(REPO / "train_main.py"), *args],
                          capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=str(REPO))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("images"), per_class=12, with_test=True)


@pytest.fixture(scope="module")
def float_run(folder, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("float")
    result = run_cli(f"--dataset={folder}", f"--model_dir={model_dir}", "--mode=float",
                     "--epochs=2", "--steps_per_epoch=2", *TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    return model_dir


def _results(model_dir):
    return json.loads((pathlib.Path(model_dir) / "results.json").read_text())


def test_float_run_writes_results(float_run):
    results = _results(float_run)
    for key in ("config", "val_accuracy", "test_accuracy", "per_layer_sqnr_db",
                "train_seconds", "images_per_second"):
        assert key in results
    assert results["config"]["mode"] == "float" and results["config"]["epochs"] == 2
    assert 0.0 <= results["val_accuracy"] <= 1.0 and 0.0 <= results["test_accuracy"] <= 1.0
    assert results["train_seconds"] > 0 and results["images_per_second"] > 0
    assert (float_run / "final" / "weights.index").exists()
    assert any((float_run / "logs").rglob("events.out.tfevents.*"))


def test_qat_run_from_the_float_run(folder, float_run, tmp_path):
    result = run_cli(f"--dataset={folder}", f"--model_dir={tmp_path}", "--mode=qat",
                     f"--init_from={float_run}", "--weight_bits=2", "--activation_bits=2",
                     "--acd=decay", "--sqnr_weight=0.01", "--epochs=1", "--steps_per_epoch=2",
                     *TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    results = _results(tmp_path)
    assert results["config"]["acd"] == "decay" and results["config"]["weight_bits"] == 2
    sqnr = results["per_layer_sqnr_db"]
    assert sqnr and all(isinstance(v, float) for v in sqnr.values())
    assert "acd_lower_strength" in results["history"] and "mean_sqnr_db" in results["history"]
    # The depthwise activations' per-channel data ranges next to the clips (for the plots).
    ranges = results["depthwise_activation_ranges"]
    assert ranges and all(len(r["channel_min"]) == len(r["channel_max"]) == len(r["lower"])
                          and r["granularity"] == "per_channel" for r in ranges.values())
    assert all(low <= high for r in ranges.values()
               for low, high in zip(r["channel_min"], r["channel_max"]))
    # A second run into finished results refuses; eval mode reads them.
    again = run_cli(f"--dataset={folder}", f"--model_dir={tmp_path}", "--mode=qat",
                    f"--init_from={float_run}", *TINY)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    evaluated = run_cli(f"--model_dir={tmp_path}", "--mode=eval")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    printed, _ = json.JSONDecoder().raw_decode(evaluated.stdout[evaluated.stdout.index("{"):])
    assert printed["val_accuracy"] == pytest.approx(results["val_accuracy"])

    # The QAT run exported itself: model.tflite, its report, and a summary in results.json.
    tflite = results["tflite"]
    assert (tmp_path / "model.tflite").stat().st_size == tflite["file_bytes"]
    report = json.loads((tmp_path / "model_report.json").read_text())
    assert report["all_weight_zero_points_zero"] and report["all_distinct_within_2^bits"]
    assert tflite["num_examples"] == results["num_val"]
    assert 0.0 <= tflite["top1_agreement"] <= 1.0
    # Agreement with the model on XNNPACK (where the file is exact) and the builtin kernels.
    assert set(tflite["top1_agreement_by_runtime"]) == {"xnnpack", "builtin"}
    assert tflite["top1_agreement_by_runtime"]["xnnpack"] == tflite["top1_agreement"]
    assert set(report["fidelity_by_runtime"]) == {"xnnpack", "builtin"}
    # Anyone can score the file on the folder's validation split with the file alone.
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2")
    scored = subprocess.run([sys.executable, "-m", "tfacd.evaluate",
                             f"--tflite={tmp_path / 'model.tflite'}", f"--data={folder}"],
                            capture_output=True, text=True, timeout=600, env=env, cwd=str(REPO))
    assert scored.returncode == 0, scored.stderr[-3000:]
    top1 = float(scored.stdout.split("top-1 ")[1].split()[0])
    assert top1 == pytest.approx(tflite["accuracy"], abs=1e-4)


def test_zero_epochs_adopts_a_float_checkpoint_as_a_run(folder, float_run, tmp_path):
    """`--mode=float --epochs=0 --init_from=CHECKPOINT` scores and saves the checkpoint as a
    run without training it (a shipped float model as an ablation plan's float run): same
    weights, same validation accuracy; epochs=0 anywhere else is refused."""
    adopted = tmp_path / "adopted"
    result = run_cli(f"--dataset={folder}", f"--model_dir={adopted}", "--mode=float",
                     "--epochs=0", f"--init_from={float_run / 'final' / 'weights'}", *TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    results, original = _results(adopted), _results(float_run)
    assert results["val_accuracy"] == original["val_accuracy"]
    assert results["epochs_run_this_invocation"] == 0 and results["history"] == {}
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    names = [name for name, _ in tf.train.list_variables(str(float_run / "final" / "weights"))
             if name.startswith("layer")]
    assert len(names) > 20
    for name in names:
        np.testing.assert_array_equal(
            tf.train.load_variable(str(adopted / "final" / "weights"), name),
            tf.train.load_variable(str(float_run / "final" / "weights"), name))
    refused = run_cli(f"--dataset={folder}", f"--model_dir={tmp_path / 'q'}", "--mode=qat",
                      "--epochs=0", f"--init_from={float_run}", *TINY)
    assert refused.returncode == 2 and "epochs must be >= 1" in refused.stderr


def test_export_mode_on_a_float_run_and_bad_exports(folder, float_run, tmp_path):
    result = run_cli(f"--model_dir={float_run}", "--mode=export")
    assert result.returncode == 0, result.stderr[-3000:]
    results = _results(float_run)
    assert results["tflite"]["file_bytes"] == (float_run / "model.tflite").stat().st_size
    # Float TFLite vs the float Keras model: the same function.
    assert results["tflite"]["top1_agreement"] >= 0.99
    missing = run_cli(f"--model_dir={tmp_path / 'nothing'}", "--mode=export")
    assert missing.returncode == 2 and "results.json" in missing.stderr
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2")
    scored = subprocess.run([sys.executable, "-m", "tfacd.evaluate",
                             f"--tflite={tmp_path / 'none.tflite'}", f"--data={folder}"],
                            capture_output=True, text=True, timeout=600, env=env, cwd=str(REPO))
    assert scored.returncode == 2 and "not found" in scored.stderr


def test_killed_run_resumes_where_it_stopped(folder, tmp_path):
    args = [f"--dataset={folder}", f"--model_dir={tmp_path}", "--mode=float", "--epochs=4",
            "--steps_per_epoch=2", *TINY]
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2")
    process = subprocess.Popen([sys.executable, str(REPO / "train_main.py"), *args], env=env,
                               cwd=str(REPO), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    log = ""
    while time.time() < deadline and "Epoch 3/4" not in log:
        line = process.stdout.readline()
        if not line:
            break
        log += line
    assert "Epoch 3/4" in log, log[-3000:]
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "results.json").exists()
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    results = _results(tmp_path)
    # Epochs 1-2 were saved before the kill: this invocation ran only 3 and 4.
    assert results["epochs_run_this_invocation"] == 2
    # ... and the epoch log kept all four, with the wall time of each.
    assert [e["epoch"] for e in results["epochs"]] == [1, 2, 3, 4]
    assert all(e["seconds"] > 0 and "val_accuracy" in e for e in results["epochs"])
    assert results["train_seconds_total"] == pytest.approx(
        sum(e["seconds"] for e in results["epochs"]))
    assert results["train_seconds_total"] > results["train_seconds"] * 0.5
    assert "Epoch 3/4" in result.stdout + result.stderr
    assert "Epoch 1/4" not in result.stdout + result.stderr


@pytest.mark.parametrize("args, message", [
    (["--dataset=imagenet"], "unknown dataset 'imagenet'"),
    (["--dataset=/nonexistent/folder"], "dataset folder does not exist"),
    (["--weight_bits=1"], "weight_bits must be an integer from 2 to 8"),
    (["--config=CONFIG_WITH_TYPO"], "unknown config key 'wieght_bits'"),
    (["--mode=qat", "--init_from=/nonexistent/run"], "no checkpoint there"),
    (["--distill_weight=1.5"], "distill_weight must be in [0, 1]"),
    (["--distill_weight=0.5"], "distill_weight > 0 needs --mode=qat"),
    (["--acd=l2", "--acd_upper_strength=2"], "strengths are fractions per step"),
    (["--export_output_type=int16"], "export_output_type must be one of"),
    (["--mode=qat", "--init_from=/x", "--portable_in_place"],
     "portable_in_place needs requantization=portable"),
    (["--mode=qat", "--init_from=/x", "--portable_in_place", "--requantization=portable",
      "--bn_reestimate_batches=5"], "set acd=off and bn_reestimate_batches=0"),
])
def test_bad_input_exits_2_with_one_line(folder, tmp_path, args, message):
    args = [a.replace("CONFIG_WITH_TYPO", str(tmp_path / "typo.yaml")) for a in args]
    (tmp_path / "typo.yaml").write_text("wieght_bits: 2\n")
    if not any(a.startswith("--dataset") for a in args):
        args.append(f"--dataset={folder}")
    result = run_cli(f"--model_dir={tmp_path / 'run'}", *args, *TINY)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_progressive_stage_with_distillation_and_bn_reestimation(folder, float_run,
                                                                 tmp_path):
    """W4A4 from the float run, then W2A2 from the W4A4 run: weights carried, clips derived
    at 2 bits, the float run (the chain's root) as the teacher, BatchNorm re-estimated, the
    clips in their own learning-rate group with the clip L2 decay."""
    w4a4, w2a2 = tmp_path / "w4a4", tmp_path / "w2a2"
    result = run_cli(f"--dataset={folder}", f"--model_dir={w4a4}", "--mode=qat",
                     f"--init_from={float_run}", "--weight_bits=4", "--activation_bits=4",
                     "--epochs=1", "--steps_per_epoch=2", "--export=false", *TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    result = run_cli(f"--dataset={folder}", f"--model_dir={w2a2}", "--mode=qat",
                     f"--init_from={w4a4}", "--weight_bits=2", "--activation_bits=2",
                     "--distill_weight=0.8", "--distill_temperature=2", "--acd=l2",
                     "--acd_schedule=constant", "--clip_learning_rate=0.0001",
                     "--bn_reestimate_batches=2", "--sqnr_weight=0.01", "--epochs=1",
                     "--steps_per_epoch=2", "--export=false", *TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "progressive start: weights of the W4A4 run" in result.stdout
    results = _results(w2a2)
    history = results["history"]
    assert {"distill_loss", "task_loss", "val_accuracy", "acd_lower_strength"} <= set(history)
    assert np.isfinite(history["distill_loss"]).all()
    assert results["config"]["distill_weight"] == 0.8 and results["val_accuracy"] is not None
    # The teacher is the float run: with another teacher (the W4A4 run) the loss differs.
    other = run_cli(f"--dataset={folder}", f"--model_dir={tmp_path / 'other'}", "--mode=qat",
                    f"--init_from={w4a4}", f"--distill_from={w4a4}", "--weight_bits=2",
                    "--activation_bits=2", "--distill_weight=0.8", "--distill_temperature=2",
                    "--acd=l2", "--acd_schedule=constant", "--clip_learning_rate=0.0001",
                    "--bn_reestimate_batches=2", "--sqnr_weight=0.01", "--epochs=1",
                    "--steps_per_epoch=2", "--export=false", *TINY)
    assert other.returncode == 0, other.stderr[-3000:]
    assert _results(tmp_path / "other")["history"]["distill_loss"] != history["distill_loss"]
    missing = run_cli(f"--dataset={folder}", f"--model_dir={tmp_path / 'bad'}", "--mode=qat",
                      f"--init_from={w4a4}", "--distill_weight=0.5",
                      "--distill_from=/nonexistent/teacher", *TINY)
    assert missing.returncode == 2 and "--distill_from=/nonexistent/teacher" in missing.stderr


def test_corrupt_image_and_mismatched_init_exit_2(folder, float_run, tmp_path):
    broken = make_folder(tmp_path / "broken", per_class=3)
    (broken / "train" / "a_dog" / "0001.png").write_bytes(b"\x89PNG broken")
    result = run_cli(f"--dataset={broken}", f"--model_dir={tmp_path / 'r1'}", *TINY)
    assert result.returncode == 2 and "0001.png" in result.stderr
    result = run_cli(f"--dataset={folder}", f"--model_dir={tmp_path / 'r2'}", "--mode=qat",
                     f"--init_from={float_run}", "--architecture=mobilenet_v2_cifar",
                     "--width=0.35", "--batch_size=8")
    assert result.returncode == 2 and "does not match the model" in result.stderr, \
        result.stderr[-2000:]
    # Another validation split than the float run's would validate on its training images.
    result = run_cli(f"--dataset={folder}", f"--model_dir={tmp_path / 'r3'}", "--mode=qat",
                     f"--init_from={float_run}", "--split_seed=1", *TINY)
    assert result.returncode == 2 and "split_seed=0" in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "r3").exists()


def _free_ports(count):
    import socket  # pylint: disable=import-outside-toplevel
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("localhost", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def test_two_workers_on_localhost_finish_and_agree(folder, tmp_path):
    import numpy as np  # pylint: disable=import-outside-toplevel
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    ports = _free_ports(2)
    cluster = {"worker": [f"localhost:{port}" for port in ports]}
    args = [f"--dataset={folder}", f"--model_dir={tmp_path}", "--mode=float", "--epochs=1",
            "--steps_per_epoch=2", "--strategy=multi_worker", *TINY]
    processes = []
    for index in range(2):
        env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2",
                   TF_CONFIG=json.dumps({"cluster": cluster,
                                         "task": {"type": "worker", "index": index}}))
        processes.append(subprocess.Popen(
            [sys.executable, str(REPO / "train_main.py"), *args], env=env, cwd=str(REPO),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=600)[0] for p in processes]
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[-3000:]
    assert _results(tmp_path)["config"]["strategy"] == "multi_worker"
    readers = [tf.train.load_checkpoint(str(path / "final" / "weights"))
               for path in (tmp_path, tmp_path / "worker_1")]
    names = [n for n in readers[0].get_variable_to_shape_map() if "kernel" in n]
    assert names
    for name in names:
        np.testing.assert_array_equal(readers[0].get_tensor(name), readers[1].get_tensor(name))


def test_float_then_qat_on_mocked_cifar10(tmp_path):
    # The tfds route end to end, in process (tfds' mock patches this process only).
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

    from tfacd import config as config_lib  # pylint: disable=import-outside-toplevel
    from tfacd import train  # pylint: disable=import-outside-toplevel
    common = dict(dataset="cifar10", architecture="mobilenet_v2_cifar_tiny", width=0.35,
                  batch_size=8, bn_momentum=0.9, epochs=1, steps_per_epoch=2,
                  calibration_batches=1)
    with tfds.testing.mock_data(num_examples=40):
        float_results = train.run(config_lib.from_dict(
            dict(common, mode="float", model_dir=str(tmp_path / "float"))))
        qat_results = train.run(config_lib.from_dict(
            dict(common, mode="qat", model_dir=str(tmp_path / "qat"),
                 init_from=str(tmp_path / "float"), weight_bits=4, activation_bits=4,
                 granularity="per_layer", export=False)))
    for results in (float_results, qat_results):
        assert 0.0 <= results["val_accuracy"] <= 1.0
        assert results["num_test"] == 40 and results["test_accuracy"] is not None
    assert qat_results["per_layer_sqnr_db"] and float_results["per_layer_sqnr_db"] == {}
    assert json.loads((tmp_path / "qat" / "results.json").read_text())["config"][
        "granularity"] == "per_layer"
    # A per-layer quantizer has one clip pair for all of a depthwise layer's channels.
    ranges = qat_results["depthwise_activation_ranges"]
    assert ranges and all(len(r["lower"]) == 1 and len(r["channel_min"]) > 1
                          for r in ranges.values())


def test_freeze_bn_keeps_statistics_and_trains_clips_and_gamma():
    import numpy as np  # pylint: disable=import-outside-toplevel
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    import tfacd  # pylint: disable=import-outside-toplevel
    from tfacd import train  # pylint: disable=import-outside-toplevel
    from tfacd._keras import keras  # pylint: disable=import-outside-toplevel
    float_model = tfacd.models.build("mobilenet_v2_cifar_tiny", width=0.35, num_classes=3,
                                     input_shape=(16, 16, 3), bn_momentum=0.5)
    model = tfacd.quantize_model(float_model, weight_bits=2, activation_bits=2)
    x = np.random.default_rng(0).normal(size=(8, 16, 16, 3)).astype("float32")
    y = np.arange(8) % 3
    tfacd.calibrate(model, x, 1)
    frozen = train.freeze_batch_norms(model)
    assert frozen == sum("BatchNormalization" in type(getattr(layer, "layer", layer)).__name__
                         for layer in model.layers) > 0
    statistics = {v.name: v.numpy() for v in model.non_trainable_weights
                  if "moving_" in v.name}
    clips = {v.name: v.numpy() for v in model.trainable_weights
             if "upper" in v.name or "gamma" in v.name}
    assert statistics and clips
    model.compile(optimizer=keras.optimizers.SGD(0.1),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    after = {v.name: v.numpy() for v in model.weights}
    for name, value in statistics.items():
        np.testing.assert_array_equal(after[name], value)
    # The clips (also the BN wrappers' output clips) and gamma keep training.
    for kind in ("bn/output_upper", "upper", "gamma"):
        assert any(not np.array_equal(after[name], value)
                   for name, value in clips.items() if kind in name), kind
    # Inference-mode BN in training: the training-mode output equals the inference output.
    np.testing.assert_allclose(model(x, training=True), model(x, training=False), atol=1e-5)


def test_qat_without_a_validation_split(folder, float_run, tmp_path):
    # --val_fraction=0 is allowed: no validation during training, SQNR monitored on training
    # images, val_accuracy null in the results.
    result = run_cli(f"--dataset={folder}", f"--model_dir={tmp_path}", "--mode=qat",
                     f"--init_from={float_run}", "--val_fraction=0", "--acd=decay",
                     "--epochs=1", "--steps_per_epoch=2", "--export=false", *TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    results = _results(tmp_path)
    assert results["val_accuracy"] is None and results["num_val"] == 0
    assert results["test_accuracy"] is not None
    assert len(results["history"]["mean_sqnr_db"]) == 1


def test_symmetric_weights_setting_reaches_every_sub_8_bit_weight_quantizer():
    """`--symmetric_weights` (config key `symmetric_weights`) builds the run's scheme with
    symmetric weight grids: every 4-bit weight quantizer, no activation quantizer."""
    from tests.conftest import tiny_cnn  # pylint: disable=import-outside-toplevel
    # pylint: disable-next=import-outside-toplevel
    from tfacd import config as config_lib, quantizers, train
    config = config_lib.ExperimentConfig(weight_bits=4, activation_bits=4,
                                         symmetric_weights=True).validate()
    found = {(q.kind, q.num_bits, q.symmetric_step)
             for _, _, q, _ in quantizers.iter_quantizers(train.quantize(config, tiny_cnn()))}
    assert ("weight", 4, True) in found and ("weight", 4, False) not in found
    assert {step for kind, _, step in found if kind == "activation"} == {False}


def test_pixel_grid_qat_from_a_dataset_normalized_float_run(folder, float_run, tmp_path):
    """The float run was trained on the dataset's statistics; the QAT run on the pixel grid
    gets its stem re-expressed (student and teacher), the input quantizer fixed on the grid,
    and a file whose input needs no searched normalization. A QAT teacher on the other
    normalization is refused."""
    model_dir = tmp_path / "grid"
    result = run_cli(f"--dataset={folder}", f"--model_dir={model_dir}", "--mode=qat",
                     f"--init_from={float_run}", "--input_normalization=pixel_grid",
                     "--distill_weight=0.5", "--activation_granularity=per_layer",
                     "--acd=decay", "--acd_schedule=constant", "--sqnr_weight=0.01",
                     "--epochs=1", "--steps_per_epoch=2", *TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("re-expressed for input_normalization=pixel_grid") == 2
    results = _results(model_dir)
    assert results["config"]["input_normalization"] == "pixel_grid"
    report = json.loads((model_dir / "model_report.json").read_text())
    options = report["options"]
    assert options["input_mean"] == [128.0] * 3 and options["input_std"] == [64.0] * 3
    assert report["input_normalization_mismatches"] == 0
    assert report["fidelity"]["top1_agreement"] == 1.0
    # --mode=eval rebuilds it with its own normalization: the same accuracy.
    evaluated = run_cli(f"--model_dir={model_dir}", "--mode=eval")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    printed, _ = json.JSONDecoder().raw_decode(evaluated.stdout[evaluated.stdout.index("{"):])
    assert printed["val_accuracy"] == pytest.approx(results["val_accuracy"])
    refused = run_cli(f"--dataset={folder}", f"--model_dir={tmp_path / 'bad'}", "--mode=qat",
                      f"--init_from={float_run}", f"--distill_from={model_dir}",
                      "--distill_weight=0.5", "--epochs=1", "--steps_per_epoch=1", *TINY)
    assert refused.returncode == 2 and "a QAT teacher must use" in refused.stderr


def test_portable_in_place_keeps_the_ratios_portable_while_the_kernels_train(folder, float_run,
                                                                             tmp_path):
    """A W2A2 pixel-grid run with 5-bit edges, then a stage trained on it with the portable
    ratios in place: the stage snaps at its start, trains its kernels, keeps its BatchNorm
    statistics, and its export finds every ratio already portable (no step moves) and agrees
    with Keras on XNNPACK and on the builtin kernels. A source of another quantization is
    refused."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    common = [f"--dataset={folder}", "--mode=qat", "--input_normalization=pixel_grid",
              "--first_last_bits=5", "--activation_granularity=per_layer",
              "--requantization=portable", "--weight_bits=2", "--activation_bits=2", *TINY]
    source = tmp_path / "source"
    result = run_cli(*common, f"--model_dir={source}", f"--init_from={float_run}",
                     "--epochs=1", "--steps_per_epoch=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert _results(source)["tflite"]["top1_agreement_by_runtime"]["builtin"] == 1.0
    stage = tmp_path / "stage"
    result = run_cli(*common, f"--model_dir={stage}", f"--init_from={source}",
                     "--portable_in_place", "--distill_weight=0.5", "--learning_rate=0.01",
                     "--optimizer=adam", "--epochs=1", "--steps_per_epoch=3",
                     "--export_output_type=int8")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "moved onto portable ratios" in result.stdout
    results = _results(stage)
    assert results["portable_start"]["layers"] > 0
    report = json.loads((stage / "model_report.json").read_text())
    assert report["portable"]["layers"] == results["portable_start"]["layers"]
    assert report["options"]["output_type"] == "int8"
    assert report["portable"]["largest_weight_step_change"] < 1e-5
    # The biases were snapped onto their residue classes at the start and held: the export
    # moved nothing, and the file computes the model as it came out of training.
    # (float32 betas sit within a few thousandths of a unit of their integers; 15 units
    # when the betas train)
    assert report["portable"]["largest_bias_change_in_units"] < 0.01
    assert report["fidelity_before_portable"]["top1_agreement"] == 1.0
    assert report["fidelity_before_portable"]["max_logit_difference"] < 1e-6
    assert results["tflite"]["top1_agreement_by_runtime"] == {"xnnpack": 1.0, "builtin": 1.0}

    before = tf.train.load_checkpoint(str(source / "final" / "weights"))
    after = tf.train.load_checkpoint(str(stage / "final" / "weights"))
    names = [n for n in before.get_variable_to_shape_map() if "OPTIMIZER" not in n]
    moving = [n for n in names if "moving_variance" in n]
    kernels = [n for n in names if n.endswith("kernel/.ATTRIBUTES/VARIABLE_VALUE")]
    assert moving and kernels
    for name in moving:
        np.testing.assert_array_equal(after.get_tensor(name), before.get_tensor(name))
    assert any(not np.array_equal(after.get_tensor(n), before.get_tensor(n)) for n in kernels)

    # --mode=export on the run remakes its file as trained (portable, int8 logits) unless a
    # flag says otherwise.
    (stage / "model.tflite").unlink()
    exported = run_cli(f"--model_dir={stage}", "--mode=export")
    assert exported.returncode == 0, exported.stderr[-3000:]
    again = json.loads((stage / "model_report.json").read_text())
    assert again["options"]["requantization"] == "portable"
    assert again["options"]["output_type"] == "int8"
    assert again["portable"]["largest_weight_step_change"] < 1e-5
    assert _results(stage)["tflite"]["top1_agreement_by_runtime"] == {"xnnpack": 1.0,
                                                                       "builtin": 1.0}
    float_export = run_cli(f"--model_dir={stage}", "--mode=export", "--requantization=float")
    assert float_export.returncode == 0, float_export.stderr[-3000:]
    assert json.loads((stage / "model_report.json").read_text())["options"][
        "requantization"] == "float"

    refused = run_cli(*[a for a in common if a != "--weight_bits=2"], "--weight_bits=3",
                      f"--model_dir={tmp_path / 'bad'}", f"--init_from={source}",
                      "--portable_in_place", "--epochs=1", "--steps_per_epoch=1")
    assert refused.returncode == 2 and "weight_bits=2 differs" in refused.stderr
    # Exact pooling where the mean cannot be exact on int8 (this tiny model pools 16x16):
    # one clear line, before any training.
    too_big = run_cli(*common, f"--model_dir={tmp_path / 'pool'}", f"--init_from={source}",
                      "--portable_in_place", "--exact_average_pooling", "--epochs=1",
                      "--steps_per_epoch=1")
    assert too_big.returncode == 2, too_big.stderr[-3000:]
    assert "error: exact_average_pooling: pool averages 256 values" in too_big.stderr
    assert "Traceback" not in too_big.stderr
