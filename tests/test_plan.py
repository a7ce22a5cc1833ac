"""The run plan apart from the config: the config is what was asked for and never changes;
the plan is what the run decided, recorded in config.json and continued by a resume."""

from __future__ import annotations

import dataclasses
import json

import pytest

from cifar_inception.checkpoint import check_run_matches, load_checkpoint
from cifar_inception.errors import CheckpointError
from cifar_inception.recipes import build_config
from cifar_inception.training import resume_config, train
from cifar_inception.training.plan import Surroundings, TrainPlan, plan_run, resumed_plan

from synthetic_data import TINY, easy_data

HERE = Surroundings(False, 1, None, 1)


@pytest.fixture(scope="module")
def data():
    return easy_data(n_train=300, n_test=100)


def tiny_config(tmp_path, **overrides):
    # 240 training images in batches of 32: 7 steps an epoch; 12 steps make 2 epochs
    settings = dict(epochs=3, train_steps=12, batch_size=32, lr=0.1, val_size=60,
                    warmup_epochs=0.5, out_dir=str(tmp_path / "runs"), name="run",
                    test=False, num_threads=1)
    return build_config(TINY, "default", **{**settings, **overrides})


def record_of(run_dir) -> dict:
    return json.loads((run_dir / "config.json").read_text())


def test_the_config_is_frozen_and_a_run_never_rewrites_it(tmp_path, data):
    config = tiny_config(tmp_path, data_dir="relative/data")
    asked = dataclasses.asdict(config)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.epochs = 5
    result = train(config, data, log=lambda _: None)
    assert result.status == "completed" and len(result.history) == 2  # as planned, not 3
    assert dataclasses.asdict(config) == asked
    record = record_of(result.run_dir)
    assert record["config"] == json.loads(json.dumps(asked))  # what was asked, as asked
    assert record["plan"]["epochs"] == 2 and record["plan"]["total_steps"] == 12
    assert record["plan"]["data_dir"].endswith("relative/data")
    assert record["plan"]["data_dir"].startswith("/")  # evaluation finds it from anywhere


def test_the_plan_recorded_and_resumed(tmp_path, data):
    paused = train(tiny_config(tmp_path, stop_after_epochs=1), data, log=lambda _: None)
    assert paused.status == "paused"
    record = record_of(paused.run_dir)
    assert record["config"]["train_steps"] == 12 and record["config"]["epochs"] == 3
    plan = record["plan"]
    assert (plan["total_steps"], plan["steps_per_epoch"], plan["epochs"]) == (12, 7, 2)
    assert plan["processes"] == 1 and plan["threads"] == 1 and plan["tta_views"] == 0
    assert load_checkpoint(paused.run_dir / "last.pt")["training"]["plan"] == plan

    resumed = train(resume_config(paused.run_dir), data, resume=paused.run_dir,
                    log=lambda _: None)
    assert resumed.status == "completed" and resumed.epoch == 2
    after = record_of(resumed.run_dir)
    assert after["plan"] == plan  # the pause belonged to the first invocation only
    assert after["config"] == {**record["config"], "stop_after_epochs": None}
    assert len(after["resumed"]) == 1


def test_a_resume_follows_the_recorded_plan_unless_it_asks_for_another_length():
    config = build_config(TINY, "default", epochs=3, budget=None)
    recorded = plan_run(config, 10, HERE, model_options={"width": 1.5}, tta_views=2)
    recorded = recorded.replanned(recorded.schedule.replanned(5, 17, 1))  # a budget's
    saved = recorded.to_dict()
    kept = resumed_plan(config, config.to_dict(), saved, 10, HERE)
    assert kept == TrainPlan.from_dict(saved, HERE) and kept.total_steps == 17
    longer = dataclasses.replace(config, epochs=5)
    replaced = resumed_plan(longer, config.to_dict(), saved, 10, HERE)
    assert replaced.total_steps == 50 and replaced.epochs == 5
    assert replaced.model_options == {"width": 1.5}  # the model as it was built


def test_budget_wins_only_where_measured_and_the_explicit_length_replaces_a_recipe_budget():
    budgeted = build_config("inception-cpu", "cpu10")
    assert budgeted.budget is not None
    assert plan_run(budgeted, 10, HERE, measured_steps=33).total_steps == 33
    assert build_config("inception-cpu", "cpu10", epochs=2).budget is None
    stepped = build_config(TINY, "default", epochs=3, train_steps=25)
    assert plan_run(stepped, 10, HERE).total_steps == 25
    assert plan_run(build_config(TINY, "default", epochs=3), 10, HERE).total_steps == 30


def test_a_widened_runs_own_best_pt_matches_its_plan(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    config = build_config("inception-cpu", "cpu10")
    plan = plan_run(config, 10, HERE, model_options={**config.model_options, "width": 1.5})
    best = {"model": {"name": config.model, "options": plan.model_options}}
    (folder / "config.json").write_text(json.dumps({"config": config.to_dict(),
                                                    "plan": plan.to_dict()}))
    check_run_matches(best, folder / "best.pt")  # its own: accepted
    (folder / "config.json").write_text(json.dumps({"config": config.to_dict()}))
    with pytest.raises(CheckpointError, match="not this run's checkpoint"):
        check_run_matches(best, folder / "best.pt")
