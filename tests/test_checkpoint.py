"""checkpoint: a loaded checkpoint is checked in one place before any loader trusts it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cifar_inception import checkpoint as ckpt_mod
from cifar_inception.cli import main
from cifar_inception.errors import CheckpointError, CifarInceptionError
from cifar_inception.evaluation import evaluate
from cifar_inception.inference import load_classifier
from cifar_inception.models import list_models, register_model
from cifar_inception.report import gather
from small_model import CLASSES, SMALL, small_checkpoint

NAN_OUT = "test-checkpoint-nan-out"


class NanOut(torch.nn.Module):
    """Finite (no) weights, NaN outputs: what only an output check can catch."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x):
        return torch.full((x.shape[0], self.num_classes), float("nan"))


if NAN_OUT not in list_models():
    register_model(NAN_OUT)(lambda num_classes=10: NanOut(num_classes))


def save(path, ckpt) -> str:
    ckpt_mod.save_checkpoint(path, ckpt)
    return str(path)


@pytest.fixture()
def image(tmp_path):
    from PIL import Image

    path = tmp_path / "picture.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(path)
    return str(path)


def assert_one_line_error(capsys, *needles: str) -> None:
    captured = capsys.readouterr()
    assert captured.err.startswith("cifar-inception: error: "), captured.err
    assert captured.err.count("\n") == 1, captured.err
    for needle in needles:
        assert needle in captured.err, captured.err


def damage(ckpt: dict, what: str) -> dict:
    if what == "no model":
        del ckpt["model"]
    elif what == "3 classes":
        ckpt["data"]["classes"] = CLASSES[:3]
    elif what == "mean a string":
        ckpt["data"]["mean"] = "0.5, 0.5, 0.5"
    elif what == "std zeros":
        ckpt["data"]["std"] = [0.0, 0.0, 0.0]
    elif what == "weights not tensors":
        ckpt["state_dict"]["head.bias"] = [0.0] * 10
    elif what == "option nan":
        ckpt["model"]["options"] = {"hidden": float("nan")}
    return ckpt


DAMAGE = {"no model": "no 'model' entry", "3 classes": "names 3 classes",
          "mean a string": "'mean' entry is a str", "std zeros": "'std' must be positive",
          "weights not tensors": "not a tensor", "option nan": "model option 'hidden'"}


@pytest.mark.parametrize("what", list(DAMAGE))
def test_damaged_checkpoints_are_refused_naming_the_problem(tmp_path, image, capsys, what):
    path = save(tmp_path / "best.pt", damage(small_checkpoint(), what))
    with pytest.raises(CheckpointError, match=DAMAGE[what]):
        ckpt_mod.load_checkpoint(path)
    assert main(["predict", path, image]) == 2
    assert_one_line_error(capsys, DAMAGE[what])
    assert main(["evaluate", path, "--no-download", "--data-dir", str(tmp_path)]) == 2
    assert_one_line_error(capsys, DAMAGE[what])
    assert main(["serve", path, "--port", "0"]) == 2
    assert_one_line_error(capsys, DAMAGE[what])


def test_a_huge_class_count_is_refused_before_anything_is_built(tmp_path, monkeypatch):
    built = []
    monkeypatch.setattr(ckpt_mod, "_build", lambda *a, **k: built.append(a) or None)
    ckpt = small_checkpoint()
    ckpt["model"]["num_classes"] = 10**9
    ckpt["data"]["classes"] = ["x"] * 3
    path = save(tmp_path / "huge.pt", ckpt)
    with pytest.raises(CheckpointError, match="num_classes must be a whole number from 1 to"):
        load_classifier(path, device="cpu")
    assert built == []


def test_weights_of_another_size_are_refused_from_a_meta_model(tmp_path, monkeypatch):
    devices = []
    real_build = ckpt_mod._build
    monkeypatch.setattr(ckpt_mod, "_build", lambda info, where, device=None: (
        devices.append(device), real_build(info, where, device))[1])
    for options, needle in (({"hidden": 10**5}, "weights do not fit"),
                            ({"hidden": 10**9}, "over the limit")):
        ckpt = small_checkpoint()
        ckpt["model"]["options"] = options
        path = save(tmp_path / "wide.pt", ckpt)
        with pytest.raises(CheckpointError, match=needle):
            load_classifier(path, device="cpu")
    assert devices == ["meta", "meta"]  # the real model was never allocated


def test_nan_weights_are_refused_by_every_command(tmp_path, image, capsys):
    ckpt = small_checkpoint()
    ckpt["state_dict"]["head.weight"][0, 0] = float("nan")
    path = save(tmp_path / "best.pt", ckpt)
    for args in (["predict", path, image], ["predict", path, image, "--json"],
                 ["evaluate", path, "--no-download", "--data-dir", str(tmp_path)],
                 ["export", path, "--format", "torchscript", "-o", str(tmp_path / "x.pt")]):
        assert main(args) == 2
        assert_one_line_error(capsys, "NaN or infinite")
    assert capsys.readouterr().out == ""


def test_nan_outputs_are_refused_by_predict_and_evaluate(tmp_path, image, capsys):
    from cifar_inception.data import CIFAR10

    ckpt = ckpt_mod.make_checkpoint(model_name=NAN_OUT, model_options={}, num_classes=10,
                                    classes=CLASSES, mean=[0, 0, 0], std=[1, 1, 1],
                                    state_dict={})
    path = save(tmp_path / "best.pt", ckpt)
    assert main(["predict", path, image, "--json"]) == 2
    assert_one_line_error(capsys, "NaN or infinite outputs")
    images = np.zeros((10, 32, 32, 3), np.uint8)
    labels = np.arange(10)
    data = CIFAR10(images, labels, images, labels, tuple(CLASSES), "made", "none")
    with pytest.raises(CifarInceptionError, match="NaN or infinite"):
        evaluate(path, data, device="cpu")
    assert not (tmp_path / "eval.json").exists()


def write_run_config(folder, **config) -> None:
    (folder / "config.json").write_text(json.dumps({"config": config}))


def test_a_checkpoint_copied_from_another_run_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    write_run_config(run, model="googlenet", model_options={"width": 0.25}, seed=0)
    save(run / "best.pt", small_checkpoint())
    with pytest.raises(CheckpointError, match="not this run's checkpoint: its model is"):
        evaluate(run, data=object())
    with pytest.raises(CheckpointError, match="not this run's checkpoint"):
        gather(run, device="cpu")
    assert main(["evaluate", str(run), "--no-download"]) == 2
    assert_one_line_error(capsys, "not this run's checkpoint", "config.json")
    assert main(["report", str(run), "--no-download"]) == 2
    assert_one_line_error(capsys, "not this run's checkpoint")


def test_same_model_but_another_runs_training_settings_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    settings = {"model": SMALL, "model_options": {"hidden": 4}, "seed": 1, "lr": 0.1,
                "aux_weights": [0.3], "epochs": 5, "device": "cpu"}
    write_run_config(run, **settings)
    # A resume may change runtime settings (epochs, device): still the run's own.
    own = dict(settings, epochs=10, device="cuda", aux_weights=(0.3,))
    ckpt_mod.check_run_matches(small_checkpoint(training={"config": own}), run / "best.pt")
    other = dict(settings, seed=2)
    with pytest.raises(CheckpointError, match="its seed is 2"):
        ckpt_mod.check_run_matches(small_checkpoint(training={"config": other}),
                                   run / "best.pt")


def test_a_fifo_is_not_read_as_a_checkpoint(tmp_path, image):
    fifo = tmp_path / "model.pt"
    import os

    os.mkfifo(fifo)
    with pytest.raises(CheckpointError, match="not a regular file"):
        load_classifier(fifo, device="cpu")


@pytest.mark.parametrize("planted", ["text file", "symlinked best.pt"])
def test_a_text_file_is_not_a_checkpoint(tmp_path, image, capsys, planted):
    text = tmp_path / "passwd"
    text.write_text("root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1::/usr/sbin:/bin/sh\n")
    target = text
    if planted == "symlinked best.pt":
        run = tmp_path / "run"
        run.mkdir()
        (run / "best.pt").symlink_to(text)
        target = run
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        ckpt_mod.load_checkpoint(target)
    assert main(["predict", str(target), image]) == 2
    assert_one_line_error(capsys, "not a readable checkpoint")


def deflated_copy(source, dest) -> str:
    """The same records, deflated: what torch.save never writes."""
    import zipfile

    with zipfile.ZipFile(source) as archive, \
            zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as out:
        for record in archive.infolist():
            out.writestr(record.filename, archive.read(record.filename))
    return str(dest)


def test_a_compressed_tensor_is_refused_before_it_is_inflated(tmp_path, image, capsys):
    ckpt = small_checkpoint()
    ckpt["metrics"] = {"val_acc": 0.5, "padding": torch.zeros(4_000_000)}  # 16 MB of zeros
    plain = save(tmp_path / "plain.pt", ckpt)
    path = deflated_copy(plain, tmp_path / "deflated.pt")
    assert (tmp_path / "deflated.pt").stat().st_size < 200_000
    with pytest.raises(CheckpointError, match="is compressed"):
        ckpt_mod.load_checkpoint(path)
    assert main(["predict", path, image]) == 2
    assert_one_line_error(capsys, "is compressed")


def test_tensors_beyond_the_weights_are_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt_mod, "MAX_SMALL_TENSOR_BYTES", 1000)
    ckpt = small_checkpoint()
    ckpt["metrics"] = {"val_acc": 0.5, "padding": torch.zeros(1000)}
    with pytest.raises(CheckpointError, match="'metrics' entry holds 4,000 bytes of tensors"):
        ckpt_mod.load_checkpoint(save(tmp_path / "padded.pt", ckpt))
    # An optimiser's copy of every weight is what training keeps: accepted.
    ckpt = small_checkpoint()
    ckpt["training"] = {"optimizer": {k: v.clone() for k, v in ckpt["state_dict"].items()}}
    assert ckpt_mod.load_checkpoint(save(tmp_path / "resumable.pt", ckpt))["training"]


def test_a_tensor_claiming_more_than_it_stores_is_refused_before_it_is_copied(tmp_path, image,
                                                                              capsys):
    # One stored float, viewed with a zero stride as 10**12 of them: a 2 KB file whose copy
    # into memory would take 4 TB. It is counted as its copy, before anything is copied.
    ckpt = small_checkpoint()
    ckpt["metrics"] = {"val_acc": 0.5, "x": torch.zeros(1).expand(10**12)}
    path = save(tmp_path / "claims.pt", ckpt)
    assert (tmp_path / "claims.pt").stat().st_size < 100_000
    assert main(["predict", path, image]) == 2
    assert_one_line_error(capsys, "'metrics' entry holds 4,000,000,000,000 bytes")
    # The same in the weights themselves: over the largest model's weights.
    ckpt = small_checkpoint()
    ckpt["state_dict"]["head.bias"] = torch.zeros(1).expand(10**12)
    with pytest.raises(CheckpointError, match=r"its weights take 4,000,000,000,\d{3} bytes"):
        ckpt_mod.load_checkpoint(save(tmp_path / "claims-weights.pt", ckpt))


def test_a_small_file_cannot_claim_memory_under_the_limits(tmp_path):
    # 400 MB of weights, far under the largest model's, from one stored float.
    ckpt = small_checkpoint()
    ckpt["state_dict"]["head.bias"] = torch.zeros(1).expand(10**8)
    path = save(tmp_path / "repeats.pt", ckpt)
    size = (tmp_path / "repeats.pt").stat().st_size
    with pytest.raises(CheckpointError, match=rf"would take 4\d{{2}},\d{{3}},\d{{3}} bytes in "
                                              rf"memory, more than the {size:,} bytes"):
        ckpt_mod.load_checkpoint(path)


def test_a_pickle_of_many_small_objects_is_refused_unread(tmp_path, monkeypatch):
    # Unpickling inflates a pickle's bytes about 150-fold in memory; its size is checked
    # before torch reads it. Every real checkpoint's pickle is far under the limit.
    ckpt = small_checkpoint()
    ckpt["metrics"] = {"val_acc": 0.5, "lists": [[] for _ in range(20_000)]}
    path = save(tmp_path / "lists.pt", ckpt)
    monkeypatch.setattr(ckpt_mod, "MAX_PICKLE_BYTES", 10_000)
    with pytest.raises(CheckpointError, match="pickled structure is .* over the limit of 10,000"):
        ckpt_mod.load_checkpoint(path)
    monkeypatch.undo()
    assert ckpt_mod.load_checkpoint(path)["metrics"]["val_acc"] == 0.5
