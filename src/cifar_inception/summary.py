"""Keras-style layer tables, parameter counts and multiply-add counts.

``summarize`` runs one forward pass with hooks on every *layer*: a module without
children, or a block that asks to be shown whole (``summary_leaf = True``, as ``ConvBNAct``
does). Each hook records the layer's output shape and parameter count, and which layers
produced its inputs (by the identity of the tensors it received): the "Connected to"
column. The pass runs with every auxiliary head active but every layer in eval mode
(no dropout, batch-norm running statistics), so the table lists all the parameters.

``count_macs`` counts the multiply-adds of convolutions and linear layers for one image
(32x32 unless told) in eval mode (auxiliary heads off: the cost of inference). Pooling, batch norm and
activations are not counted; they are a small fraction and conventions for them differ.

Everything here works on models built on the ``meta`` device (no memory, no arithmetic),
which is how ``model_table`` sizes every registered model in well under a second.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn

from cifar_inception.models import create_model, list_models
from cifar_inception.models.registry import model_purpose

INPUT_SIZE = (1, 3, 32, 32)
UNKNOWN_SOURCE = "?"


@dataclass(frozen=True)
class LayerRow:
    """One line of the summary table."""

    name: str
    type: str
    output_shape: tuple
    params: int
    connected_to: tuple[str, ...]


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (buffers such as batch-norm running statistics excluded)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def layers(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """(qualified name, module) of every layer, in registration order."""
    for name, child in model.named_children():
        qualified = f"{prefix}{name}"
        if getattr(child, "summary_leaf", False) or not any(True for _ in child.children()):
            yield qualified, child
        else:
            yield from layers(child, qualified + ".")


def summarize(model: nn.Module, input_size: tuple[int, ...] = INPUT_SIZE) -> list[LayerRow]:
    """Run one forward pass and return a row per layer, in the order the layers ran.

    The first row is the input. A layer that runs twice gets two rows.
    """
    inputs = _dummy_input(model, input_size)
    rows = [LayerRow("input", "Input", tuple(input_size), 0, ())]
    producer = {id(inputs): "input"}
    alive = [inputs]  # keeps every recorded tensor alive, so no id() is reused mid-pass

    def record(name: str):
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            sources = [producer.get(id(t), UNKNOWN_SOURCE) for t in _tensors(args)]
            outputs = _tensors(output)
            for tensor in outputs:
                producer[id(tensor)] = name
            alive.extend(outputs)
            shape = (tuple(outputs[0].shape) if len(outputs) == 1
                     else tuple(tuple(t.shape) for t in outputs))
            rows.append(LayerRow(name, type(module).__name__, shape,
                                 count_parameters(module), tuple(dict.fromkeys(sources))))
        return hook

    handles = [module.register_forward_hook(record(name)) for name, module in layers(model)]
    try:
        with torch.no_grad(), _every_head_runs(model):
            model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    return rows


def format_summary(model: nn.Module, input_size: tuple[int, ...] = INPUT_SIZE,
                   name: str | None = None) -> str:
    """The Keras-style table: layer (type), output shape, param #, connected to; totals."""
    rows = summarize(model, input_size)
    header = ("Layer (type)", "Output Shape", "Param #", "Connected to")
    cells = [(f"{row.name} ({row.type})", _format_shape(row.output_shape), f"{row.params:,}",
              list(row.connected_to) or [""]) for row in rows]
    widths = [max(len(header[i]), *(len(c[i]) for c in cells)) for i in range(3)]
    widths.append(max(len(header[3]), *(len(s) for c in cells for s in c[3])))
    line_width = sum(widths) + 2 * 3

    def line(layer: str, shape: str, params: str, source: str) -> str:
        return (f"{layer:<{widths[0]}}  {shape:<{widths[1]}}  {params:>{widths[2]}}  "
                f"{source}").rstrip()

    out = [f'Model: "{name or type(model).__name__}"', "_" * line_width, line(*header),
           "=" * line_width]
    for layer, shape, params, sources in cells:
        out.append(line(layer, shape, params, sources[0]))
        out.extend(line("", "", "", source) for source in sources[1:])
    total = count_parameters(model)
    trainable = count_parameters(model, trainable_only=True)
    out += ["=" * line_width,
            f"Total params: {total:,}",
            f"Trainable params: {trainable:,}",
            f"Non-trainable params: {total - trainable:,}"]
    return "\n".join(out)


def count_macs(model: nn.Module, image_size: int = INPUT_SIZE[-1]) -> int:
    """Multiply-adds of the convolutions and linear layers for one image of
    ``image_size`` x ``image_size`` (default 32), eval mode."""
    total = 0

    def conv_hook(module: nn.Conv2d, args: tuple, output: torch.Tensor) -> None:
        nonlocal total
        kernel = module.kernel_size[0] * module.kernel_size[1]
        total += output.numel() * (module.in_channels // module.groups) * kernel

    def linear_hook(module: nn.Linear, args: tuple, output: torch.Tensor) -> None:
        nonlocal total
        total += output.numel() * module.in_features

    handles = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(linear_hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(_dummy_input(model, (1, 3, image_size, image_size)))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return total


def build_on_meta(name: str, **options) -> nn.Module:
    """Build a registered model on the meta device: shapes only, no memory, instant."""
    with torch.device("meta"):
        return create_model(name, **options)


def model_table(names: list[str] | None = None) -> list[dict]:
    """name, params, macs (per 32x32 image) and purpose of each model, default options."""
    table = []
    for name in names or list_models():
        model = build_on_meta(name)
        table.append({"name": name, "params": count_parameters(model),
                      "macs": count_macs(model), "purpose": model_purpose(name)})
    return table


@contextmanager
def _every_head_runs(model: nn.Module) -> Iterator[None]:
    """Every layer in eval mode, the network itself in train mode (so its heads run).

    ``InceptionNet`` runs its auxiliary heads when it is itself in train mode; its layers'
    own flags decide dropout and batch-norm behaviour. All flags are restored afterwards.
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    model.training = True
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _dummy_input(model: nn.Module, input_size: tuple[int, ...]) -> torch.Tensor:
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    return torch.zeros(input_size, device=device, dtype=dtype)


def _tensors(value: object) -> list[torch.Tensor]:
    """Every tensor in a (possibly nested) tuple or list, in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _tensors(item)]
    return []


def _format_shape(shape: tuple) -> str:
    if shape and isinstance(shape[0], tuple):
        return ", ".join(str(s) for s in shape)
    return str(shape)
