"""Experiment configs: YAML, overrides, validation."""

import pathlib

import pytest

from tfacd import config

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"


def test_every_shipped_config_loads_and_validates():
    files = sorted(CONFIGS.glob("*.yaml"))
    assert len(files) >= 21
    for file in files:
        config.load_yaml(str(file)).validate()


def test_shipped_configs_cover_the_ablation():
    names = {f.stem for f in CONFIGS.glob("*.yaml")}
    for dataset in ("cifar10", "cifar100"):
        for variant in ("float", "w2a2_per_layer", "w2a2_per_channel", "w2a2_per_channel_acd",
                        "w2a2_per_channel_acd_sqnr", "w4a4_per_layer",
                        "w4a4_per_channel_acd_sqnr", "tfmot_default_8bit"):
            assert f"{dataset}_{variant}" in names


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("weight_bits: 4\nacd: decay\nwidth: 0.35\n")
    base = config.load_yaml(str(path))
    merged = config.from_dict({"weight_bits": "3", "overwrite": "true"}, base)
    assert (merged.weight_bits, merged.acd, merged.width, merged.overwrite) == (3, "decay",
                                                                                0.35, True)


@pytest.mark.parametrize("text, message", [
    ("weigth_bits: 2\n", "unknown config key 'weigth_bits'"),
    ("weight_bits: two\n", "weight_bits must be int"),
    ("- a\n- b\n", "expected a mapping"),
    ("a: [\n", "not valid YAML")])
def test_bad_yaml_is_named(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(config.ConfigError, match=message):
        config.load_yaml(str(path))


@pytest.mark.parametrize("values, message", [
    (dict(weight_bits=1), "weight_bits must be an integer from 2 to 8, got 1"),
    (dict(activation_bits=12), "activation_bits"), (dict(granularity="per_row"), "per_row"),
    (dict(activation_granularity="per_row"), "activation_granularity"),
    (dict(activation_init_method="kl"), "activation_init_method"),
    (dict(acd="maybe"), "maybe"), (dict(strategy="tpu"), "tpu"),
    (dict(val_fraction=1.0), "val_fraction"), (dict(architecture="resnet"), "resnet"),
    (dict(optimizer="rmsprop"), "optimizer must be one of .*rmsprop"),
    (dict(weight_storage="int2"), "weight_storage must be one of .*int2"),
    (dict(exact_average_pooling=True), "exact_average_pooling needs per-tensor activations")])
def test_values_out_of_range_are_named(values, message):
    with pytest.raises(config.ConfigError, match=message):
        config.from_dict(values).validate()


def test_export_choices_mirror_the_exporter():
    # The config module names the exporter's choices without importing TF-heavy code.
    from tfacd import export
    assert config.ACTIVATION_POLICIES == export.ACTIVATION_POLICIES
    assert config.WEIGHT_STORAGES == export.WEIGHT_STORAGES
    assert config.REQUANTIZATIONS == export.REQUANTIZATIONS


def test_missing_config_file():
    with pytest.raises(config.ConfigError, match="config file not found"):
        config.load_yaml("/nonexistent/x.yaml")


def test_tfmot_n_bit_scheme_quantizes_at_the_configured_bits():
    """The peer row: tfmot's experimental default_n_bit scheme at weight_bits/activation_bits."""
    from tfacd import models, train  # pylint: disable=import-outside-toplevel
    from tfacd.config import ConfigError, ExperimentConfig  # pylint: disable=import-outside-toplevel
    config = ExperimentConfig(mode="qat", tfmot_default=True, tfmot_scheme="default_n_bit",
                              weight_bits=2, activation_bits=4).validate()
    model = train.quantize(config, models.build("mobilenet_v2_cifar_tiny", width=0.35,
                                                num_classes=4, input_shape=(8, 8, 3)))
    weight_bits = {q.num_bits for layer in model.layers
                   for _, q, _ in getattr(layer, "_weight_vars", [])}
    assert weight_bits == {2}
    activation_bits = {q.num_bits for layer in model.layers
                       for q in getattr(layer, "_output_quantizers", [])}
    assert activation_bits == {4}
    with pytest.raises(ConfigError, match="tfmot_scheme must be one of"):
        ExperimentConfig(tfmot_scheme="default_4bit").validate()
