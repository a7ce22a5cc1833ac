"""export: ONNX parity with PyTorch, dynamic batch, metadata, torch-free ONNX inference,
and the pt2 and TorchScript formats."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from cifar_inception import checkpoint as ckpt_mod
from cifar_inception.augment import normalize
from cifar_inception.cli import main
from cifar_inception.data import CLASSES
from cifar_inception.errors import CheckpointError, CifarInceptionError
from cifar_inception.export import (
    DEFAULT_OPSET,
    METADATA_FILE,
    OnnxClassifier,
    default_output,
    export_model,
    export_onnx,
    run_test_metrics,
)
from cifar_inception.images import load_cifar_array
from cifar_inception.inference import TorchClassifier, load_classifier
from cifar_inception.models import create_model, list_models, register_model

MEAN, STD = [0.491, 0.482, 0.447], [0.247, 0.243, 0.262]
OPTIONS = {"width": 0.25}
PER_CLASS = 5  # real test images per class for the parity check
TINY = "test-export-tiny"


def make_run(folder, *, seed: int = 0):
    """A run folder holding a randomly initialised GoogLeNet-0.25 as best.pt, and its eval.json."""
    torch.manual_seed(seed)
    model = create_model("googlenet", **OPTIONS)
    ckpt = ckpt_mod.make_checkpoint(
        model_name="googlenet", model_options=OPTIONS, num_classes=10, classes=list(CLASSES),
        mean=MEAN, std=STD, state_dict=model.state_dict(), metrics={"epoch": 1, "val_acc": 0.25})
    folder.mkdir(parents=True, exist_ok=True)
    ckpt_mod.save_checkpoint(folder / "best.pt", ckpt)
    (folder / "eval.json").write_text(json.dumps(
        {"test_top1": 0.8125, "test_top5": 0.975, "checkpoint": str(folder / "best.pt")}))
    return folder


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("export") / "run")


@pytest.fixture(scope="module")
def onnx_path(run_dir):
    return export_onnx(run_dir, run_dir / "model.onnx").path


@pytest.fixture(scope="module")
def onnx_classifier(onnx_path):
    return OnnxClassifier(onnx_path)


@pytest.fixture(scope="module")
def torch_reference(run_dir):
    """Eager PyTorch logits, computed as training and evaluation compute them."""
    model, ckpt = ckpt_mod.load_trained_model(run_dir)

    def logits(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            x = normalize(torch.from_numpy(images), ckpt["data"]["mean"], ckpt["data"]["std"])
            return model(x).numpy()

    return logits


def read_test_images(archive, per_class: int = PER_CLASS) -> np.ndarray:
    """A few test images of every class, read straight from the JPEG tar (no full decode)."""
    counts = {name: 0 for name in CLASSES}
    images = []
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            parts = member.name.split("/")
            if not member.isfile() or len(parts) != 3 or parts[0] != "test":
                if images and parts[0] == "train":
                    break  # the test split is done
                continue
            if counts.get(parts[1], per_class) < per_class:
                counts[parts[1]] += 1
                images.append(load_cifar_array(tar.extractfile(member).read(), name=member.name))
            if all(n == per_class for n in counts.values()):
                break
    assert len(images) == per_class * len(CLASSES)
    return np.stack(images)


def generated_images(n: int, seed: int = 0) -> np.ndarray:
    """Smooth colour gradients with noise: more image-like than uniform noise."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, 32, dtype=np.float32)
    images = []
    for _ in range(n):
        a, b, c = rng.uniform(0, 255, (3, 3))
        base = a + np.outer(ramp, np.ones(32))[..., None] * (b - a) + ramp[None, :, None] * (c - a)
        images.append(np.clip(base + rng.normal(0, 12, (32, 32, 3)), 0, 255))
    return np.stack(images).astype(np.uint8)


def assert_parity(onnx_logits: np.ndarray, torch_logits: np.ndarray) -> None:
    assert onnx_logits.dtype == np.float32 and onnx_logits.shape == torch_logits.shape
    assert np.abs(onnx_logits - torch_logits).max() < 1e-4
    np.testing.assert_array_equal(onnx_logits.argmax(1), torch_logits.argmax(1))


def test_onnx_matches_pytorch_on_real_images(onnx_classifier, torch_reference, jpeg_archive):
    images = read_test_images(jpeg_archive)
    assert_parity(onnx_classifier.predict_logits(images), torch_reference(images))


@pytest.mark.parametrize("batch", [1, 7])
def test_onnx_matches_pytorch_at_any_batch_size(onnx_classifier, torch_reference, batch):
    images = generated_images(batch, seed=batch)
    classifier = onnx_classifier
    expected = torch_reference(images)
    assert_parity(classifier.predict_logits(images), expected)
    probs = classifier.predict_proba(images)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(probs.argmax(1), expected.argmax(1))


def test_onnx_batches_larger_than_its_chunk_match_one_by_one(onnx_path, onnx_classifier):
    images = generated_images(5, seed=3)
    chunked = OnnxClassifier(onnx_path, batch_size=2).predict_logits(images)
    single = np.concatenate([onnx_classifier.predict_logits(im[None]) for im in images])
    np.testing.assert_allclose(chunked, single, atol=1e-5)


def test_onnx_graph_takes_uint8_nhwc_with_a_dynamic_batch(onnx_path):
    model = onnx.load(onnx_path)
    onnx.checker.check_model(model)
    assert {op.domain: op.version for op in model.opset_import}[""] == DEFAULT_OPSET
    (image_input,) = model.graph.input
    tensor = image_input.type.tensor_type
    assert image_input.name == "images" and tensor.elem_type == onnx.TensorProto.UINT8
    dims = [d.dim_param or d.dim_value for d in tensor.shape.dim]
    assert isinstance(dims[0], str) and dims[0] and dims[1:] == [32, 32, 3]
    assert [out.name for out in model.graph.output] == ["logits", "probabilities"]


def test_onnx_file_is_usable_alone(onnx_path, torch_reference):
    """Plain ONNX Runtime plus the file's metadata: class names and probabilities, no package."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    classes = json.loads(meta["classes"])
    assert classes == list(CLASSES)
    assert meta["model"] == "googlenet" and json.loads(meta["options"]) == OPTIONS
    assert json.loads(meta["mean"]) == pytest.approx(MEAN)
    assert json.loads(meta["std"]) == pytest.approx(STD)
    assert "uint8 (N, 32, 32, 3)" in meta["input"] and "NHWC" in meta["input"]
    metrics = json.loads(meta["metrics"])
    assert metrics["test_top1"] == 0.8125 and metrics["val_acc"] == 0.25
    assert json.loads(meta["params"]) == sum(
        p.numel() for p in create_model("googlenet", **OPTIONS).parameters())

    images = generated_images(5)
    logits, probs = session.run(None, {"images": images})
    expected = torch_reference(images)
    np.testing.assert_allclose(logits, expected, atol=1e-4)
    np.testing.assert_allclose(probs, torch.softmax(torch.from_numpy(expected), 1).numpy(),
                               atol=1e-5)


def test_onnx_classifier_has_the_torch_classifier_interface(onnx_path, run_dir):
    onnx_clf = load_classifier(onnx_path)
    torch_clf = TorchClassifier.from_path(run_dir, device="cpu")
    assert isinstance(onnx_clf, OnnxClassifier)
    assert onnx_clf.classes == torch_clf.classes == CLASSES
    assert onnx_clf.model_name == torch_clf.model_name == "googlenet"
    assert set(onnx_clf.info) == set(torch_clf.info)
    assert onnx_clf.info["params"] == torch_clf.info["params"]
    assert onnx_clf.info["format"] == "onnx"
    images = generated_images(3, seed=9)
    np.testing.assert_allclose(onnx_clf.predict_proba(images), torch_clf.predict_proba(images),
                               atol=1e-5)
    assert onnx_clf.predict_proba(images[0]).shape == (1, 10)  # one image, no batch axis
    with pytest.raises(CifarInceptionError, match="uint8 images of shape"):
        onnx_clf.predict_proba(images.astype(np.float32))


def test_onnx_prediction_runs_without_torch(onnx_path, tmp_path):
    image = tmp_path / "x.png"
    from PIL import Image

    Image.fromarray(generated_images(1)[0]).save(image)
    script = (
        "import sys\n"
        "from cifar_inception.predict import load_classifier, predict_files\n"
        f"clf = load_classifier({str(onnx_path)!r})\n"
        f"(result,) = predict_files(clf, [{str(image)!r}])\n"
        "assert result.ok and len(result.top) == 5, result\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('ok', result.top[0][0])\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok ")


class TinyNet(torch.nn.Module):
    """Conv, batch norm, pooling, linear: the layer kinds of the real networks, at toy size.

    The torch formats are checked on it: tracing and torch.export of a full GoogLeNet cost
    tens of seconds on a small CPU, and ONNX parity above already covers GoogLeNet itself.
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8),
            torch.nn.ReLU(), torch.nn.MaxPool2d(2))
        self.head = torch.nn.Linear(8, num_classes)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


if TINY not in list_models():
    register_model(TINY)(lambda num_classes=10: TinyNet(num_classes))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    torch.manual_seed(0)
    model = TinyNet()
    with torch.no_grad():  # non-trivial batch-norm statistics, so normalisation shows
        model.features[1].running_mean.uniform_(-1, 1)
        model.features[1].running_var.uniform_(0.5, 2)
    folder = tmp_path_factory.mktemp("tiny")
    ckpt_mod.save_checkpoint(folder / "best.pt", ckpt_mod.make_checkpoint(
        model_name=TINY, model_options={}, num_classes=10, classes=list(CLASSES),
        mean=MEAN, std=STD, state_dict=model.state_dict()))
    return folder, model.eval()


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("fmt", ["pt2", "torchscript"])
def test_cli_exports_torch_formats_that_reproduce_the_model(tiny_run, fmt, capsys):
    folder, model = tiny_run
    assert main(["export", str(folder), "--format", fmt]) == 0
    path = default_output(folder / "best.pt", fmt)
    printed = capsys.readouterr().out
    assert f"wrote {path}" in printed and TINY in printed and "checked against" in printed
    extra = {METADATA_FILE: ""}
    if fmt == "pt2":
        module = torch.export.load(path, extra_files=extra).module()
    else:
        module = torch.jit.load(path, _extra_files=extra)
    meta = json.loads(extra[METADATA_FILE])
    assert meta["classes"] == list(CLASSES) and meta["mean"] == pytest.approx(MEAN)
    assert meta["model"] == TINY and meta["params"] == sum(p.numel() for p in model.parameters())
    for batch in (1, 7):
        images = torch.from_numpy(generated_images(batch, seed=batch))
        with torch.inference_mode():
            logits, probs = module(images)
            expected = model(normalize(images, MEAN, STD))
        np.testing.assert_allclose(logits.numpy(), expected.numpy(), atol=1e-5)
        np.testing.assert_allclose(probs.sum(1).numpy(), 1.0, atol=1e-5)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
def test_cli_export_never_replaces_a_device_or_fifo(tiny_run, tmp_path, capsys):
    """As root, `-o /dev/null` renamed a file over the device; a FIFO stands in for it."""
    import os
    import stat

    fifo = tmp_path / "null"
    os.mkfifo(fifo)
    assert main(["export", str(tiny_run[0]), "--format", "torchscript", "-o", str(fifo)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a regular file" in err
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and os.listdir(tmp_path) == ["null"]


def test_export_refuses_bad_requests(run_dir, tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        export_onnx(tmp_path / "missing.pt")
    with pytest.raises(CifarInceptionError, match="refusing to overwrite the checkpoint"):
        export_model(run_dir, run_dir / "best.pt", fmt="onnx")
    for name in ("last.pt", "config.json", "metrics.jsonl"):  # the run could not resume
        with pytest.raises(CifarInceptionError, match=f"{name} is a run folder's own file"):
            export_model(run_dir, tmp_path / name, fmt="torchscript")
    with pytest.raises(CifarInceptionError, match="opset must be from 18"):
        export_onnx(run_dir, tmp_path / "old.onnx", opset=11)
    with pytest.raises(CifarInceptionError, match="unknown export format"):
        export_model(run_dir, fmt="tflite")
    assert not list(tmp_path.iterdir())


def test_onnx_classifier_refuses_foreign_and_corrupt_files(onnx_path, tmp_path):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a protobuf at all")
    with pytest.raises(CheckpointError, match="not a readable ONNX model"):
        OnnxClassifier(garbage)
    foreign = onnx.load(onnx_path)
    del foreign.metadata_props[:]
    onnx.save(foreign, tmp_path / "foreign.onnx")
    with pytest.raises(CheckpointError, match="not an ONNX file exported by cifar-inception"):
        OnnxClassifier(tmp_path / "foreign.onnx")
    lying = onnx.load(onnx_path)
    for entry in lying.metadata_props:
        if entry.key == "classes":
            entry.value = json.dumps(["cat", "dog"])
    onnx.save(lying, tmp_path / "lying.onnx")
    with pytest.raises(CheckpointError, match="10 outputs but its metadata names 2 classes"):
        OnnxClassifier(tmp_path / "lying.onnx")
    with pytest.raises(CheckpointError, match="no such ONNX file"):
        OnnxClassifier(tmp_path / "missing.onnx")


def test_cli_export_reports_errors_in_one_line(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nothing"), "-o", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cifar-inception: error:") and "no such checkpoint" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.onnx").exists()


def test_test_accuracy_comes_from_the_eval_json_of_the_same_checkpoint(tmp_path):
    checkpoint = tmp_path / "best.pt"
    (tmp_path / "eval.json").write_text(json.dumps(
        {"test_top1": 0.5, "test_top5": 0.9, "checkpoint": "runs/x/best.pt"}))
    assert run_test_metrics(checkpoint) == {"test_top1": 0.5, "test_top5": 0.9}
    (tmp_path / "eval.json").write_text(json.dumps({"test_top1": 0.5, "checkpoint": "last.pt"}))
    assert run_test_metrics(checkpoint) == {}
    (tmp_path / "eval.json").write_text("{torn")
    assert run_test_metrics(checkpoint) == {}


def test_onnx_export_is_one_self_contained_file(onnx_path):
    """The weights are inside the .onnx file: no external-data file to carry beside it."""
    model = onnx.load_model_from_string(onnx_path.read_bytes())
    assert model.graph.initializer
    assert not any(init.data_location == onnx.TensorProto.EXTERNAL
                   for init in model.graph.initializer)
    assert [p.name for p in onnx_path.parent.iterdir() if p.name.startswith("model")] == [
        "model.onnx"]


def foreign_interface_onnx(path, onnx_path, *, elem_type, shape):
    """A model with the export's names and metadata but another input signature."""
    from onnx import TensorProto, helper, numpy_helper

    layout = "NCHW" if shape[1] == 3 else "NHWC"
    nodes = [helper.make_node("Cast", ["images"], ["x"], to=TensorProto.FLOAT)]
    if layout == "NHWC":
        nodes.append(helper.make_node("Transpose", ["x"], ["x_nchw"], perm=[0, 3, 1, 2]))
    nodes += [helper.make_node("GlobalAveragePool", [nodes[-1].output[0]], ["pooled"]),
              helper.make_node("Flatten", ["pooled"], ["flat"]),
              helper.make_node("MatMul", ["flat", "weights"], ["logits"]),
              helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1)]
    weights = numpy_helper.from_array(np.ones((3, 10), np.float32), "weights")
    graph = helper.make_graph(
        nodes, "foreign", [helper.make_tensor_value_info("images", elem_type, shape)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [shape[0], 10]),
         helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [shape[0], 10])],
        [weights])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for entry in onnx.load(onnx_path).metadata_props:
        model.metadata_props.add(key=entry.key, value=entry.value)
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("elem_type, shape", [
    (onnx.TensorProto.FLOAT, [1, 3, 64, 64]),   # NCHW float, 64x64, fixed batch
    (onnx.TensorProto.UINT8, [1, 32, 32, 3]),   # the right layout, but a fixed batch of 1
    (onnx.TensorProto.FLOAT, ["N", 32, 32, 3]),  # float instead of uint8
])
def test_onnx_with_another_input_signature_is_refused_in_one_line(
        onnx_path, tmp_path, capsys, elem_type, shape):
    from PIL import Image

    path = foreign_interface_onnx(tmp_path / "foreign.onnx", onnx_path, elem_type=elem_type,
                                  shape=shape)
    with pytest.raises(CheckpointError, match=r"not the uint8 \[N, S, S, 3\]"):
        OnnxClassifier(path)
    picture = tmp_path / "picture.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(picture)
    assert main(["predict", str(path), str(picture)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cifar-inception: error: ") and err.count("\n") == 1
    assert "foreign.onnx" in err and "its input is" in err


def handmade_onnx(path, *, metadata, reshape_to=(-1, 10), declared=("N", 10)):
    """A uint8 NHWC model with the export's interface, whose Reshape is ``reshape_to``: a
    shape the image does not fit makes it fail only when run. ``declared``: the outputs'
    shape as the file declares it."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("Cast", ["images"], ["x"], to=TensorProto.FLOAT),
             helper.make_node("Reshape", ["x", "shape"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1)]
    shape = numpy_helper.from_array(np.array(reshape_to, np.int64), "shape")
    graph = helper.make_graph(
        nodes, "handmade",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["N", 32, 32, 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, list(declared)),
         helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, list(declared))],
        [shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    base = {"format": "cifar-inception-export/1", "model": "handmade",
            "classes": json.dumps(list(CLASSES)), "options": "{}", "metrics": "{}",
            "params": "0"}
    for key, value in {**base, **metadata}.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("key, value", [
    ("params", '"ten million"'), ("params", "[1, 2]"), ("metrics", "[0.5]"),
    ("options", '"wide"'), ("params", "true"),
])
def test_onnx_metadata_of_the_wrong_type_is_refused_in_one_line(tmp_path, capsys, key, value):
    path = handmade_onnx(tmp_path / "odd.onnx", metadata={key: value})
    with pytest.raises(CheckpointError, match=f"its metadata '{key}' must be"):
        OnnxClassifier(path)
    assert main(["serve", str(path), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"'{key}' must be" in err


def test_an_onnx_model_that_fails_when_run_gives_one_line(tmp_path, capsys):
    from PIL import Image

    path = handmade_onnx(tmp_path / "broken.onnx", metadata={}, reshape_to=(-1, 7))
    classifier = OnnxClassifier(path)  # the interface is right: it loads
    with pytest.raises(CheckpointError, match="the model fails when run"):
        classifier.predict_proba(np.zeros((1, 32, 32, 3), np.uint8))
    picture = tmp_path / "picture.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(picture)
    assert main(["predict", str(path), str(picture)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "fails when run" in err


def test_onnx_metadata_nested_past_the_parser_is_refused_in_one_line(tmp_path, capsys):
    deep = "[" * 100_000 + "]" * 100_000  # exhausts json's recursion: RecursionError
    path = handmade_onnx(tmp_path / "deep.onnx", metadata={"options": deep})
    with pytest.raises(CheckpointError, match="its metadata 'options' is not valid JSON"):
        OnnxClassifier(path)
    huge = handmade_onnx(tmp_path / "huge.onnx", metadata={"options": " " * (2 << 20) + "{}"})
    with pytest.raises(CheckpointError, match="its metadata 'options' is over"):
        OnnxClassifier(huge)


def test_onnx_outputs_of_another_shape_are_refused_in_one_line(tmp_path, capsys):
    from PIL import Image

    scalar = handmade_onnx(tmp_path / "scalar.onnx", metadata={}, declared=())
    with pytest.raises(CheckpointError, match="has the shape .*, not \\[N, classes\\]"):
        OnnxClassifier(scalar)
    # Declared (N, 10), but the graph answers (N, 3072) when run.
    wide = handmade_onnx(tmp_path / "wide.onnx", metadata={}, reshape_to=(-1, 32 * 32 * 3))
    picture = tmp_path / "picture.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(picture)
    assert main(["predict", str(wide), str(picture)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "answers 1 images with an array of shape (1, 3072), not (1, 10)" in err
