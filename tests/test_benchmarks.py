"""The benchmark harness runs, on a tiny setting: throughput, time to accuracy, profile, gpu.sh.

These check that the scripts work and write what they promise, not how fast anything is.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
BENCHMARKS = TESTS.parent / "benchmarks"

import _common
import budget_vs_baseline
import throughput
import time_to_accuracy
from cifar_inception.recipes import CPU10_MODEL_OPTIONS
from synthetic_data import easy_data, write_image_tree

# one thread: tiny batches gain nothing from two, and lose a lot on a busy machine
TINY_MODEL = ["--set", 'model_options={"width": 0.25}', "--set", "num_threads=1"]


@pytest.fixture(scope="module")
def image_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("tree")
    write_image_tree(easy_data(n_train=200, n_test=40), root)
    return root


def test_throughput_table_and_json(tmp_path, capsys):
    out = tmp_path / "throughput.json"
    result = throughput.main(["--models", "inception-cpu:width=0.25", "--batch-size", "4",
                              "--steps", "1", "--warmup", "1", "--device", "cpu",
                              "--threads", "1", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["rows"] == result["rows"]
    row = saved["rows"][0]
    assert row["model"] == "inception-cpu:width=0.25" and row["batch"] == 4
    assert row["train_img_s"] > 0 and row["infer_img_s"] > 0 and row["mmacs"] > 0
    assert saved["environment"]["torch"] and saved["environment"]["date"]
    assert "| inception-cpu:width=0.25 |" in capsys.readouterr().out


def test_throughput_spec_parsing():
    assert throughput.parse_spec("googlenet:width=0.25,aux_logits=false") == (
        "googlenet", {"width": 0.25, "aux_logits": False})
    assert throughput.parse_spec("inception-cpu") == ("inception-cpu", {})


def test_settings_are_typed_like_the_config():
    settings = _common.parse_settings(
        ["epochs=2", "lr=0.5", "flip=false", "name=none", 'model_options={"width": 0.5}'])
    assert settings == {"epochs": 2, "lr": 0.5, "flip": False, "name": None,
                        "model_options": {"width": 0.5}}
    with pytest.raises(SystemExit, match="training option"):
        _common.parse_settings(["no_such_option=1"])


def test_seed_summary_checkpoints_and_targets():
    points = [{"train_seconds": 50.0, "test_acc": 0.80},
              {"train_seconds": 110.0, "test_acc": 0.905},
              {"train_seconds": 170.0, "test_acc": 0.93}]
    summary = time_to_accuracy.summarise_seed(points, (100.0, 200.0), (0.90, 0.92, 0.95))
    assert summary["final"] == 0.93 and summary["epochs"] == 3
    assert summary["at_100s"] == 0.80 and summary["at_200s"] == 0.93
    assert summary["to_0.90"] == 110.0 and summary["to_0.92"] == 170.0
    assert summary["to_0.95"] is None
    table = {r["metric"]: r for r in time_to_accuracy.aggregate([summary, summary])}
    assert table["final"]["mean"] == pytest.approx(0.93) and table["final"]["std"] == 0.0
    assert table["to_0.95"]["n"] == "0/2"


def test_time_to_accuracy_runs_seeds_and_an_ablation(tmp_path, image_tree, capsys):
    out = tmp_path / "tta.json"
    result = time_to_accuracy.main([
        "--recipe", "cpu10", "--seeds", "2", "--data-dir", str(image_tree), "--device", "cpu",
        "--set", "epochs=2", "--set", "batch_size=32", "--set", "val_size=20", *TINY_MODEL,
        "--ablate", "no-lookahead:lookahead=false", "--quiet", "--checkpoints", "1000",
        "--out-dir", str(tmp_path / "runs"), "--json", str(out)])
    saved = json.loads(out.read_text())
    assert [v["label"] for v in saved["variants"]] == ["recipe", "no-lookahead"]
    assert saved["variants"][1]["settings"]["lookahead"] is False
    runs = saved["variants"][0]["runs"]
    assert [r["seed"] for r in runs] == [0, 1]
    for run in runs:
        assert [p["epoch"] for p in run["points"]] == [1, 2]
        times = [p["train_seconds"] for p in run["points"]]
        assert 0 < times[0] < times[1]
        assert all(0 <= p["test_acc"] <= 1 for p in run["points"])
        assert run["summary"]["at_1000s"] == run["points"][-1]["test_acc"]
    assert len(result["ablation"]) == 2
    printed = capsys.readouterr().out
    assert "Ablation" in printed and "Time to accuracy" in printed


BUDGET_VS_BASELINE_TINY = ["--device", "cpu", "--budgets", "30s", "--no-equal-flops",
                           "--option", "width=0.25", "--option", "reduce=true",
                           "--set", "val_size=20", "--set", "batch_size=32",
                           "--set", "num_threads=1", "--set", "tta=false"]


def test_budget_vs_baseline_trains_both_for_the_budget(tmp_path, image_tree, capsys):
    """Both networks for the same budget, the Inception options and the recipe's widening
    on its side only. The budget must hold the probe and a step of the full-width baseline
    with its validation and test on one thread of a slow or busy CPU: 5 s did not on an idle
    2-core Zen 3 (about 6 s needed), nor 10 s on a busy one (about 23 s)."""
    out = tmp_path / "side.json"
    budget_vs_baseline.main(["--data-dir", str(image_tree), *BUDGET_VS_BASELINE_TINY,
                             "--out-dir", str(tmp_path / "runs"), "--json", str(out)])
    saved = json.loads(out.read_text())
    ours, theirs = saved["runs"]
    assert (ours["run"], theirs["run"]) == ("inception-30s", "baseline-30s")
    assert ours["model_options"] == {**CPU10_MODEL_OPTIONS, "width": 0.25}  # width stays
    assert theirs["model"] == "baseline-plain" and theirs["model_options"] == {}
    recorded = [json.loads((tmp_path / "runs" / f"{r['run']}-seed0" / "config.json")
                           .read_text())["config"] for r in (ours, theirs)]
    assert recorded[0]["widen_for_epochs"] == 9 and recorded[1]["widen_for_epochs"] is None
    assert all(r["budget"] == 30 and r["batch_size"] == 32 for r in recorded)
    row = saved["table"][0]
    assert row["inception_acc"] == ours["test_acc"] and row["baseline_acc"] == theirs["test_acc"]
    assert "inception-cpu width=0.25 reduce=true" in capsys.readouterr().out


def test_budget_vs_baseline_passes_the_widening_asked_for_to_the_inception_runs(
        tmp_path, image_tree, monkeypatch):
    """--widen-for-epochs reaches the Inception runs, not the baseline's (training them is
    the test above's; here the runs are caught as they are asked for)."""
    asked = []

    def caught(args, model, label, seed, data, device, **settings):
        asked.append((label, settings))
        if len(asked) == 2:
            raise SystemExit("caught")
        return {"train_tflop": 1.0}

    monkeypatch.setattr(budget_vs_baseline, "one_run", caught)
    with pytest.raises(SystemExit, match="caught"):
        budget_vs_baseline.main(["--data-dir", str(image_tree), *BUDGET_VS_BASELINE_TINY,
                                 "--widen-for-epochs", "2", "--out-dir", str(tmp_path)])
    (ours, ours_settings), (theirs, theirs_settings) = asked
    assert (ours, theirs) == ("inception-30s", "baseline-30s")
    assert ours_settings["widen_for_epochs"] == 2 and ours_settings["budget"] == 30
    assert theirs_settings == {"budget": 30}


@pytest.mark.slow
def test_gpu_script_falls_back_on_the_cpu(tmp_path, image_tree):
    env = {**os.environ, "PYTHON": sys.executable, "INSTALL": "0", "BUDGET_S": "300",
           "PYTHONPATH": str(TESTS.parent / "src")}
    done = subprocess.run(["bash", str(BENCHMARKS / "gpu.sh"), str(image_tree),
                           str(tmp_path / "out")], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "no CUDA device" in done.stdout
    tail = done.stdout[done.stdout.index("==== results"):]
    for title in ("Time to accuracy", "Throughput", "Ablation"):
        assert title in tail
    for name in ("fast.json", "baseline.json", "throughput.json", "ablation.json"):
        assert json.loads((tmp_path / "out" / name).read_text())["environment"]


def test_gpu_script_runs_the_stages_asked_for(tmp_path, image_tree):
    """The report stage alone (the tiny CPU setting: one epoch of 64 images)."""
    env = {**os.environ, "PYTHON": sys.executable, "INSTALL": "0", "BUDGET_S": "200",
           "PYTHONPATH": str(TESTS.parent / "src")}
    done = subprocess.run(["bash", str(BENCHMARKS / "gpu.sh"), str(image_tree),
                           str(tmp_path / "out"), "report"], env=env, capture_output=True,
                          text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "== report" in done.stdout and "== fast" not in done.stdout
    assert "The report's runs beside ours" in done.stdout
    assert json.loads((tmp_path / "out" / "report.json").read_text())["tests"]
    assert (tmp_path / "out" / "report-curves.png").stat().st_size > 0


def test_gpu_script_refuses_an_unknown_stage(tmp_path, image_tree):
    done = subprocess.run(["bash", str(BENCHMARKS / "gpu.sh"), str(image_tree),
                           str(tmp_path / "out"), "everything"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "unknown stage everything" in done.stderr


def test_gpu_script_refuses_missing_data(tmp_path):
    done = subprocess.run(["bash", str(BENCHMARKS / "gpu.sh"), str(tmp_path / "nothing")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "no data" in done.stderr


def test_a_results_file_names_no_folder_of_the_machine(tmp_path, monkeypatch):
    data = tmp_path / "data.tar.gz"
    data.write_bytes(b"")
    monkeypatch.chdir(tmp_path / "..")
    assert _common.command_line(["x.py", "--data-dir", str(data), "/no/such/path", "-o", "a"]) \
        == ["x.py", "--data-dir", f"{tmp_path.name}/data.tar.gz", "/no/such/path", "-o", "a"]


def test_reproduce_report_trains_resumes_and_compares(tmp_path, image_tree, capsys):
    """One epoch, then a second call that resumes to two: the table has the report's
    figures beside ours, and the test results of the final weights and of best.pt."""
    import reproduce_report

    common = ["--models", "seed-googlenet:fix_3x3=true", "--data-dir", str(image_tree),
              "--device", "cpu", "--threads", "1", "--set", "val_size=20",
              "--set", "train_limit=64", "--out-dir", str(tmp_path / "runs")]
    reproduce_report.main([*common, "--epochs", "1"])
    out = tmp_path / "repro.json"
    figure = tmp_path / "curves.png"
    result = reproduce_report.main([*common, "--epochs", "2", "--json", str(out),
                                    "--plot", str(figure)])
    assert figure.read_bytes().startswith(b"\x89PNG")
    printed = capsys.readouterr().out
    assert "resuming" in printed and "94.44%" in printed
    # the tables as docs/reproduction.md shows them: percentages, ours after the report's
    assert "| network | epoch | report: train loss | ours | report: train acc | ours |" in printed
    assert re.search(r"\| `seed-googlenet:fix_3x3=true` \| 2 \| - \| \d+\.\d{3} \| - \| "
                     r"\d+\.\d{2}% \|", printed)
    run = tmp_path / "runs" / "seed-googlenet-fix_3x3-true"
    assert len(json.loads((run / "config.json").read_text())["resumed"]) == 1
    rows = [r for r in result["epochs"] if "train_loss" in r]
    assert [r["epoch"] for r in rows] == [1, 2]
    test = result["tests"][0]
    assert 0.0 <= test["test_acc_final"] <= 1.0 and test["test_loss_best"] > 0
    # last.pt and best.pt of the same weights are tested once; other weights are not the same
    last, best = run / "last.pt", run / "best.pt"
    if reproduce_report.same_weights(last, best):
        assert test["test_acc_final"] == test["test_acc_best"]
    changed = torch.load(last, weights_only=True)
    first = next(iter(changed["state_dict"]))
    changed["state_dict"][first] = changed["state_dict"][first] + 1
    torch.save(changed, tmp_path / "changed.pt")
    assert reproduce_report.same_weights(last, last)
    assert not reproduce_report.same_weights(last, tmp_path / "changed.pt")
    assert json.loads(out.read_text())["tests"] == result["tests"]
    # every head's validation, each epoch (the report logs all three heads of Inception v2)
    heads = [json.loads(line) for line in (run / "heads.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in heads] == [1, 2] and all(len(h["heads"]) == 3 for h in heads)
    main_head = heads[1]["heads"][0]
    assert main_head["val_acc"] == pytest.approx(rows[1]["val_acc"])
    assert main_head["val_loss"] == pytest.approx(rows[1]["val_loss"], rel=1e-4)
    assert all(0.0 <= r[k] <= 1.0 for r in rows for k in ("aux1_val_acc", "aux2_val_acc"))
    assert "Every head's validation accuracy" in printed
    # --no-train tabulates what the folders hold, and leaves out a model never trained
    again = reproduce_report.main([*common, "--no-train", "--models",
                                   "seed-googlenet:fix_3x3=true", "seed-naive"])
    assert [t["model"] for t in again["tests"]] == ["seed-googlenet:fix_3x3=true"]
    assert again["tests"][0]["epochs"] == 2
    assert "seed-naive: no run in" in capsys.readouterr().out
    # best.pt's test, written after it was saved, is reused; a best.pt saved since is tested
    tested = []
    real_evaluate = reproduce_report.evaluate
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(reproduce_report, "evaluate",
                      lambda path, **kw: tested.append(Path(path).name) or real_evaluate(path,
                                                                                     **kw))
        assert reproduce_report.main([*common, "--no-train"])["tests"] == again["tests"]
        assert "best.pt" not in tested and "is reused" in capsys.readouterr().out
        os.utime(best, (time.time() + 5, time.time() + 5))
        assert reproduce_report.main([*common, "--no-train"])["tests"] == again["tests"]
        assert "best.pt" in tested
    # the figure takes earlier results beside this call's (another recipe's, say)
    (tmp_path / "other.json").write_text(json.dumps({**result, "recipe": "default"}))
    both = tmp_path / "both.png"
    reproduce_report.main([*common, "--no-train", "--plot", str(both), "--plot-with",
                           str(tmp_path / "other.json")])
    assert both.read_bytes().startswith(b"\x89PNG")
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(SystemExit) as info:
        reproduce_report.main([*common, "--no-train", "--plot", str(both), "--plot-with",
                               str(tmp_path / "bad.json")])
    assert "not a results file" in str(info.value.code)  # one line, exit status 1


def test_reproduce_report_figure_draws_each_run_once():
    """A network this call tabulates replaces its earlier rows of the same recipe; other
    recipes' rows and other networks stay."""
    import reproduce_report

    def rows(model, epochs):
        return [{"model": model, "epoch": e, "val_acc": 0.5} for e in range(1, epochs + 1)]

    earlier = {"seed": rows("seed-naive", 3) + rows("seed-googlenet", 10),
               "default": rows("seed-naive", 10)}
    merged = reproduce_report.with_this_call(earlier, "seed", rows("seed-naive", 10))
    seed = merged["seed"]
    assert [r["epoch"] for r in seed if r["model"] == "seed-naive"] == list(range(1, 11))
    assert len([r for r in seed if r["model"] == "seed-googlenet"]) == 10
    assert merged["default"] == earlier["default"]
    assert len(earlier["seed"]) == 13  # the earlier results are left as they were
    assert reproduce_report.with_this_call({}, "seed", rows("x", 1)) == {"seed": rows("x", 1)}


def test_seed_speed_times_a_step_in_a_fresh_process(tmp_path, capsys):
    """One setting of the report's recipe, run by the script in its own process."""
    import seed_speed

    out = tmp_path / "seed-speed.json"
    result = seed_speed.main(["--models", "seed-googlenet", "--settings", "+ memory reuse",
                              "--steps", "1", "--warmup", "0", "--threads", "1",
                              "--json", str(out)])
    row = result["rows"][0]
    assert row["setting"] == "+ memory reuse" and row["batch"] == 32 and row["threads"] == 1
    assert row["ms_median"] > 0 and row["epoch_min"] > 0
    assert "| seed-googlenet | + memory reuse |" in capsys.readouterr().out
    assert json.loads(out.read_text())["rows"] == result["rows"]


def test_budget_under_load_runs_the_command_beside_a_bounded_hog(tmp_path, image_tree,
                                                                  capsys):
    """One condition on a tiny setting (a hog from halfway): the command's wall and CPU
    seconds, epochs and test accuracy are reported, and the hog (its own session) is gone
    afterwards. The budget holds the command's start and the probe on a busy machine."""
    import budget_under_load

    started = []
    real_start = budget_under_load.Hog._start

    def start(hog):
        real_start(hog)
        started.append(hog.process)

    budget_under_load.Hog._start = start
    try:
        out = tmp_path / "load.json"
        result = budget_under_load.main([
            "--data-dir", str(image_tree), "--budget", "20s", "--conditions",
            "hog-half", "--no-equal-cpu", "--out-dir", str(tmp_path / "runs"),
            "--json", str(out),
            "--markdown", str(tmp_path / "BENCH.md"),
            "--train-args", "--width 0.25 --val-size 20 --batch-size 32 --threads 1 "
                            "--no-tta --device cpu"])
    finally:
        budget_under_load.Hog._start = real_start
    rows = json.loads(out.read_text())["rows"]
    assert [r["condition"] for r in rows] == ["hog-half"] == \
        [r["condition"] for r in result["rows"]]
    assert all(r["exit"] == 0 and r["epochs"] >= 1 and r["test_top1"] is not None
               and r["cpu_s"] > 0 and r["wall_s"] > 0 for r in rows), rows
    assert len(started) == 1 and started[0].poll() is not None  # the hog was ended
    markdown = (tmp_path / "BENCH.md").read_text()
    assert "The budget under load (20s)" in markdown and "| hog-half |" in markdown
    assert "| hog-half |" in capsys.readouterr().out


def test_budget_under_load_sets_each_loaded_run_beside_an_idle_one_of_its_cpu_time(
        monkeypatch):
    """The reference run of a loaded condition gets the loaded run's CPU seconds over the
    cores as its budget, and the loaded row carries its accuracy against it, in points."""
    import argparse
    import os

    import budget_under_load

    asked = []

    def run_condition(condition, args, budget_s, label=None):
        asked.append((condition, budget_s, label))
        return {"condition": label, "budget_s": budget_s, "test_top1": 0.80}

    monkeypatch.setattr(budget_under_load, "run_condition", run_condition)
    cores = len(os.sched_getaffinity(0))
    rows = [{"condition": "idle", "cpu_s": 1100.0 * cores, "test_top1": 0.85},
            {"condition": "hog-whole", "cpu_s": 300.0 * cores, "test_top1": 0.795},
            {"condition": "hog-first", "cpu_s": 500.0 * cores, "test_top1": None}]
    references = budget_under_load.equal_cpu_references(rows, argparse.Namespace())
    assert asked == [("idle", 300, "idle, hog-whole's CPU time"),
                     ("idle", 500, "idle, hog-first's CPU time")]
    assert len(references) == 2
    assert rows[1]["vs_equal_cpu"] == pytest.approx(-0.5)
    assert "vs_equal_cpu" not in rows[0] and "vs_equal_cpu" not in rows[2]
