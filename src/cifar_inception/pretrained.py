"""Trained weights: the ones shipped in the package, and any from a path or a URL.

The package ships a few trained networks (``weights/`` beside this module), each described by
an entry of ``weights/manifest.json``: the model and options it fits, the file and its
SHA-256, and the record of how it was made (recipe and command, epochs, training time, CPU,
torch version, data, test accuracy with and without test-time augmentation). The files are
checkpoints of the project's own format (half-precision weights, the class names, mean and
std), so prediction with them normalises as training did and runs the model in eval mode.

One spelling selects weights everywhere, the ``--weights`` option of every command and the
``weights=`` argument of :func:`~cifar_inception.models.create_model`::

    googlenet-w0.25.cifar10      a shipped entry, by its full name
    cifar10, default             with a model name: that model's shipped entry
    default                      alone: the package's default entry
    path/to/best.pt              a checkpoint or run folder of your own
    https://host/x.pt#sha256=HEX a checkpoint downloaded once into the cache, its hash checked

A shipped file's hash is checked before it is loaded, and every file is loaded with
``torch.load(weights_only=True)`` (:mod:`cifar_inception.checkpoint`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cifar_inception.errors import CheckpointError

WEIGHTS_FOLDER = Path(__file__).resolve().parent / "weights"  # package data
MANIFEST = "manifest.json"
DEFAULT = "default"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".onnx")
WEIGHTS_CACHE = "weights"  # below the user cache folder: weights downloaded from a URL
# The most a weights URL may bring: a checkpoint of the largest model a checkpoint may hold
# (a billion float32 weights) with room for its record.
MAX_WEIGHTS_DOWNLOAD_BYTES = 4 << 30
_URL_WITH_HASH = re.compile(r"(https?://[^#\s]+)#sha256=([0-9a-f]{64})", re.IGNORECASE)

__all__ = ["Weights", "list_weights", "get_weights", "default_weights", "resolve_weights",
           "weights_path", "sha256_of"]


@dataclass(frozen=True)
class Weights:
    """One shipped set of weights and what is known of it."""

    name: str                    # e.g. "googlenet-w0.25.cifar10"
    model: str                   # the registered model they fit
    options: dict[str, Any]      # the model options they fit, e.g. {"width": 0.25}
    tag: str                     # what they were trained on: "cifar10"
    file: str                    # the file's name in the package's weights/ folder
    sha256: str
    default: bool = False        # the package's default (predict and serve with no model)
    record: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def test_acc(self) -> float | None:
        return self.record.get("test_acc")

    @property
    def test_acc_tta(self) -> float | None:
        return self.record.get("test_acc_tta")

    def path(self) -> Path:
        """The package's file, its SHA-256 checked against the manifest."""
        path = WEIGHTS_FOLDER / self.file
        if not path.is_file():
            raise CheckpointError(f"weights {self.name}: the package has no file {self.file} "
                                  "(a broken install? reinstall cifar-inception)")
        found = sha256_of(path)
        if found != self.sha256:
            raise CheckpointError(f"weights {self.name}: {path} has SHA-256 {found[:16]}..., "
                                  f"not {self.sha256[:16]}...: the file is damaged or replaced; "
                                  "reinstall cifar-inception")
        return path


def _shipped() -> tuple[Weights, ...]:
    """The manifest's entries, in its order (a small file, read when asked)."""
    try:
        entries = json.loads((WEIGHTS_FOLDER / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return ()
    return tuple(Weights(**entry) for entry in entries["weights"])


def list_weights(model: str | None = None) -> list[str]:
    """The names of the shipped weights (of ``model`` only, when given)."""
    return [w.name for w in _shipped() if model is None or w.model == model]


def default_weights() -> Weights:
    """The package's default weights: those predict and serve use when given no model."""
    for weights in _shipped():
        if weights.default:
            return weights
    raise CheckpointError("this install ships no trained weights; train a model first "
                          "(cifar-inception train) and pass its run folder")


def get_weights(name: str, *, model: str | None = None,
                options: dict[str, Any] | None = None) -> Weights:
    """A shipped entry by full name, or by tag (``cifar10``, ``default``) for ``model``.

    With ``options``, the entry must fit them: ``width=0.5`` does not get weights of width 0.25.
    """
    if model is None:
        if name == DEFAULT:
            return default_weights()
        found = [w for w in _shipped() if w.name == name]
    else:  # a model's default is the first entry the manifest lists for it
        found = [w for w in _shipped() if w.model == model and _fits(w, options or {})
                 and name in (w.name, w.tag, DEFAULT)]
    if not found:
        raise CheckpointError(_unknown_message(name, model, options))
    return found[0]


def _fits(weights: Weights, options: dict[str, Any]) -> bool:
    return all(weights.options.get(key, value) == value for key, value in options.items())


def _unknown_message(name: str, model: str | None, options: dict[str, Any] | None) -> str:
    known = ", ".join(list_weights()) or "none"
    what = f"for model '{model}'" + (f" with options {options}" if options else "") \
        if model else "shipped"
    return (f"no weights '{name}' {what}; the shipped weights: {known} (or give a checkpoint "
            "path, or a URL ending in #sha256=HEX)")


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_weights(spec: str, *, model: str | None = None,
                    options: dict[str, Any] | None = None,
                    progress: bool = True) -> tuple[Path, Weights | None]:
    """Where the weights ``spec`` names are, as a checked local file, and the shipped entry
    when they are shipped ones (None for a path or URL)."""
    if not isinstance(spec, str) or not spec:
        raise CheckpointError(f"weights must be a name, a path or a URL, not {spec!r}")
    if spec.lower().startswith(("http://", "https://")):
        return _download(spec, progress=progress), None
    if _names_shipped(spec, model):
        weights = get_weights(spec, model=model, options=options)
        return weights.path(), weights
    local = Path(spec).expanduser()
    if local.exists() or os.sep in spec or local.suffix.lower() in CHECKPOINT_SUFFIXES:
        return local, None
    raise CheckpointError(_unknown_message(spec, model, options))


def _names_shipped(spec: str, model: str | None) -> bool:
    """Whether ``spec`` is a shipped entry's name, or a tag (or ``default``) for ``model``."""
    return spec == DEFAULT or any(
        spec == w.name or (model == w.model and spec == w.tag) for w in _shipped())


def weights_path(spec: str, **kwargs: Any) -> Path:
    """:func:`resolve_weights` without the entry."""
    return resolve_weights(spec, **kwargs)[0]


def _download(spec: str, *, progress: bool) -> Path:
    """A URL's file in the cache, downloaded once through the data download's code path
    (a temporary name, the hash checked, then a rename)."""
    from cifar_inception.data.cache import cache_dir
    from cifar_inception.data.download import fetch_file

    match = _URL_WITH_HASH.fullmatch(spec)
    if match is None:
        raise CheckpointError(f"a weights URL must end in #sha256=HEX (64 hex digits), so that "
                              f"the file can be checked: {spec}")
    url, digest = match.group(1), match.group(2).lower()
    name = f"{digest[:16]}-{_file_name(url)}"
    return fetch_file(url, cache_dir() / WEIGHTS_CACHE, name=name, known_hash=f"sha256:{digest}",
                      what="weights", progress=progress, max_bytes=MAX_WEIGHTS_DOWNLOAD_BYTES,
                      advice="check the address, or download the file yourself and pass its "
                             "path")


def _file_name(url: str) -> str:
    """A safe file name from the URL's last path part."""
    last = url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", last)[:80].lstrip(".")
    return cleaned or "weights.pt"


def load_checkpoint_for(spec: str, *, model: str | None = None,
                        options: dict[str, Any] | None = None) -> tuple[dict, str]:
    """The checked checkpoint that ``spec`` names, and how to name it in messages."""
    from cifar_inception.checkpoint import check_compatible, load_checkpoint

    path, weights = resolve_weights(spec, model=model, options=options)
    where = f"weights {weights.name}" if weights is not None else str(path)
    ckpt = load_checkpoint(path)
    check_compatible(ckpt, model_name=model, where=where)
    for key, value in (options or {}).items():
        found = ckpt["model"]["options"].get(key, value)
        if found != value:
            raise CheckpointError(f"{where} are for {ckpt['model']['name']} with {key}={found}, "
                                  f"not {key}={value}")
    return ckpt, where


def pretrained_model(model: str, weights: str, *, num_classes: int | None = None,
                     **options: Any):  # noqa: ANN201 (torch is imported lazily)
    """``model`` built with the options its weights were trained with, the weights loaded,
    in eval mode. Options given must agree with the weights'."""
    from cifar_inception.checkpoint import check_compatible, model_from_checkpoint
    from cifar_inception.models.registry import get_builder

    get_builder(model)  # an unknown name fails as such, before any file is read
    ckpt, where = load_checkpoint_for(weights, model=model, options=options)
    check_compatible(ckpt, num_classes=num_classes, where=where)
    return model_from_checkpoint(ckpt, where=where)


@dataclass(frozen=True)
class ModelSource:
    """What a command's model argument or ``--weights`` named: a local checkpoint path (a run
    folder, a .pt or an .onnx file), and the shipped entry or URL it came from, if any."""

    path: Path
    weights: Weights | None = None
    url: str | None = None

    @property
    def is_run(self) -> bool:
        """A file of the user's own (a run's checkpoint), not shipped or downloaded weights."""
        return self.weights is None and self.url is None

    def describe(self) -> str:
        """One line naming the weights, for the first line a command prints."""
        if self.weights is not None:
            w = self.weights
            options = ", ".join(f"{k} {v}" for k, v in w.options.items())
            accuracy = f"; test top-1 {100 * w.test_acc:.2f}%" if w.test_acc is not None else ""
            data = f" ({w.record['data']})" if w.record.get("data") else ""
            return (f"weights {w.name}: {w.model}{', ' + options if options else ''}"
                    f"{accuracy}{data}")
        return f"weights from {self.url} ({self.path})" if self.url else str(self.path)


def model_source(model: str | None, weights: str | None, *,
                 default: bool = False) -> ModelSource:
    """The model a command uses: its positional ``model`` (a run folder or file) or its
    ``--weights``, never both; with neither, the package's default weights when ``default``."""
    if model is not None and weights is not None:
        raise CheckpointError("give a run folder or checkpoint, or --weights, not both")
    if weights is None and model is None:
        if not default:
            raise CheckpointError("give a run folder or checkpoint, or --weights NAME "
                                  f"(shipped: {', '.join(list_weights()) or 'none'})")
        weights = DEFAULT
    if weights is None:
        return ModelSource(Path(model))
    path, entry = resolve_weights(weights)
    url = weights if entry is None and weights.lower().startswith(("http://", "https://")) \
        else None
    return ModelSource(path, entry, url)
