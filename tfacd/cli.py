"""Command-line flags for tfacd's entry points: every `ExperimentConfig` field is a flag.

`--config` sets an experiment from YAML; any flag given on the command line overrides it.
Used by `train_main.py` and `python -m tfacd.quickstart`.
"""

from __future__ import annotations

import sys

from absl import flags

from tfacd import config as config_lib

FLAGS = flags.FLAGS


def define_flags():
    """Defines `--config` and one flag per config field (once per process)."""
    if "config" in FLAGS:
        return
    flags.DEFINE_string("config", None, "YAML experiment file; flags given here override it.")
    for name, field in config_lib.FIELDS.items():
        default = field.default
        if isinstance(default, bool):
            flags.DEFINE_bool(name, None, f"(default {default})")
        else:
            flags.DEFINE_string(name, None, f"(default {default!r})")


def build_config(default_yaml: str | None = None) -> config_lib.ExperimentConfig:
    """The YAML given by `--config` (else `default_yaml`, else the defaults) with the flags
    given on the command line applied, validated."""
    path = FLAGS.config or default_yaml
    base = config_lib.load_yaml(path) if path else config_lib.ExperimentConfig()
    if FLAGS["mode"].present and FLAGS.mode == "export" and FLAGS["model_dir"].present \
            and not FLAGS.config:
        base = _exported_as(FLAGS.model_dir, base)
    overrides = {name: FLAGS[name].value for name in config_lib.FIELDS if FLAGS[name].present}
    return config_lib.from_dict(overrides, base).validate()


def _exported_as(model_dir: str, base):
    """`base` with the run's own export settings (`EXPORT_FIELDS`), so that `--mode=export`
    on a run remakes its file as trained (a portable run stays portable) unless flags say
    otherwise."""
    import dataclasses  # pylint: disable=import-outside-toplevel
    from tfacd import train  # pylint: disable=import-outside-toplevel
    saved = train._saved_config(model_dir)  # pylint: disable=protected-access
    if saved is None:
        return base              # export_run names the missing results.json
    return dataclasses.replace(base, **{k: getattr(saved, k) for k in config_lib.EXPORT_FIELDS})


def guarded(work):
    """Runs `work()` and returns `(its result, exit status)`: bad input (a config value, data,
    an export option) prints one line `error: ...` and gives status 2, a diverged run 3."""
    # pylint: disable=import-outside-toplevel
    from tfacd import data as data_lib
    from tfacd import train
    from tfacd.export import ExportError
    try:
        return work(), 0
    except (config_lib.ConfigError, data_lib.DataError, ExportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return None, 2
    except train.TrainingDiverged as error:
        print(f"error: {error}", file=sys.stderr)
        return None, 3
