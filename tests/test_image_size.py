"""--image-size end to end: every model's declared sizes are true, training refuses a size
its model does not take in one line, and a run at another size is followed by evaluate,
predict, export and the ONNX classifier without being told."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from model_names import project_models
from PIL import Image
from small_model import small_checkpoint
from synthetic_data import TINY

from cifar_inception.checkpoint import image_size_of, load_checkpoint, save_checkpoint
from cifar_inception.cli import main
from cifar_inception.errors import CheckpointError, ModelError
from cifar_inception.models import InceptionOutputs, create_model
from cifar_inception.models.registry import check_image_size, model_info, model_options

CLASSES = ("ant", "cat", "cow")
COLOURS = ((200, 30, 30), (30, 200, 30), (30, 30, 200))
SIDE = 48  # what the run trains at; the tree's images are 20x20
TRAIN_ARGS = ["--epochs", "1", "--batch-size", "12", "--val-size", "3", "--threads", "1",
              "--no-cpu-amp"]


# --- every model's declared sizes ------------------------------------------------------------


def forward_at(name: str, side: int, *, train: bool, shapes_only: bool = False
               ) -> torch.Tensor:
    """The main logits of a forward pass at ``side`` pixels, batch 2, 7 classes. Models with a
    width run narrow and for real; the others (the report's large networks), and any with
    ``shapes_only``, on the meta device, which computes the shapes alone."""
    narrow = "width" in model_options(name)
    device = torch.device("cpu" if narrow and not shapes_only else "meta")
    torch.manual_seed(0)
    with device:
        model = create_model(name, num_classes=7, **({"width": 0.25} if narrow else {}))
        out = model.train(train)(torch.randn(2, 3, side, side))
    return out.logits if isinstance(out, InceptionOutputs) else out


@pytest.mark.parametrize("name", project_models())
def test_every_model_takes_the_sizes_it_declares_and_no_smaller(name):
    sizes = model_info(name).sizes
    for train in (False, True):
        assert forward_at(name, sizes.smallest, train=train).shape == (2, 7)
    if sizes.smallest > 1:
        with pytest.raises(ModelError, match="expected input of shape"):
            forward_at(name, sizes.smallest - 1, train=False)
    if sizes.largest is None:  # no limit of its own: a size above CIFAR's works too
        assert forward_at(name, 48, train=True, shapes_only=True).shape == (2, 7)
    else:
        with pytest.raises(ModelError, match="expected input of shape"):
            forward_at(name, sizes.largest + 1, train=False)


def test_the_report_networks_take_32_only_and_the_others_any_size_from_their_smallest():
    declared = {name: tuple(model_info(name).sizes) for name in project_models()}
    assert {declared[n] for n in ("seed-naive", "seed-googlenet", "seed-inception-v2")} \
        == {(32, 32)}
    assert declared["googlenet"] == (1, None) and declared["inception-v3"] == (27, None)
    for name in ("inception-cpu", "inception-fast", "baseline-plain"):
        assert declared[name] == (9, None)


def test_check_image_size_is_one_line_naming_the_sizes():
    check_image_size("googlenet", 512)
    with pytest.raises(ModelError, match=r"^model 'seed-naive' takes images of 32x32 only, "
                                         r"not 48x48$"):
        check_image_size("seed-naive", 48)
    with pytest.raises(ModelError, match=r"from 27x27 up, not 24x24"):
        check_image_size("inception-v3", 24)
    with pytest.raises(ModelError, match="unknown model"):
        check_image_size("no-such-net", 32)


def test_inception_v3_aux_head_keeps_its_weights_and_its_output_at_32():
    """The auxiliary head's flatten became an average to 1x1 and a flatten: the same weights
    (their names and shapes) and, at 32x32, the same output as before."""
    torch.manual_seed(0)
    model = create_model("inception-v3", width=0.25).train()
    assert "aux1.4.weight" in model.state_dict() and "aux1.3.weight" not in model.state_dict()
    features = torch.randn(2, model.aux1[1][0].in_channels, 16, 16)
    head = model.aux1
    plain = head[4](torch.flatten(head[2](head[1](head[0](features))), 1))
    torch.testing.assert_close(head(features), plain, rtol=0, atol=0)


# --- training refuses a size its model does not take -----------------------------------------


def test_a_seed_model_at_another_size_is_refused_in_one_line_before_the_data(tmp_path, capsys):
    missing = tmp_path / "no-data-here"  # the data is never looked for
    assert main(["train", "seed-naive", "--image-size", "48", "--data-dir", str(missing),
                 "--output", str(tmp_path / "runs"), "--no-download"]) == 2
    err = capsys.readouterr().err
    assert err == ("cifar-inception: error: model 'seed-naive' takes images of 32x32 only, "
                   "not 48x48\n")
    assert not (tmp_path / "runs").exists()


def test_a_model_option_out_of_range_is_refused_in_one_line_before_the_data(tmp_path, capsys):
    missing = tmp_path / "no-data-here"  # the data is never looked for
    assert main(["train", "googlenet", "--option", "width=inf", "--data-dir", str(missing),
                 "--output", str(tmp_path / "runs"), "--no-download"]) == 2
    assert capsys.readouterr().err == ("cifar-inception: error: width must be a number in "
                                       "(0, 4], not inf\n")
    assert not (tmp_path / "runs").exists()


def test_a_model_larger_than_a_checkpoint_may_hold_is_refused_before_the_data(tmp_path,
                                                                             capsys):
    assert main(["train", "inception-cpu", "--option", "widths=4096/4096/4096", "--option",
                 "depths=8/8/8", "--data-dir", str(tmp_path / "no-data-here"),
                 "--no-download"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "over the 1,000,000,000 a checkpoint may hold" in err


def test_a_width_given_twice_is_refused_in_one_line(tmp_path, capsys):
    assert main(["train", "googlenet", "--width", "0.5", "--option", "width=0.25",
                 "--data-dir", str(tmp_path / "no-data-here"), "--no-download"]) == 2
    assert "the width is given twice" in capsys.readouterr().err


def test_an_image_size_out_of_the_data_bounds_is_refused_in_one_line(tmp_path, capsys):
    assert main(["train", TINY, "--image-size", "600", "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "image size must be in [8, 512], not 600" in err


def test_loaded_data_of_another_size_is_refused(tmp_path):
    from synthetic_data import easy_data

    from cifar_inception.errors import TrainingError
    from cifar_inception.recipes import build_config
    from cifar_inception.training import train

    config = build_config(TINY, "default", epochs=1, batch_size=10, val_size=0, image_size=24,
                          out_dir=str(tmp_path), device="cpu", test=False)
    with pytest.raises(TrainingError, match=r"images are \(32, 32, 3\), not the \(24, 24, 3\)"):
        train(config, easy_data(n_train=20, n_test=10), log=lambda line: None)


# --- checkpoints -----------------------------------------------------------------------------


def test_a_checkpoint_without_an_image_size_is_for_32x32(tmp_path):
    from cifar_inception.inference import TorchClassifier

    ckpt = small_checkpoint()
    assert "image_size" not in ckpt["data"] and image_size_of(ckpt) == 32
    save_checkpoint(tmp_path / "old.pt", ckpt)
    classifier = TorchClassifier.from_path(tmp_path / "old.pt", device="cpu")
    assert classifier.image_size == 32 and classifier.info["image_size"] == 32
    with pytest.raises(Exception, match=r"\(N, 32, 32, 3\)"):
        classifier.predict_proba(np.zeros((1, 24, 24, 3), np.uint8))


@pytest.mark.parametrize("size", [7, 513, "48", 48.0, True])
def test_a_checkpoint_with_a_bad_image_size_is_refused_in_one_line(tmp_path, size):
    ckpt = small_checkpoint()
    ckpt["data"]["image_size"] = size
    save_checkpoint(tmp_path / "odd.pt", ckpt)
    with pytest.raises(CheckpointError, match="its image size must be a whole number from 8 "
                                              "to 512"):
        load_checkpoint(tmp_path / "odd.pt")


def test_a_checkpoint_at_a_size_its_model_does_not_take_is_refused(tmp_path):
    from cifar_inception.checkpoint import load_trained_model

    save_checkpoint(tmp_path / "small.pt", small_checkpoint(image_size=48))  # 32 only
    with pytest.raises(CheckpointError, match=r"small.pt: model 'test-small' takes images of "
                                              r"32x32 only, not 48x48"):
        load_trained_model(tmp_path / "small.pt")


# --- a run at 48x48, end to end through the command line -------------------------------------


def write_tree(root, side: int = 20, per_class=(8, 3)) -> None:
    """train/ and test/ folders of side x side PNGs, one colour per class."""
    rng = np.random.default_rng(0)
    for split, count in zip(("train", "test"), per_class, strict=True):
        for name, colour in zip(CLASSES, COLOURS, strict=True):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(np.array(colour) + rng.normal(0, 20, (side, side, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(root / split / name / f"{i}.png")


@pytest.fixture(scope="module")
def run_48(tmp_path_factory):
    """test-tiny trained for an epoch on 20x20 images resized to 48x48."""
    root = tmp_path_factory.mktemp("image-size")
    write_tree(root / "tree")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CIFAR_INCEPTION_CACHE", str(root / "cache"))
        assert main(["train", TINY, "--data-dir", str(root / "tree"), "--image-size",
                     str(SIDE), "--output", str(root / "runs"), "--name", "r48",
                     *TRAIN_ARGS]) == 0
    return root / "runs" / "r48"


def test_the_run_records_its_image_size(run_48):
    record = json.loads((run_48 / "config.json").read_text())
    assert record["config"]["image_size"] == SIDE and record["data"]["image_size"] == SIDE
    for name in ("best.pt", "last.pt"):
        assert load_checkpoint(run_48 / name)["data"]["image_size"] == SIDE
    evaluation = json.loads((run_48 / "eval.json").read_text())
    assert evaluation["num_images"] == 9


def test_evaluate_loads_the_data_at_the_run_size(run_48, capsys):
    assert main(["evaluate", str(run_48), "--no-write", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_images"] == 9


def test_predict_resizes_an_image_of_any_size_to_the_run_size(run_48, tmp_path, capsys):
    from cifar_inception.inference import load_classifier

    picture = tmp_path / "wide.png"
    Image.fromarray(np.full((30, 70, 3), COLOURS[1], np.uint8)).save(picture)
    assert main(["predict", str(run_48), str(picture), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["model"]["image_size"] == SIDE
    assert {p["class"] for p in document["results"][0]["predictions"]} == set(CLASSES)
    assert load_classifier(run_48, device="cpu").image_size == SIDE


def test_the_onnx_export_takes_the_run_size_and_predicts_through_the_package(run_48, tmp_path,
                                                                             capsys):
    import onnx

    from cifar_inception.images import load_cifar_array
    from cifar_inception.inference import OnnxClassifier, load_classifier

    exported = tmp_path / "r48.onnx"
    assert main(["export", str(run_48), "-o", str(exported)]) == 0
    assert f"uint8 (N, {SIDE}, {SIDE}, 3)" in capsys.readouterr().out
    graph_input = onnx.load(exported).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in graph_input][1:] == [SIDE, SIDE, 3]

    onnx_clf = load_classifier(exported)
    assert isinstance(onnx_clf, OnnxClassifier) and onnx_clf.image_size == SIDE
    assert onnx_clf.metadata["image_size"] == SIDE
    assert f"(N, {SIDE}, {SIDE}, 3)" in onnx_clf.metadata["input"]
    picture = tmp_path / "cow.png"
    Image.fromarray(np.full((25, 25, 3), COLOURS[2], np.uint8)).save(picture)
    images = load_cifar_array(picture, size=SIDE)[None]
    np.testing.assert_allclose(onnx_clf.predict_proba(images),
                               load_classifier(run_48, device="cpu").predict_proba(images),
                               rtol=1e-4, atol=1e-5)
    assert main(["predict", str(exported), str(picture), "--json"]) == 0
    predicted = json.loads(capsys.readouterr().out)
    assert predicted["model"]["format"] == "onnx" and predicted["model"]["image_size"] == SIDE


def test_serve_resizes_uploads_to_the_run_size(run_48):
    import base64
    import io

    from starlette.testclient import TestClient

    from cifar_inception.inference import load_classifier
    from cifar_inception.serve import create_app

    upload = io.BytesIO()
    Image.fromarray(np.full((64, 16, 3), COLOURS[0], np.uint8)).save(upload, format="PNG")
    with TestClient(create_app(load_classifier(run_48, device="cpu"))) as client:
        assert client.get("/api/model").json()["image_size"] == SIDE
        answer = client.post("/api/predict",
                             files={"file": ("ant.png", upload.getvalue(), "image/png")})
    assert answer.status_code == 200
    png = answer.json()["results"][0]["input_png"].split(",", 1)[1]
    assert Image.open(io.BytesIO(base64.b64decode(png))).size == (SIDE, SIDE)


def test_a_narrow_inception_net_trains_at_24_pixels(tmp_path, capsys):
    write_tree(tmp_path / "tree", side=20, per_class=(8, 2))
    assert main(["train", "inception-cpu", "--width", "0.25", "--data-dir",
                 str(tmp_path / "tree"), "--image-size", "24", "--output", str(tmp_path / "runs"),
                 "--name", "cpu24", *TRAIN_ARGS]) == 0
    assert "validation images of 24x24" in capsys.readouterr().out
    assert image_size_of(load_checkpoint(tmp_path / "runs" / "cpu24" / "best.pt")) == 24
