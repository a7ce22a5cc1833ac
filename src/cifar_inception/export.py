"""Export a trained model as one self-contained file: ONNX, ``torch.export`` (.pt2) or TorchScript.

Every exported file takes raw pixels and carries what is needed to use it alone::

    input   images         uint8 (N, S, S, 3): RGB, 0-255, channels last (NHWC), S the
                           image size the model was trained on (32 unless
                           ``train --image-size`` said otherwise); the normalisation of
                           the checkpoint is done inside the graph
    output  logits         float32 (N, num_classes)
            probabilities  float32 (N, num_classes), the softmax of the logits

The batch dimension is dynamic; the image size is fixed. The class names, the normalisation
(mean and std on the 0-1 scale), the image size, the model name and options, the parameter
count and the known metrics travel with
the file: as ``metadata_props`` in ONNX, and as an extra file ``cifar_inception.json`` in
``.pt2`` and TorchScript archives.

:class:`OnnxClassifier` (from :mod:`cifar_inception.inference`) runs an exported ONNX file
with ONNX Runtime alone (no PyTorch), with the same interface as
:class:`cifar_inception.inference.TorchClassifier`. This module imports torch only inside the
export functions.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cifar_inception import __version__
from cifar_inception.errors import CifarInceptionError, needs_extra
from cifar_inception.fileio import atomic_write_bytes, to_json
from cifar_inception.inference import (  # noqa: F401  (re-exported: part of this API)
    EXPORT_FORMAT,
    INPUT_NAME,
    INPUT_TYPE,
    JSON_KEYS,
    OUTPUT_NAMES,
    OnnxClassifier,
    checkpoint_test_metrics,
    input_shape,
    read_onnx_metadata,
    run_test_metrics,
)
from cifar_inception.runs import RUN_FILES

METADATA_FILE = "cifar_inception.json"  # the extra file in .pt2 and TorchScript archives
MIN_OPSET = 18
DEFAULT_OPSET = 20  # current, and run by ONNX Runtime 1.18 and later
OUTPUT_DOC = ("logits: float32 (N, num_classes); "
              "probabilities: float32 (N, num_classes), softmax of the logits")

FORMATS = ("onnx", "pt2", "torchscript")
SUFFIXES = {"onnx": ".onnx", "pt2": ".pt2", "torchscript": ".torchscript.pt"}

# Batch of the example input. torch.export specialises on sizes 0 and 1, so the example
# batch must be larger for the batch dimension to stay dynamic.
_EXAMPLE_BATCH = 2
# Exported and eager outputs on random images must agree this well, or the export fails.
_CHECK_TOLERANCE = 1e-3


@dataclass
class ExportResult:
    """What :func:`export_model` wrote, and how closely the file reproduces PyTorch."""

    path: Path
    format: str
    num_bytes: int
    max_abs_diff: float  # logits, exported file vs eager PyTorch, on random images
    metadata: dict[str, Any]
    opset: int | None = None  # ONNX only


def input_doc(image_size: int) -> str:
    """The input, described for the file's metadata and doc string."""
    return (f"images: uint8 (N, {image_size}, {image_size}, 3), RGB, 0-255, channels last "
            "(NHWC); normalised inside the graph")


# ---------------------------------------------------------------------------------------------
# Export (imports torch)


def _wrapper(model, mean, std):
    """The model with its preprocessing: uint8 NHWC in, (logits, probabilities) out."""
    import torch

    from cifar_inception.augment import normalize

    class ExportedClassifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, images):
            # The very function training and prediction use, so the file cannot drift from them.
            logits = self.model(normalize(images, mean, std))
            return logits, torch.softmax(logits, dim=1)

    return ExportedClassifier().eval()


def export_metadata(ckpt: dict, model, *, source: Path) -> dict[str, Any]:
    """Everything a user of the exported file needs, JSON-safe."""
    import torch

    from cifar_inception.checkpoint import image_size_of

    metrics = dict(ckpt.get("metrics") or {})
    metrics.update(run_test_metrics(source))
    image_size = image_size_of(ckpt)
    return {
        "format": EXPORT_FORMAT,
        "model": ckpt["model"]["name"],
        "options": ckpt["model"]["options"],
        "num_classes": ckpt["model"]["num_classes"],
        "classes": ckpt["data"]["classes"],
        "dataset": ckpt["data"].get("dataset", "cifar10"),
        "mean": ckpt["data"]["mean"],
        "std": ckpt["data"]["std"],
        "image_size": image_size,
        "params": sum(p.numel() for p in model.parameters()),
        "metrics": metrics,
        "input": input_doc(image_size),
        "outputs": OUTPUT_DOC,
        "exported_by": f"cifar-inception {__version__}, torch {torch.__version__}",
        "checkpoint": source.name,
    }


def default_output(checkpoint: Path, fmt: str) -> Path:
    """best.pt -> best.onnx / best.pt2 / best.torchscript.pt, beside the checkpoint."""
    return checkpoint.with_name(checkpoint.stem + SUFFIXES[fmt])


@contextmanager
def _quiet_exporters():
    """Silence the exporters' chatter (deprecations inside torch, optional-package notices)."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", message=".*torch.tensor results are registered")
            yield
    finally:
        logger.setLevel(level)


def _check_opset(opset: int) -> None:
    import onnx

    # The exporter writes opset 18 and later natively; older ones go through a lossy converter.
    if not MIN_OPSET <= opset <= onnx.defs.onnx_opset_version():
        raise CifarInceptionError(f"opset must be from {MIN_OPSET} to "
                                  f"{onnx.defs.onnx_opset_version()}, not {opset}")


def _to_onnx(wrapper, example, metadata: dict, opset: int) -> tuple[bytes, Callable]:
    import onnx
    import torch

    with _quiet_exporters():
        program = torch.onnx.export(
            wrapper, (example,), dynamo=True, opset_version=opset,
            input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
            dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False,
        )
    proto = program.model_proto
    proto.doc_string = (f"cifar-inception {metadata['model']} on {metadata['dataset']} "
                        f"({metadata['num_classes']} classes). "
                        f"Input {metadata['input']}. Outputs {OUTPUT_DOC}.")
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key = key
        entry.value = to_json(value) if key in JSON_KEYS else str(value)
    onnx.checker.check_model(proto)
    data = proto.SerializeToString()

    def run(images):
        import onnxruntime as ort

        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        return session.run([OUTPUT_NAMES[0]], {INPUT_NAME: images.numpy()})[0]

    return data, run


def _to_pt2(wrapper, example, metadata: dict) -> tuple[bytes, Callable]:
    import torch

    with _quiet_exporters():
        program = torch.export.export(
            wrapper, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={METADATA_FILE: to_json(metadata)})
    data = buffer.getvalue()

    def run(images):
        loaded = torch.export.load(io.BytesIO(data)).module()
        return loaded(images)[0].numpy()

    return data, run


def _to_torchscript(wrapper, example, metadata: dict) -> tuple[bytes, Callable]:
    import torch

    # TorchScript is deprecated upstream in favour of torch.export; it is kept for LibTorch
    # (C++) users. Tracing is exact here: the networks have no data-dependent control flow.
    with _quiet_exporters():
        traced = torch.jit.trace(wrapper, example, check_trace=False)  # checked below, once
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer, _extra_files={METADATA_FILE: to_json(metadata)})
    data = buffer.getvalue()

    def run(images):
        with _quiet_exporters():
            loaded = torch.jit.load(io.BytesIO(data))
        return loaded(images)[0].numpy()

    return data, run


def export_model(checkpoint_path: str | os.PathLike, out_path: str | os.PathLike | None = None,
                 *, fmt: str = "onnx", opset: int = DEFAULT_OPSET) -> ExportResult:
    """Export a checkpoint (or run folder) as ``fmt``; check it against PyTorch; write atomically.

    The check runs the exported file and the eager model on random images and refuses to
    write a file whose logits differ by more than 1e-3.
    """
    import torch

    from cifar_inception.checkpoint import load_trained_model, resolve_checkpoint

    if fmt not in FORMATS:
        raise CifarInceptionError(
            f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    if fmt == "onnx":
        with needs_extra("export", "ONNX export"):
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401  (runs the file to check it)
            import onnxscript  # noqa: F401  (torch's ONNX exporter)
        _check_opset(opset)
    source = resolve_checkpoint(checkpoint_path)
    out = Path(out_path) if out_path is not None else default_output(source, fmt)
    if out.exists() and out.resolve() == source.resolve():
        raise CifarInceptionError(f"{out}: refusing to overwrite the checkpoint being exported")
    if out.name in RUN_FILES:  # e.g. -o RUN/last.pt: the run could no longer be resumed
        raise CifarInceptionError(f"{out}: {out.name} is a run folder's own file name; give "
                                  "the export another name")
    if out.is_dir():
        raise CifarInceptionError(f"{out}: is a folder; give the output file name")

    model, ckpt = load_trained_model(source)
    metadata = export_metadata(ckpt, model, source=source)
    wrapper = _wrapper(model, ckpt["data"]["mean"], ckpt["data"]["std"])
    generator = torch.Generator().manual_seed(0)
    shape = input_shape(metadata["image_size"])  # the graph's input takes this size only
    example = torch.randint(0, 256, (_EXAMPLE_BATCH, *shape), dtype=torch.uint8,
                            generator=generator)
    if fmt == "onnx":
        data, run = _to_onnx(wrapper, example, metadata, opset)
    elif fmt == "pt2":
        data, run = _to_pt2(wrapper, example, metadata)
    else:
        data, run = _to_torchscript(wrapper, example, metadata)

    # A batch size other than the example's proves the batch dimension stayed dynamic.
    check = torch.randint(0, 256, (_EXAMPLE_BATCH + 1, *shape), dtype=torch.uint8,
                          generator=generator)
    with torch.inference_mode():
        expected = wrapper(check)[0].numpy()
    with torch.inference_mode():
        got = run(check)
    diff = float(np.max(np.abs(got - expected)))
    if not diff <= _CHECK_TOLERANCE:  # also catches NaN
        raise CifarInceptionError(
            f"{fmt} export of {metadata['model']} does not reproduce PyTorch "
            f"(max logit difference {diff:.3g}); nothing written")
    try:
        atomic_write_bytes(out, data)
    except OSError as exc:
        raise CifarInceptionError(f"{out}: cannot write ({exc.strerror or exc})") from None
    return ExportResult(path=out, format=fmt, num_bytes=len(data), max_abs_diff=diff,
                        metadata=metadata, opset=opset if fmt == "onnx" else None)


def export_onnx(checkpoint_path: str | os.PathLike, out_path: str | os.PathLike | None = None,
                *, opset: int = DEFAULT_OPSET) -> ExportResult:
    """ONNX with a dynamic batch dimension and the metadata above (``metadata_props``)."""
    return export_model(checkpoint_path, out_path, fmt="onnx", opset=opset)


def export_pt2(checkpoint_path: str | os.PathLike,
               out_path: str | os.PathLike | None = None) -> ExportResult:
    """A ``torch.export`` program (``torch.export.load(path).module()``), dynamic batch."""
    return export_model(checkpoint_path, out_path, fmt="pt2")


def export_torchscript(checkpoint_path: str | os.PathLike,
                       out_path: str | os.PathLike | None = None) -> ExportResult:
    """A traced TorchScript module (``torch.jit.load(path)``), for LibTorch."""
    return export_model(checkpoint_path, out_path, fmt="torchscript")
