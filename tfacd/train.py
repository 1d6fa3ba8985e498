"""One experiment, end to end: data, model, float or QAT training, evaluation, results.json.

`train_main.py` is the command line around `run(config)`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import time

import numpy as np
import tensorflow as tf

import tfacd
from tfacd import data as data_lib
from tfacd._keras import keras
from tfacd.config import EXPORT_FIELDS, ConfigError, ExperimentConfig
from tfacd.scheme import _BATCH_NORMS

RESULTS = "results.json"
TFLITE = "model.tflite"
EXPORT_REPORT = "model_report.json"
EPOCH_LOG = "epochs.jsonl"            # one line per finished epoch, kept across resumes


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""
FINAL_WEIGHTS = "final/weights"       # a TF checkpoint prefix inside model_dir


@contextlib.contextmanager
def phase(name: str):
    """Prints one line when a phase starts and one with its wall time when it ends, so that
    no long phase of a run sits silent."""
    start = time.perf_counter()
    print(f"[tfacd] {name} ...", flush=True)
    yield
    print(f"[tfacd] {name}: done in {time.perf_counter() - start:.1f} s", flush=True)


def make_strategy(name: str):
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ConfigError(f"unknown strategy {name!r}")


def _weights_prefix(run: str, flag: str = "--init_from") -> str:
    """A run directory or a checkpoint prefix -> the checkpoint prefix to load."""
    path = pathlib.Path(run)
    if path.is_dir():
        path = path / FINAL_WEIGHTS
    if not tf.io.gfile.exists(str(path) + ".index"):
        raise ConfigError(f"{flag}={run}: no checkpoint there (expected a run "
                          f"directory holding {FINAL_WEIGHTS}, or a checkpoint prefix)")
    return str(path)


def _saved_config(run_dir) -> ExperimentConfig | None:
    """The config a finished run in `run_dir` was trained with, or None (no results.json)."""
    path = pathlib.Path(run_dir) / RESULTS
    if not path.is_file():
        return None
    values = json.loads(path.read_text()).get("config", {})
    known = {f.name for f in dataclasses.fields(ExperimentConfig)}
    return ExperimentConfig(**{k: v for k, v in values.items() if k in known})


def _root_float_run(init_from: str) -> str:
    """The float run at the start of a chain of `--init_from` runs (progressive stages)."""
    path, seen = init_from, set()
    while True:
        saved = _saved_config(path)
        if saved is None or saved.mode != "qat" or not saved.init_from or path in seen:
            return path
        seen.add(path)
        path = saved.init_from


def _check_same_split(config: ExperimentConfig):
    """A QAT run must validate on the images its float run held out too: otherwise its
    validation accuracy is measured on images the float model trained on."""
    saved_path = pathlib.Path(config.init_from) / RESULTS
    if not saved_path.is_file() or config.val_fraction == 0:
        # A bare checkpoint prefix: nothing to compare with. No validation split: nothing
        # is measured that the float run's training images could inflate.
        return
    saved = json.loads(saved_path.read_text()).get("config", {})
    defaults = ExperimentConfig()
    for key in ("val_fraction", "split_seed"):
        theirs = saved.get(key, getattr(defaults, key))
        if theirs != getattr(config, key):
            raise ConfigError(f"--{key}={getattr(config, key)} differs from the --init_from "
                              f"run's {key}={theirs}: its validation images would include "
                              "images the float model trained on")


def build_float_model(config: ExperimentConfig, splits: data_lib.Splits):
    return tfacd.models.build(
        config.architecture, width=config.width, num_classes=config.num_classes or splits.num_classes,
        input_shape=splits.image_shape, bn_momentum=config.bn_momentum,
        weight_decay=config.weight_decay)


def model_of_run(path: str, config: ExperimentConfig, splits: data_lib.Splits, what: str):
    """The model a run directory (float or QAT; rebuilt from its results.json config) or a
    bare checkpoint prefix (a float model of `config`'s architecture) holds, weights loaded,
    for the input normalization it was trained with (see `adapt_input`)."""
    saved = _saved_config(path) or dataclasses.replace(config, mode="float",
                                                       input_normalization="dataset")
    model = build_float_model(saved, splits)
    if saved.mode == "qat":
        model = quantize(saved, model)
    load_weights(model, _weights_prefix(path, what), what)
    return model


def _normalization_of(saved: ExperimentConfig | None) -> str:
    """The input normalization a run was trained with, from its saved config. A bare
    checkpoint prefix has none (`saved` None): it is taken to be trained with the dataset's
    statistics, as every shipped checkpoint is."""
    return saved.input_normalization if saved is not None else "dataset"


def adapt_input(model, source: str, config: ExperimentConfig, splits: data_lib.Splits,
                what: str):
    """Makes a float `model` trained with the input normalization `source` take this run's
    (`tfacd.models.renormalize_input`); a no-op when they are the same."""
    if source == config.input_normalization:
        return
    old = data_lib.with_normalization(splits, source)
    try:
        tfacd.models.renormalize_input(model, old.mean, old.std, splits.mean, splits.std)
    except ValueError as error:
        raise ConfigError(f"{what}: trained with input_normalization={source}, this run uses "
                          f"{config.input_normalization}, and {error}") from None
    print(f"{what}: its first convolution re-expressed for input_normalization="
          f"{config.input_normalization} (trained with {source})")


def initial_weights(model, config: ExperimentConfig, splits: data_lib.Splits):
    """Loads `--init_from` into the float `model`: a float run's weights as they are; a QAT
    run's own weights without its clips (progressive precision, `tfacd.progressive`). Either
    way the model is then adapted to this run's input normalization (`adapt_input`)."""
    saved = _saved_config(config.init_from)
    source = _normalization_of(saved)
    if saved is None or saved.mode != "qat":
        load_weights(model, _weights_prefix(config.init_from), "--init_from")
        adapt_input(model, source, config, splits, "--init_from")
        return
    if saved.tfmot_default:
        raise ConfigError(f"--init_from={config.init_from} is a tfmot default QAT run; "
                          "progressive stages start from tfacd runs")
    source_model = model_of_run(config.init_from, config, splits, "--init_from")
    try:
        tfacd.progressive.transfer_weights(source_model, model)
    except ValueError as error:
        raise ConfigError(f"--init_from={config.init_from}: {error}") from None
    adapt_input(model, source, config, splits, "--init_from")
    print(f"progressive start: weights of the W{saved.weight_bits}A{saved.activation_bits} "
          f"run {config.init_from}; clips derived anew for W{config.weight_bits}"
          f"A{config.activation_bits}")


# What a QAT run must share with the run it is trained on in place (`--portable_in_place`):
# the same quantized model, clip for clip. `exact_average_pooling` may be turned on in the
# stage: it drops the pooling's quantizer and adds none, so every clip still loads.
_SAME_QUANTIZATION = ("architecture", "width", "num_classes", "weight_bits", "activation_bits",
                      "granularity", "activation_granularity", "first_last_bits",
                      "symmetric_weights", "input_normalization")


def _check_portable_source(config: ExperimentConfig):
    """`--portable_in_place` trains on a finished tfacd QAT run of the same quantization."""
    saved = _saved_config(config.init_from)
    if saved is None or saved.mode != "qat" or saved.tfmot_default:
        raise ConfigError(f"--portable_in_place: --init_from={config.init_from} must be a "
                          "finished tfacd QAT run directory (its results.json names its "
                          "quantization)")
    for key in _SAME_QUANTIZATION:
        if getattr(saved, key) != getattr(config, key):
            raise ConfigError(f"--portable_in_place: --init_from's {key}="
                              f"{getattr(saved, key)!r} differs from this run's "
                              f"{getattr(config, key)!r} (the run is trained on as it is, clips "
                              "included)")


def portable_start(model, config: ExperimentConfig, splits: data_lib.Splits) -> dict:
    """`--portable_in_place`: loads the QAT run `--init_from` into the QAT `model`, clips
    included, and moves its weight steps onto portable ratios and its biases onto their
    residue classes (`tfacd.export.snap_to_portable`). Returns the plan's summary."""
    from tfacd import export  # pylint: disable=import-outside-toplevel
    load_weights(model, _weights_prefix(config.init_from), "--init_from")
    plan = export.snap_to_portable(model, input_mean=splits.mean, input_std=splits.std,
                                   activation_policy=config.activation_policy)
    summary = plan.summary()
    print(f"--portable_in_place: {summary['layers']} layers of {config.init_from} moved onto "
          f"portable ratios (largest weight-step change "
          f"{100 * summary['largest_weight_step_change']:.1f} %); {len(summary['skipped'])} "
          "skipped; biases on their residue classes; clips, BatchNorm gammas, betas and "
          "statistics now fixed")
    return summary


def quantize(config: ExperimentConfig, model):
    """The QAT model for `config`: tfmot's default scheme or tfacd's."""
    if config.tfmot_default:
        import tensorflow_model_optimization as tfmot  # pylint: disable=import-outside-toplevel
        if config.tfmot_scheme == "default_n_bit":
            # pylint: disable-next=import-outside-toplevel
            from tensorflow_model_optimization.python.core.quantization.keras.experimental \
                .default_n_bit import default_n_bit_quantize_scheme as n_bit
            annotated = tfmot.quantization.keras.quantize_annotate_model(model)
            return tfmot.quantization.keras.quantize_apply(
                annotated, scheme=n_bit.DefaultNBitQuantizeScheme(
                    num_bits_weight=config.weight_bits,
                    num_bits_activation=config.activation_bits))
        return tfmot.quantization.keras.quantize_model(model)
    try:
        return tfacd.quantize_model(
            model, weight_bits=config.weight_bits, activation_bits=config.activation_bits,
            granularity=config.granularity, first_last_bits=config.first_last_bits,
            sqnr_weight=config.sqnr_weight, acd_pull=config.acd == "pull",
            activation_granularity=config.activation_granularity or None,
            activation_init_method=config.activation_init_method or None,
            symmetric_weights=config.symmetric_weights,
            exact_average_pooling=config.exact_average_pooling,
            input_range=(data_lib.PIXEL_GRID_RANGE
                         if config.input_normalization == "pixel_grid" else None))
    except ValueError as error:   # a setting this model cannot take (the scheme names it)
        raise ConfigError(str(error)) from None


def load_weights(model, prefix: str, what: str):
    try:
        # A float run's checkpoint also holds its optimizer state, which is not wanted here.
        model.load_weights(prefix).assert_existing_objects_matched().expect_partial()
    except (ValueError, AssertionError, tf.errors.OpError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error)
        raise ConfigError(f"{what}={prefix} does not match the model: {first_line}") from None


class ClipHistograms(keras.callbacks.Callback):
    """Writes every quantizer's lower/upper clips and widths as TensorBoard histograms."""

    def __init__(self, log_dir: str):
        super().__init__()
        self._writer = tf.summary.create_file_writer(os.path.join(log_dir, "clips"))

    def on_epoch_end(self, epoch, logs=None):
        with self._writer.as_default(step=epoch):
            for info in tfacd.list_quantizers(self.model):
                name = f"{info.layer}/{info.tensor}"
                tf.summary.histogram(f"{name}/lower", info.lower)
                tf.summary.histogram(f"{name}/upper", info.upper)
                tf.summary.histogram(f"{name}/width", np.asarray(info.upper - info.lower))
        self._writer.flush()


class EpochLog(keras.callbacks.Callback):
    """Appends one JSON line per finished epoch (epoch, wall seconds, Keras logs) to `path`.

    Keras' History only holds the epochs of the current invocation; this file keeps a run's
    whole curve and its wall time when it is interrupted and resumed."""

    def __init__(self, path: pathlib.Path):
        super().__init__()
        self._path = path
        self._start = None

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        record = {"epoch": epoch + 1, "seconds": time.perf_counter() - self._start}
        record.update({k: float(v) for k, v in (logs or {}).items()})
        with self._path.open("a") as file:
            file.write(json.dumps(record) + "\n")


def read_epoch_log(path: pathlib.Path) -> list[dict]:
    """The finished epochs in `path`, one record per epoch. An epoch logged twice (killed
    after its log line but before Keras' backup, then rerun) keeps its last record."""
    if not path.is_file():
        return []
    records = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            records[record["epoch"]] = record
    return [records[epoch] for epoch in sorted(records)]


def freeze_batch_norms(model) -> int:
    """Makes every BatchNormalization layer of `model` normalize with its moving statistics
    in training too, and keeps those statistics fixed. Returns how many it froze.

    Why: at 2 bits many channels become nearly constant within a batch, and training-mode
    BatchNorm divides by their tiny batch deviation, which gave gradient norms of ~6000 on
    MobileNetV2 (~8 frozen). How: the BN layer itself is set non-trainable (a non-trainable
    tf_keras BN runs in inference mode even when called with training=True), not its tfmot
    wrapper, so the wrapper's output quantizer keeps training. gamma and beta keep training
    too where the BN is inside a tfmot wrapper (every BN of a tfacd or tfmot QAT model):
    QuantizeWrapperV2 lists the inner layer's weights as its own trainable weights. A BN
    outside a wrapper is frozen whole."""
    frozen = 0
    for layer in model.layers:
        inner = getattr(layer, "layer", layer)
        if type(inner).__name__ in _BATCH_NORMS:
            inner.trainable = False
            frozen += 1
    return frozen


def _check_model_dir(config: ExperimentConfig) -> pathlib.Path:
    model_dir = pathlib.Path(config.model_dir)
    if (model_dir / RESULTS).exists() and not config.overwrite and config.mode != "eval":
        raise ConfigError(f"{model_dir} holds finished results ({RESULTS}); pass "
                          "--overwrite to train there again, or choose another --model_dir")
    if config.overwrite and (model_dir / RESULTS).exists():
        for stale in (RESULTS, "backup", EPOCH_LOG):
            target = model_dir / stale
            if target.is_dir():
                tf.io.gfile.rmtree(str(target))
            elif target.exists():
                target.unlink()
    model_dir.mkdir(parents=True, exist_ok=True)
    return model_dir


def _role(strategy) -> tuple[bool, int]:
    """(is this the chief, task id). Only the chief writes the run's results and logs;
    other workers write their weights under `model_dir/worker_<id>`."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True, 0
    jobs = resolver.cluster_spec().as_dict()
    if "chief" in jobs:
        return resolver.task_type == "chief", int(resolver.task_id or 0)
    return resolver.task_type == "worker" and int(resolver.task_id) == 0, int(resolver.task_id)


def _worker_dir(config: ExperimentConfig, worker_id: int) -> pathlib.Path:
    path = pathlib.Path(config.model_dir) / f"worker_{worker_id}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _optimizer(config: ExperimentConfig, total_steps: int, model, frozen=()):
    """The run's optimizer; `frozen` variables never move (`--portable_in_place`)."""
    schedule = keras.optimizers.schedules.CosineDecay(config.learning_rate,
                                                      max(total_steps, 1))
    # Low-bit QAT of a deep network can produce rare huge gradients (BatchNorm over channels
    # that quantization made nearly constant); a global norm clip keeps one batch from
    # wrecking the run. With SGD it also shrinks every step of such a batch; Adam's steps do
    # not depend on the gradient's scale, so the clip costs it nothing.
    clip = config.clip_norm or None
    if config.optimizer == "adam":
        optimizer = keras.optimizers.Adam(schedule, global_clipnorm=clip)
    else:
        optimizer = keras.optimizers.SGD(schedule, momentum=0.9, nesterov=True,
                                         global_clipnorm=clip)
    if config.mode != "qat" or config.tfmot_default:
        return optimizer
    if frozen:
        # The clips are among them: no clip learning rate to set.
        return tfacd.optimizers.with_frozen_variables(optimizer, frozen)
    # The quantizer parameters' own learning rate, inside the optimizer's update.
    if config.clip_learning_rate:
        return tfacd.optimizers.with_clip_learning_rate(
            optimizer, model, learning_rate=config.clip_learning_rate)
    if config.clip_lr_multiplier != 1.0:
        return tfacd.optimizers.with_clip_learning_rate(
            optimizer, model, multiplier=config.clip_lr_multiplier)
    return optimizer


def run(config: ExperimentConfig) -> dict:
    """Runs the experiment `config` describes and returns (and writes) its results."""
    config.validate()
    if config.mode == "eval":
        return evaluate_run(config)
    if config.mode == "export":
        return export_run(config)
    if config.mode == "qat" and not config.init_from:
        raise ConfigError("--mode=qat needs --init_from (a float run's model_dir or checkpoint)")
    if config.init_from:
        _weights_prefix(config.init_from)              # fails now, before data is read
        _check_same_split(config)
        if config.portable_in_place:
            _check_portable_source(config)
    teacher_path = None
    if config.distill_weight > 0:
        teacher_path = config.distill_from or _root_float_run(config.init_from)
        _weights_prefix(teacher_path, "--distill_from")
    # A multi-worker strategy must exist before any other TensorFlow op runs.
    strategy = make_strategy(config.strategy)
    chief, worker_id = _role(strategy)
    model_dir = _check_model_dir(config) if chief else _worker_dir(config, worker_id)
    keras.utils.set_random_seed(config.seed)

    with phase(f"data: {config.dataset}"):
        splits = data_lib.load(config.dataset, config.data_dir or None, config.val_fraction,
                               config.split_seed, normalization=config.input_normalization)
    batch = config.batch_size
    train_data = data_lib.pipeline(splits.x_train, splits.y_train, splits, batch, True,
                                   config.seed)
    # --val_fraction=0 leaves no validation split: train without one.
    val_data = (data_lib.pipeline(splits.x_val, splits.y_val, splits, batch, False)
                if len(splits.x_val) else None)
    # Training images in order, unaugmented: clip calibration, and SQNR when there is no
    # validation split to measure it on.
    train_eval_data = data_lib.pipeline(splits.x_train, splits.y_train, splits, batch, False)
    full_steps = len(splits.x_train) // batch
    if full_steps == 0:
        raise ConfigError(f"batch_size {batch} is larger than the training split "
                          f"({len(splits.x_train)} images)")
    steps = min(config.steps_per_epoch or full_steps, full_steps)
    if config.steps_per_epoch:
        train_data = train_data.repeat()

    portable = None
    with strategy.scope():
        model = build_float_model(config, splits)
        if config.init_from and not config.portable_in_place:
            initial_weights(model, config, splits)
        if config.mode == "qat":
            model = quantize(config, model)
            if config.portable_in_place:
                portable = portable_start(model, config, splits)
            elif not config.tfmot_default:
                with phase(f"calibration of the W{config.weight_bits}A{config.activation_bits}"
                           f" clips on {config.calibration_batches} batches"):
                    tfacd.calibrate(model, train_eval_data, config.calibration_batches)
        # With the portable ratios in place the BatchNorm statistics must not move either.
        if config.freeze_bn or config.portable_in_place:
            freeze_batch_norms(model)
        # What `fit` trains: the model, or a distiller around it (the model is its student).
        trainer = model
        if teacher_path:
            teacher = model_of_run(teacher_path, config, splits, "--distill_from")
            # The teacher sees the student's inputs.
            saved_teacher = _saved_config(teacher_path)
            if saved_teacher is not None and saved_teacher.mode == "qat" and \
                    saved_teacher.input_normalization != config.input_normalization:
                raise ConfigError(f"--distill_from={teacher_path}: a QAT teacher must use "
                                  f"this run's input_normalization={config.input_normalization}")
            adapt_input(teacher, _normalization_of(saved_teacher), config, splits,
                        "--distill_from")
            trainer = tfacd.distill.Distiller(model, teacher, weight=config.distill_weight,
                                              temperature=config.distill_temperature)
            # Built before `fit`, as BackupAndRestore needs to restore the optimizer's state
            # when a run resumes.
            trainer(tf.zeros((1, *splits.image_shape)), training=False)
        frozen = ()
        if config.portable_in_place:
            # pylint: disable-next=import-outside-toplevel
            from tfacd.export import bias_variables, ratio_variables
            frozen = ratio_variables(model) + bias_variables(model)
        trainer.compile(optimizer=_optimizer(config, steps * config.epochs, trainer, frozen),
                        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                        metrics=["accuracy"])

    # One backup dir for all workers: Keras gives non-chief workers temporary copies itself.
    backup_dir = pathlib.Path(config.model_dir) / "backup"
    callbacks = [keras.callbacks.BackupAndRestore(str(backup_dir)),
                 keras.callbacks.TerminateOnNaN()]
    quantized = config.mode == "qat" and not config.tfmot_default
    if quantized:
        sample = next(iter(val_data if val_data is not None else train_eval_data))[0]
        if config.acd != "off":
            callbacks.append(tfacd.callbacks.ClipDecay(
                lower_strength=config.acd_lower_strength,
                upper_strength=config.acd_upper_strength, schedule=config.acd_schedule,
                mode=config.acd))
        if config.bn_reestimate_batches:
            # Before SQNRMonitor and the validation: both measure the inference pass.
            callbacks.append(tfacd.batch_norm.BatchNormReestimation(
                train_data, config.bn_reestimate_batches, verbose=True))
        callbacks.append(tfacd.sqnr.SQNRMonitor(sample[:64]))
        if chief:
            callbacks.append(ClipHistograms(str(model_dir / "logs")))
    if chief:
        callbacks.append(keras.callbacks.TensorBoard(str(model_dir / "logs")))
        callbacks.append(EpochLog(model_dir / EPOCH_LOG))

    start = time.perf_counter()
    if config.epochs:
        history = trainer.fit(train_data, validation_data=val_data, epochs=config.epochs,
                              steps_per_epoch=steps, callbacks=callbacks, verbose=1)
    else:                   # a float checkpoint adopted as a run: scored and saved as it is
        history = keras.callbacks.History()
        history.history = {}
    train_seconds = time.perf_counter() - start
    losses = history.history.get("loss", [])
    if losses and not np.isfinite(losses[-1]) or trainer.stop_training:
        raise TrainingDiverged(f"training diverged (loss {losses[-1] if losses else 'NaN'}); "
                               "lower --learning_rate or --clip_norm and rerun with "
                               "--overwrite")
    model.save_weights(str(model_dir / FINAL_WEIGHTS))
    if trainer is not model:          # the student alone is evaluated and exported
        model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"])

    with phase("evaluation"):
        results = _evaluate(model, splits, config, quantized)
    epochs_run = len(history.history.get("loss", []))
    epochs = read_epoch_log(model_dir / EPOCH_LOG) if chief else []
    if portable is not None:
        results["portable_start"] = portable
    results.update({
        # Across every invocation of a resumed run (train_seconds is this invocation's).
        "epochs": epochs,
        "train_seconds_total": sum(e["seconds"] for e in epochs) if epochs else None,
        "config": config.to_dict(),
        "train_seconds": train_seconds,
        "epochs_run_this_invocation": epochs_run,
        "images_per_second": (epochs_run * steps * batch / train_seconds
                              if train_seconds > 0 and epochs_run else None),
        "history": {k: [float(v) for v in vs] for k, vs in history.history.items()},
    })
    if chief:
        # Written before the export, so a failed export loses nothing: the run is finished
        # and `--mode=export` can be rerun on it with other options.
        (model_dir / RESULTS).write_text(json.dumps(results, indent=2))
        if config.export and config.mode == "qat":
            with phase("TFLite export and LiteRT evaluation"):
                results["tflite"] = _export(model, config, splits, model_dir)
            (model_dir / RESULTS).write_text(json.dumps(results, indent=2))
    return results


def scoring_split(splits: data_lib.Splits):
    """(images, labels) a run's TFLite file is scored on: the validation split; without one
    the test split; without either the first 1,000 training images."""
    if len(splits.x_val):
        return splits.x_val, splits.y_val
    if splits.x_test is not None:
        return splits.x_test, splits.y_test
    return splits.x_train[:1000], splits.y_train[:1000]


def _export(model, config: ExperimentConfig, splits, model_dir: pathlib.Path) -> dict:
    """Writes `model.tflite` and its report into `model_dir`; returns the results' summary
    of it. Float models get a float TFLite file; tfacd QAT models the baked int8 one;
    tfmot default QAT models tfmot's own int8 conversion."""
    from tfacd import export  # pylint: disable=import-outside-toplevel
    path = model_dir / TFLITE
    report_path = model_dir / EXPORT_REPORT
    pixels, labels = scoring_split(splits)
    if config.mode == "qat" and not config.tfmot_default:
        export.export_tflite(model, path, input_mean=splits.mean, input_std=splits.std,
                             input_type=config.export_input_type,
                             output_type=config.export_output_type,
                             activation_policy=config.activation_policy, data=pixels,
                             labels=labels, report_path=report_path,
                             weight_storage=config.weight_storage,
                             snap_biases=config.snap_biases,
                             requantization=config.requantization,
                             # Agreement with the model on XNNPACK and on the builtin
                             # (fixed-point) kernels; TFLite Micro runs one image at a time,
                             # too slow for every run: `python -m tfacd.evaluate
                             # --runtime=micro` measures a file there.
                             check_runtimes=("xnnpack", "builtin"))
        report = json.loads(report_path.read_text())
    else:
        tfmot = config.mode == "qat" and config.tfmot_default
        if tfmot:
            export.export_tfmot_tflite(model, path, input_mean=splits.mean,
                                       input_std=splits.std)
        else:
            export.export_float_tflite(model, path, input_mean=splits.mean,
                                       input_std=splits.std)
        report = {"path": str(path), "file_bytes": path.stat().st_size, "float": not tfmot,
                  "tfmot_default": tfmot,
                  "fidelity": export.fidelity(model, path.read_bytes(), pixels, labels,
                                              splits.mean, splits.std)}
        report["op_histogram"] = export.op_histogram(path)
        report_path.write_text(json.dumps(report, indent=2))
        fidelity = report["fidelity"]
        print(f"{'tfmot int8' if tfmot else 'float'} TFLite file: {path}  "
              f"{report['file_bytes']:,} bytes; top-1 agreement "
              f"with Keras {fidelity['top1_agreement']:.4f} on {fidelity['num_examples']} "
              "images")
    fidelity = report.get("fidelity", {})
    return {"path": str(path), "report": str(report_path), "file_bytes": report["file_bytes"],
            "size_vs_float": report.get("size_vs_float"),
            "top1_agreement": fidelity.get("top1_agreement"),
            "accuracy": fidelity.get("tflite_accuracy"),
            "keras_accuracy": fidelity.get("keras_accuracy"),
            "num_examples": fidelity.get("num_examples"),
            "top1_agreement_before_bias_snap":
                report.get("fidelity_before_bias_snap", {}).get("top1_agreement"),
            "top1_agreement_by_runtime": {
                runtime: value["top1_agreement"]
                for runtime, value in report.get("fidelity_by_runtime", {}).items()},
            "accuracy_by_runtime": {
                runtime: value["tflite_accuracy"]
                for runtime, value in report.get("fidelity_by_runtime", {}).items()}}


def export_run(config: ExperimentConfig) -> dict:
    """`--mode=export`: rebuilds the run in `model_dir` and writes `model.tflite` and its
    report there (and the summary into results.json)."""
    model_dir = pathlib.Path(config.model_dir)
    model, splits, saved = _rebuild(model_dir, "--mode=export")
    # From the command line (`tfacd.cli` fills in the run's own where no flag is given).
    saved = dataclasses.replace(saved, **{k: getattr(config, k)
                                          for k in EXPORT_FIELDS})
    summary = _export(model, saved, splits, model_dir)
    results_path = model_dir / RESULTS
    results = json.loads(results_path.read_text())
    results["tflite"] = summary
    results_path.write_text(json.dumps(results, indent=2))
    return results


def _evaluate(model, splits, config, quantized: bool) -> dict:
    batch = config.batch_size
    val_data = data_lib.pipeline(splits.x_val, splits.y_val, splits, batch, False)
    val = model.evaluate(val_data, verbose=0, return_dict=True) if len(splits.x_val) else {}
    test_accuracy = None
    if splits.x_test is not None:
        test_data = data_lib.pipeline(splits.x_test, splits.y_test, splits, batch, False)
        test_accuracy = float(model.evaluate(test_data, verbose=0,
                                             return_dict=True)["accuracy"])
    per_layer, depthwise = {}, {}
    if quantized and len(splits.x_val):
        first_batch = next(iter(val_data))[0]
        per_layer = tfacd.sqnr.measure(model, first_batch)
        depthwise = depthwise_activation_ranges(model, first_batch)
    return {
        "val_accuracy": float(val["accuracy"]) if val else None,
        "val_loss": float(val["loss"]) if val else None,
        "test_accuracy": test_accuracy,
        "per_layer_sqnr_db": per_layer,
        "mean_sqnr_db": float(np.mean(list(per_layer.values()))) if per_layer else None,
        "depthwise_activation_ranges": depthwise,
        "num_train": int(len(splits.x_train)), "num_val": int(len(splits.x_val)),
        "num_test": None if splits.x_test is None else int(len(splits.x_test)),
    }


def depthwise_activation_ranges(model, x) -> dict:
    """For every activation quantizer on a depthwise convolution's output: the per-channel
    data range on batch `x` and the clips the quantizer uses (one pair for per-layer ones).
    Rounded to 5 significant digits to keep results.json small; this is what
    scripts/plots.py draws to show why per-channel clips matter."""
    def rounded(values):
        return [float(f"{v:.5g}") for v in np.ravel(values)]

    ranges = tfacd.quantizers.channel_ranges(model, x)
    found = {}
    for info in tfacd.list_quantizers(model):
        name = f"{info.layer}/{info.tensor}"
        if info.kind == "activation" and "depthwise" in info.layer and name in ranges:
            low, high = ranges[name]
            found[name] = {"channel_min": rounded(low), "channel_max": rounded(high),
                           "lower": rounded(info.lower), "upper": rounded(info.upper),
                           "granularity": info.granularity, "num_bits": info.num_bits}
    return found


def _rebuild(model_dir: pathlib.Path, what: str):
    """(model with the run's final weights, its data splits, its config) from a run dir."""
    saved = _saved_config(model_dir)
    if saved is None:
        raise ConfigError(f"{what}: {model_dir / RESULTS} not found (train there first)")
    splits = data_lib.load(saved.dataset, saved.data_dir or None, saved.val_fraction,
                           saved.split_seed, normalization=saved.input_normalization)
    return model_of_run(str(model_dir), saved, splits, "--model_dir"), splits, saved


def evaluate_run(config: ExperimentConfig) -> dict:
    """`--mode=eval`: rebuilds the run in `model_dir` from its results.json and evaluates it."""
    model, splits, saved = _rebuild(pathlib.Path(config.model_dir), "--mode=eval")
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    results = _evaluate(model, splits, saved, saved.mode == "qat" and not saved.tfmot_default)
    print(json.dumps({k: v for k, v in results.items() if k != "per_layer_sqnr_db"}, indent=2))
    return results
