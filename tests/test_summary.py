"""The Keras-style summary table, parameter and multiply-add counts, and their commands."""

from __future__ import annotations

import re

import pytest
import torch.nn as nn

from cifar_inception.cli import main
from model_names import project_models
from cifar_inception.models import create_model
from cifar_inception.models.registry import parse_options
from cifar_inception.summary import (
    UNKNOWN_SOURCE,
    build_on_meta,
    count_macs,
    count_parameters,
    format_summary,
    model_table,
    summarize,
)

REPORT_TOTALS = {
    ("seed-naive", ()): "232,465,282",
    ("seed-googlenet", ()): "8,390,710",
    ("seed-googlenet", ("--option", "fix_3x3=true")): "11,049,014",
    ("seed-inception-v2", ()): "141,746,134",
}


@pytest.fixture(scope="module")
def rows_by_model():
    """Summary rows of every registered model at its default options (meta device)."""
    return {name: summarize(build_on_meta(name)) for name in project_models()}


def rows_named(rows, fragment):
    return [row for row in rows if fragment in row.name]


# ------------------------------------------------------------------------------- counts

def test_count_macs_of_a_small_network_by_hand():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1, groups=2),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    expected = 32 * 32 * 8 * 3 * 3 * 3 + 32 * 32 * 8 * 4 + 8 * 10
    assert count_macs(model) == expected


def test_count_macs_of_seed_naive_from_its_layers():
    pixels = 32 * 32
    convs = pixels * (64 * 3 * 1 + 128 * 3 * 9 + 32 * 3 * 25)
    dense = 227 * pixels * 1000 + 1000 * 10
    assert count_macs(build_on_meta("seed-naive")) == convs + dense


def test_count_macs_ignores_aux_heads_and_keeps_mode():
    model = build_on_meta("seed-googlenet").train()
    macs = count_macs(model)
    assert model.training
    assert macs == count_macs(build_on_meta("seed-googlenet", aux_logits=False))


def test_count_parameters_trainable_only():
    model = create_model("googlenet", width=0.25)
    total = count_parameters(model)
    model.stem[0].weight.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == total - model.stem[0].weight.numel()


def test_model_table_lists_every_model():
    table = [row for row in model_table() if row["name"] in project_models()]
    assert [row["name"] for row in table] == project_models()
    for row in table:
        assert row["params"] == count_parameters(build_on_meta(row["name"]))
        assert row["macs"] > 0 and row["purpose"]


# ------------------------------------------------------------------------------- summary

@pytest.mark.parametrize("name", project_models())
def test_rows_cover_every_parameter_and_every_connection(rows_by_model, name):
    rows = rows_by_model[name]
    assert rows[0].name == "input" and rows[0].connected_to == ()
    assert sum(row.params for row in rows) == count_parameters(build_on_meta(name))
    names = [row.name for row in rows]
    assert len(names) == len(set(names))
    for row in rows[1:]:
        assert row.connected_to, row.name
        assert UNKNOWN_SOURCE not in row.connected_to, row.name
        assert set(row.connected_to) <= set(names[:names.index(row.name)]), row.name


def test_seed_googlenet_shapes_follow_the_report(rows_by_model):
    rows = {row.name: row for row in rows_by_model["seed-googlenet"]}
    assert rows["stem"].output_shape == (1, 64, 13, 13)
    assert rows["stem"].params == 9_472
    assert rows["pool4"].output_shape == (1, 480, 6, 6)
    assert rows["inception4a.concat"].output_shape == (1, 512, 6, 6)
    assert rows["inception4d.concat"].output_shape == (1, 528, 6, 6)
    assert rows["pool5"].output_shape == (1, 832, 2, 2)
    assert rows["inception5b.concat"].output_shape == (1, 1024, 2, 2)
    assert len(rows["inception5b.concat"].connected_to) == 4
    flattened = [row.output_shape for row in rows.values() if row.type == "Flatten"]
    assert sorted(flattened) == [(1, 1024), (1, 2048), (1, 2112)]


def test_seed_inception_v2_shapes_follow_the_report(rows_by_model):
    rows = rows_by_model["seed-inception-v2"]
    assert rows[1].output_shape == (1, 32, 15, 15) and rows[1].params == 896
    concats = [row for row in rows if row.type == "Concat" and row.name.count(".") == 1]
    assert [row.output_shape[1] for row in concats] == [512, 512, 1024, 1024, 3072, 3072]
    assert all(row.output_shape[2:] == (15, 15) for row in concats)
    flattened = sorted(row.output_shape for row in rows if row.type == "Flatten")
    assert flattened == [(1, 12_800), (1, 25_600), (1, 76_800)]


def test_seed_naive_shapes_follow_the_report(rows_by_model):
    rows = rows_by_model["seed-naive"]
    assert rows_named(rows, "concat")[0].output_shape == (1, 227, 32, 32)
    assert [row.output_shape for row in rows if row.type == "Flatten"] == [(1, 232_448)]


def test_summarize_restores_modes_and_matches_a_real_model():
    model = create_model("inception-v3", width=0.25).train()
    model.mixed_5b.eval()
    before = [m.training for m in model.modules()]
    real = summarize(model)
    assert [m.training for m in model.modules()] == before
    assert real == summarize(build_on_meta("inception-v3", width=0.25))


def test_format_summary_table_shape_and_totals():
    model = build_on_meta("seed-googlenet")
    text = format_summary(model, name="seed-googlenet")
    lines = text.splitlines()
    assert lines[0] == 'Model: "seed-googlenet"'
    assert re.match(r"Layer \(type\)\s+Output Shape\s+Param #\s+Connected to$", lines[2])
    assert set(lines[3]) == {"="}
    assert lines[-3:] == ["Total params: 8,390,710", "Trainable params: 8,390,710",
                          "Non-trainable params: 0"]
    rows = summarize(model)
    extra = sum(max(0, len(row.connected_to) - 1) for row in rows)
    assert len(lines) == 4 + len(rows) + extra + 4
    stem = next(line for line in lines if line.startswith("stem (ConvBNAct)"))
    assert stem.split()[2:] == ["(1,", "64,", "13,", "13)", "9,472", "input"]


# ------------------------------------------------------------------------------ commands

@pytest.mark.parametrize("key", list(REPORT_TOTALS), ids=lambda k: " ".join((k[0], *k[1])))
def test_summary_command_ends_with_the_report_totals(capsys, key):
    name, extra = key
    assert main(["summary", name, *extra]) == 0
    lines = capsys.readouterr().out.splitlines()
    total = REPORT_TOTALS[key]
    assert lines[-4:-2] == [f"Total params: {total}", f"Trainable params: {total}"]
    macs = count_macs(build_on_meta(name, **parse_options(extra[1:2])))
    assert lines[-1] == f"Multiply-adds per 32x32 image (inference): {macs:,}"


def test_summary_at_another_image_size(capsys):
    assert main(["summary", "googlenet", "-o", "width=0.25", "--image-size", "64"]) == 0
    out = capsys.readouterr().out
    model = build_on_meta("googlenet", width=0.25)
    assert re.search(r"input \(Input\)\s+\(1, 3, 64, 64\)", out)
    assert count_macs(model, 64) > 3.5 * count_macs(model)  # about 4x the pixels
    assert out.splitlines()[-1] == (f"Multiply-adds per 64x64 image (inference): "
                                    f"{count_macs(model, 64):,}")


def test_models_command_lists_params_and_macs(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for row in model_table():
        line = next(line for line in out.splitlines() if line.startswith(row["name"] + " "))
        assert f"{row['params']:,}" in line and f"{row['macs']:,}" in line
    assert "width=1.0" in out and "fix_3x3=False" in out


@pytest.mark.parametrize("argv, fragment", [
    (["summary", "resnet"], "known models: baseline-plain, googlenet"),
    (["summary", "googlenet", "--option", "width"], "key=value"),
    (["summary", "googlenet", "--option", "depth=3"], "no option 'depth'"),
    (["summary", "googlenet", "--option", "width=big"], "width"),
    (["summary", "seed-naive", "--image-size", "64"], "takes images of 32x32 only"),
    (["summary", "googlenet", "--image-size", "5000"], "from 8 to 512"),
])
def test_summary_command_errors(capsys, argv, fragment):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("cifar-inception: error: ") and fragment in err
    assert "Traceback" not in err


def test_summary_of_a_custom_size_model(capsys):
    assert main(["summary", "googlenet", "-o", "width=0.25", "--num-classes", "100"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"head\.3 \(Linear\)\s+\(1, 100\)", out)
    total = count_parameters(create_model("googlenet", num_classes=100, width=0.25))
    assert f"Total params: {total:,}" in out
