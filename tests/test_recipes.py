"""Recipes: defaults < recipe < the recipe's model entry < explicit options; checked values."""

from __future__ import annotations

import pytest

from cifar_inception.recipes import (
    FIELDS,
    RECIPES,
    RUNTIME_FIELDS,
    ConfigError,
    Recipe,
    TrainConfig,
    build_config,
    default_recipe_name,
)


def test_seed_recipe_mirrors_the_report():
    naive = build_config("seed-naive", "seed")
    assert (naive.optimizer, naive.lr, naive.batch_size) == ("adam", 1e-3, 32)
    assert (naive.epochs, naive.val_size) == (10, 10000)          # 40,000 / 10,000, 10 epochs
    assert naive.label_smoothing == 0.0 and naive.weight_decay == 0.0
    assert naive.crop_padding == 0 and not naive.flip and naive.cutout == 0
    assert naive.schedule == "constant" and naive.aux_weights == 1.0
    v2 = build_config("seed-inception-v2", "seed")
    assert (v2.epochs, v2.val_size) == (25, 5000)                 # 45,000 / 5,000, 25 epochs


def test_model_family_picks_the_recipe_when_none_is_named():
    assert build_config("seed-googlenet").recipe == "seed"
    default = build_config("googlenet")
    assert default.recipe == "default" and default.optimizer == "sgd" and default.nesterov
    assert default.label_smoothing == 0.1 and default.crop_padding == 4 and default.flip


def test_no_model_picks_by_hardware():
    cpu = build_config(cuda=False)
    assert (cpu.recipe, cpu.model) == ("cpu10", "inception-cpu")
    assert build_config(recipe="cpu").model == "inception-cpu"  # the former default stays
    gpu = build_config(cuda=True)
    assert gpu.recipe == "gpu" and gpu.model_options == {}
    assert default_recipe_name(None, cuda=True) == "gpu"
    assert default_recipe_name("inception-v3", cuda=True) == "default"


def test_explicit_options_override_the_recipe():
    config = build_config("seed-naive", "seed", epochs=2, lr=0.01, flip=True)
    assert (config.epochs, config.lr, config.flip) == (2, 0.01, True)
    assert config.optimizer == "adam"  # the rest stays the recipe's


def test_model_options_merge_and_belong_to_their_model(monkeypatch):
    narrow = Recipe("narrow", "test", dict(epochs=2, model_options={"width": 0.25}),
                    model="googlenet")
    monkeypatch.setitem(RECIPES, "narrow", narrow)
    assert build_config(recipe="narrow", model_options={"dropout": 0.1}).model_options == \
        {"width": 0.25, "dropout": 0.1}
    assert build_config(recipe="narrow", model_options={"width": 0.5}).model_options == \
        {"width": 0.5}
    # the recipe's width is GoogLeNet's; another model gets the settings but not the width
    other = build_config("inception-v3", "narrow")
    assert other.model == "inception-v3" and other.model_options == {} and other.epochs == 2


@pytest.mark.parametrize("kwargs, message", [
    (dict(recipe="nope"), "unknown recipe 'nope'"),
    (dict(recipe="seed"), "does not name a model"),
    (dict(model="googlenet", bogus=1), "unknown training option"),
    (dict(model="googlenet", epochs=0), "epochs must be >= 1"),
    (dict(model="googlenet", lr=0.0), "learning rate must be > 0"),
    (dict(model="googlenet", optimizer="rmsprop"), "optimizer must be one of"),
    (dict(model="googlenet", schedule="step"), "schedule must be one of"),
    (dict(model="googlenet", label_smoothing=1.0), "label smoothing"),
    (dict(model="googlenet", aux_weights=[-1.0]), "auxiliary weights"),
    (dict(model="googlenet", device="tpu"), "device must be"),
    (dict(model="googlenet", padding_mode="wrap"), "padding mode"),
])
def test_bad_values_are_refused_with_the_option_name(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        build_config(**kwargs)


def test_config_round_trips_through_a_dict():
    config = build_config("googlenet", model_options={"width": 0.5}, aux_weights=[0.1, 0.2])
    assert TrainConfig.from_dict(config.to_dict()) == config
    assert set(RUNTIME_FIELDS) <= set(FIELDS)


def test_speed_recipes_switch_their_tricks_on():
    cpu10 = build_config(recipe="cpu10")
    fast = build_config(recipe="fast")
    assert (cpu10.model, fast.model) == ("inception-cpu", "inception-fast")
    for config in (cpu10, fast):
        assert config.lookahead and config.whiten_init and config.tta
        assert config.flip_mode == "alternate" and config.label_smoothing == 0.2
        assert config.norm_bias_lr == 64.0
        assert config.crop_padding == 2 and 0 < config.final_lr < 1
    assert fast.batch_size == 1024 and cpu10.batch_size == 256
    # the CPU's smaller batch: the learning rate scaled with it, lookahead over as many images
    assert cpu10.lr / cpu10.batch_size == fast.lr / fast.batch_size
    assert cpu10.lookahead_steps * cpu10.batch_size == fast.lookahead_steps * fast.batch_size
    assert cpu10.weight_decay == fast.weight_decay
    assert cpu10.cpu_amp is None and cpu10.cpu_channels_last  # bf16 decided by the CPU
    assert build_config(recipe="cpu10", lookahead=False).lookahead is False


def test_cpu10_reduces_and_widens_its_own_model_only():
    ours, baseline = build_config(recipe="cpu10"), build_config("baseline-plain", "cpu10")
    assert ours.model_options == {"reduce": True, "fuse": True} and ours.widen_for_epochs == 9
    assert baseline.model_options == {} and baseline.widen_for_epochs is None
    assert baseline.budget == ours.budget and baseline.lr == ours.lr  # the rest is shared


@pytest.mark.parametrize("kwargs, message", [
    (dict(flip_mode="sometimes"), "flip mode"),
    (dict(final_lr=1.5), "final learning rate"),
    (dict(norm_bias_lr=0.0), "norm/bias"),
    (dict(lookahead_steps=0), "lookahead steps"),
    (dict(lookahead_decay=1.0), "lookahead decay"),
    (dict(whiten_bias_epochs=-1.0), "whiten bias epochs"),
])
def test_bad_trick_values_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        build_config("inception-cpu", **kwargs)
