"""Typed experiment configs: a YAML file sets an experiment, command-line flags override it.

Every field's name is the name of its `train_main.py` flag, so a `results.json` `config`
block, a YAML file and a command line all speak the same words.
"""

from __future__ import annotations

import dataclasses
import pathlib

import yaml

from tfacd import data as data_lib
from tfacd import ops

MODES = ("float", "qat", "eval", "export")
GRANULARITIES = ("per_layer", "per_channel")
ACD_CHOICES = ("off", "decay", "pull", "l2")
STRATEGIES = ("default", "mirrored", "multi_worker")
EXPORT_INPUT_TYPES = ("float32", "int8", "uint8")

#: How a run's TFLite file is made: `--mode=export` on a run takes these from the run's own
#: config unless they are given on the command line.
EXPORT_FIELDS = ("export_input_type", "export_output_type", "activation_policy",
                 "weight_storage", "snap_biases", "requantization")
ACTIVATION_POLICIES = ("clamp", "round", "float")  # tfacd.export.ACTIVATION_POLICIES
WEIGHT_STORAGES = ("int8", "int4")             # tfacd.export.WEIGHT_STORAGES
REQUANTIZATIONS = ("float", "portable")        # tfacd.export.REQUANTIZATIONS
OPTIMIZERS = ("sgd", "adam")
TFMOT_SCHEMES = ("default_8bit", "default_n_bit")


class ConfigError(ValueError):
    """A config value out of range, an unknown key, a wrong type: the message names it."""


@dataclasses.dataclass
class ExperimentConfig:
    """One experiment. Defaults give a short float run on CIFAR-10."""

    dataset: str = "cifar10"
    data_dir: str = ""
    model_dir: str = "runs/default"
    mode: str = "float"
    init_from: str = ""                  # a float run (QAT starts from it), or a QAT run at
                                         # higher bits (progressive: its weights, new clips)
    architecture: str = "mobilenet_v2_cifar"   # or "mobilenet_v2_cifar_tiny" (smoke tests)
    width: float = 0.5
    num_classes: int = 0                 # 0: from the dataset
    weight_bits: int = 2
    activation_bits: int = 2
    first_last_bits: int = 8
    granularity: str = "per_channel"
    activation_granularity: str = ""     # "": same as granularity; else per_layer/per_channel
    activation_init_method: str = ""     # activation clips' init: "" (= mse, as weights), minmax
    acd: str = "off"
    acd_lower_strength: float = 0.01
    acd_upper_strength: float = 0.01
    acd_schedule: str = "cosine"
    sqnr_weight: float = 0.0
    symmetric_weights: bool = False      # symmetric weight grids below 8 bits (int4 at 4 bits)
    exact_average_pooling: bool = False  # global average pooling unquantized, its mean exact
                                         # on int8 (per_layer activations; every TFLite
                                         # runtime computes it alike: tfacd.QuantizeScheme)
    tfmot_default: bool = False          # tfmot's own QAT instead of tfacd's scheme
    tfmot_scheme: str = "default_8bit"   # with tfmot_default: default_8bit, or default_n_bit
                                         # (tfmot's experimental scheme at weight_bits /
                                         # activation_bits)
    epochs: int = 1                      # 0 only for --mode=float with --init_from: the
                                         # checkpoint adopted as a run (scored, saved), untrained
    batch_size: int = 128
    learning_rate: float = 0.05
    optimizer: str = "sgd"               # sgd (Nesterov momentum 0.9) or adam
    clip_lr_multiplier: float = 1.0      # QAT: the clips' learning rate / the weights'
    clip_learning_rate: float = 0.0      # QAT: the clips' own learning rate; 0: use the
                                         # multiplier (tfacd.optimizers)
    distill_weight: float = 0.0          # QAT: share of the distillation loss, 0 (off) to 1
    distill_temperature: float = 1.0     # softmax temperature of the distillation loss
    distill_from: str = ""               # the teacher run; "": the float run that
                                         # --init_from starts from (tfacd.distill)
    bn_reestimate_batches: int = 0       # QAT: recompute BatchNorm statistics on this many
                                         # training batches before each evaluation (0: off)
    clip_norm: float = 5.0               # global gradient-norm clip; 0 turns it off
    weight_decay: float = 4e-5
    bn_momentum: float = 0.99
    freeze_bn: bool = False              # QAT: BatchNorm in inference mode, statistics fixed
    seed: int = 0                        # initialization, shuffling, augmentation
    split_seed: int = 0                  # which images form the validation split
    input_normalization: str = "dataset" # dataset (per-channel mean/std of the training
                                         # split) or pixel_grid ((p - 128) / 64, every
                                         # channel; the QAT input quantizer fixed and lossless
                                         # on it: tfacd.data.PIXEL_GRID)
    strategy: str = "default"
    val_fraction: float = 0.1
    steps_per_epoch: int = 0             # 0: the whole training split every epoch
    calibration_batches: int = 4
    overwrite: bool = False
    export: bool = True                  # write model.tflite (+ report) at the end of a QAT run
    export_input_type: str = "uint8"     # the TFLite file's input: float32, int8 or uint8
    export_output_type: str = "float32"  # its logits: float32 (a final DEQUANTIZE), int8 or
                                         # uint8 (with their scale; exact ties stay ties on
                                         # every runtime: docs/export.md)
    activation_policy: str = "float"     # per-channel activations in TFLite: float, clamp, round
    weight_storage: str = "int8"         # TFLite weights: int8, or int4 (1x1/Dense layers, 2-3
                                         # bit, or 4 bit with symmetric_weights)
    snap_biases: bool = True             # export: move the model's biases onto the file's grid
    requantization: str = "float"        # export: float (scales as trained, exact on XNNPACK)
                                         # or portable (every runtime alike; tfacd.export.portable)
    portable_in_place: bool = False      # QAT from a finished QAT run (--init_from) of the same
                                         # quantization: its steps snapped onto portable
                                         # ratios at the start, clips, BatchNorm gammas and
                                         # statistics then held fixed while kernels and biases
                                         # train (needs requantization=portable, acd=off,
                                         # bn_reestimate_batches=0)

    def validate(self) -> "ExperimentConfig":
        def need(condition, message):
            if not condition:
                raise ConfigError(message)

        need(self.mode in MODES, f"mode must be one of {MODES}, got {self.mode!r}")
        need(self.granularity in GRANULARITIES,
             f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        need(self.activation_granularity in ("",) + GRANULARITIES,
             f"activation_granularity must be empty or one of {GRANULARITIES}, "
             f"got {self.activation_granularity!r}")
        need(self.activation_init_method in ("",) + ops.INIT_METHODS,
             f"activation_init_method must be empty or one of {ops.INIT_METHODS}, "
             f"got {self.activation_init_method!r}")
        need(self.acd in ACD_CHOICES, f"acd must be one of {ACD_CHOICES}, got {self.acd!r}")
        need(self.strategy in STRATEGIES,
             f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        for name in ("weight_bits", "activation_bits", "first_last_bits"):
            value = getattr(self, name)
            need(isinstance(value, int) and ops.MIN_BITS <= value <= ops.MAX_BITS,
                 f"{name} must be an integer from {ops.MIN_BITS} to {ops.MAX_BITS}, "
                 f"got {value!r}")
        from tfacd.models import ARCHITECTURES  # pylint: disable=import-outside-toplevel
        need(self.architecture in ARCHITECTURES,
             f"architecture must be one of {sorted(ARCHITECTURES)}, got {self.architecture!r}")
        need(self.width > 0, f"width must be > 0, got {self.width!r}")
        need(self.epochs >= 1 or (self.epochs == 0 and self.mode == "float"
                                  and bool(self.init_from)),
             f"epochs must be >= 1 (0 only for --mode=float with --init_from, which adopts "
             f"that checkpoint as a run), got {self.epochs!r}")
        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size!r}")
        need(self.tfmot_scheme in TFMOT_SCHEMES,
             f"tfmot_scheme must be one of {TFMOT_SCHEMES}, got {self.tfmot_scheme!r}")
        need(self.optimizer in OPTIMIZERS,
             f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        need(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate!r}")
        need(self.clip_lr_multiplier >= 0,
             f"clip_lr_multiplier must be >= 0, got {self.clip_lr_multiplier!r}")
        need(self.clip_learning_rate >= 0,
             f"clip_learning_rate must be >= 0, got {self.clip_learning_rate!r}")
        need(0 <= self.distill_weight <= 1,
             f"distill_weight must be in [0, 1], got {self.distill_weight!r}")
        need(self.distill_temperature > 0,
             f"distill_temperature must be > 0, got {self.distill_temperature!r}")
        need(not self.distill_weight or self.mode == "qat",
             "distill_weight > 0 needs --mode=qat (distillation trains a QAT student)")
        need(self.bn_reestimate_batches >= 0,
             f"bn_reestimate_batches must be >= 0, got {self.bn_reestimate_batches!r}")
        need(self.clip_norm >= 0, f"clip_norm must be >= 0, got {self.clip_norm!r}")
        need(self.sqnr_weight >= 0, f"sqnr_weight must be >= 0, got {self.sqnr_weight!r}")
        need(0 <= self.val_fraction < 1,
             f"val_fraction must be in [0, 1), got {self.val_fraction!r}")
        need(self.steps_per_epoch >= 0,
             f"steps_per_epoch must be >= 0, got {self.steps_per_epoch!r}")
        need(0 <= self.bn_momentum < 1, f"bn_momentum must be in [0, 1), got {self.bn_momentum}")
        need(0 <= self.acd_lower_strength and 0 <= self.acd_upper_strength,
             "acd strengths must be >= 0")
        need(self.acd not in ("decay", "l2")
             or (self.acd_lower_strength <= 1 and self.acd_upper_strength <= 1),
             f"acd={self.acd} strengths are fractions per step and must be in [0, 1], got "
             f"{self.acd_lower_strength!r} and {self.acd_upper_strength!r}")
        need(self.num_classes >= 0, f"num_classes must be >= 0, got {self.num_classes!r}")
        need(self.calibration_batches >= 1, "calibration_batches must be >= 1")
        need(self.input_normalization in data_lib.NORMALIZATIONS,
             f"input_normalization must be one of {data_lib.NORMALIZATIONS}, "
             f"got {self.input_normalization!r}")
        need(self.export_input_type in EXPORT_INPUT_TYPES,
             f"export_input_type must be one of {EXPORT_INPUT_TYPES}, "
             f"got {self.export_input_type!r}")
        need(self.export_output_type in EXPORT_INPUT_TYPES,
             f"export_output_type must be one of {EXPORT_INPUT_TYPES}, "
             f"got {self.export_output_type!r}")
        need(self.activation_policy in ACTIVATION_POLICIES,
             f"activation_policy must be one of {ACTIVATION_POLICIES}, "
             f"got {self.activation_policy!r}")
        need(self.requantization in REQUANTIZATIONS,
             f"requantization must be one of {REQUANTIZATIONS}, got {self.requantization!r}")
        need(not self.exact_average_pooling
             or (self.activation_granularity or self.granularity) == "per_layer",
             "exact_average_pooling needs per-tensor activations (activation_granularity="
             "per_layer): the pooled mean is exact on one grid per tensor")
        need(not (self.requantization == "portable" and self.weight_storage == "int4"),
             "requantization=portable needs weight_storage=int8")
        if self.portable_in_place:
            # (--init_from, the run it trains on, is checked when the run starts: a plan
            # names it after the config is read.)
            need(self.mode == "qat" and not self.tfmot_default,
                 "portable_in_place needs --mode=qat with tfacd's scheme")
            need(self.requantization == "portable",
                 "portable_in_place needs requantization=portable (the ratios it keeps are "
                 "the portable export's)")
            need(self.acd == "off" and self.bn_reestimate_batches == 0,
                 "portable_in_place holds the clips and BatchNorm statistics fixed: set "
                 f"acd=off and bn_reestimate_batches=0 (got acd={self.acd}, "
                 f"bn_reestimate_batches={self.bn_reestimate_batches})")
        need(self.weight_storage in WEIGHT_STORAGES,
             f"weight_storage must be one of {WEIGHT_STORAGES}, got {self.weight_storage!r}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(ExperimentConfig)}


def _coerce(name: str, value):
    """Casts `value` to the type of field `name`, or raises a ConfigError naming both."""
    kind = type(getattr(ExperimentConfig(), name))
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if kind is int and isinstance(value, bool):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    try:
        result = kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be {kind.__name__}, got {value!r}") from None
    if kind is int and isinstance(value, str) and str(result) != value.strip():
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    return result


def from_dict(values: dict, base: ExperimentConfig | None = None) -> ExperimentConfig:
    """A config from `base` (defaults) with `values` applied; unknown keys are errors."""
    config = dataclasses.replace(base or ExperimentConfig())
    for key, value in values.items():
        if key not in FIELDS:
            raise ConfigError(f"unknown config key {key!r} (known: {', '.join(sorted(FIELDS))})")
        setattr(config, key, _coerce(key, value))
    return config


def load_yaml(path: str, base: ExperimentConfig | None = None) -> ExperimentConfig:
    """Reads an experiment YAML (a flat mapping of flag names to values)."""
    file = pathlib.Path(path)
    if not file.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, got {type(values).__name__}")
    try:
        return from_dict(values, base)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
