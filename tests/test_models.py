"""The model registry and every registered model: sizes, outputs, training, errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from model_names import project_models

import cifar_inception
from cifar_inception.errors import ModelError
from cifar_inception.models import InceptionOutputs, create_model, list_models
from cifar_inception.models.blocks import scale_width
from cifar_inception.models.registry import (
    model_info,
    model_options,
    model_purpose,
    parse_options,
)

# The report's parameter totals (its Keras tables), and the figure for fix_3x3.
REPORT_PARAMS = {
    ("seed-naive", ()): 232_465_282,
    ("seed-googlenet", ()): 8_390_710,
    ("seed-googlenet", (("fix_3x3", True),)): 11_049_014,
    ("seed-inception-v2", ()): 141_746_134,
}
# Small versions of the tuned models keep the suite fast; the seed models have no width.
FAST_OPTIONS = {"googlenet": {"width": 0.25}, "inception-v3": {"width": 0.25}}
TUNED = ("googlenet", "inception-v3")
# Auxiliary heads of the models this file knows; others must agree with their own weights.
AUX_HEADS = {"seed-naive": 0, "seed-googlenet": 2, "seed-inception-v2": 2,
             "googlenet": 2, "inception-v3": 1}
# The heaviest networks run on fewer images.
BATCH = {"seed-naive": 2, "seed-inception-v2": 2}


@pytest.fixture(scope="module")
def built():
    """Build each (name, options) once per module: the seed networks are large."""
    cache: dict[tuple, nn.Module] = {}

    def get(name: str, **options) -> nn.Module:
        key = (name, tuple(sorted(options.items())))
        if key not in cache:
            torch.manual_seed(0)
            cache[key] = create_model(name, **options)
        return cache[key]

    yield get
    cache.clear()


def fast(built, name: str) -> nn.Module:
    return built(name, **FAST_OPTIONS.get(name, {}))


def batch(name: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    n = BATCH.get(name, 4)
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=generator), torch.arange(n) % 10


def training_loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Main loss plus the weighted auxiliary losses, with the same dropout masks every call."""
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        out = model(images)
    if isinstance(out, InceptionOutputs):
        aux = sum(w * F.cross_entropy(a, labels)
                  for w, a in zip(model.default_aux_weights, out.aux_logits))
        return F.cross_entropy(out.logits, labels) + aux
    return F.cross_entropy(out, labels)


# ------------------------------------------------------------------------------ registry

def test_list_models_names_the_five_models_and_is_public():
    names = cifar_inception.list_models()
    assert names == list_models() == sorted(names)
    assert {"seed-naive", "seed-googlenet", "seed-inception-v2", "googlenet",
            "inception-v3"} <= set(names)


def test_every_model_has_a_one_line_purpose():
    for name in project_models():
        assert len(model_purpose(name)) > 20, name


def test_unknown_model_lists_known_ones():
    with pytest.raises(ModelError) as info:
        create_model("inception-v9")
    message = str(info.value)
    assert "inception-v9" in message
    assert all(name in message for name in list_models())


@pytest.mark.parametrize("name, options, fragment", [
    ("googlenet", {"widht": 0.5}, "no option 'widht'"),
    ("seed-naive", {"aux_logits": False}, "its options: none"),
    ("googlenet", {"width": 0}, "width"),
    ("googlenet", {"width": -1.0}, "width"),
    ("googlenet", {"width": "wide"}, "width"),
    ("inception-v3", {"width": True}, "width"),
    ("inception-v3", {"aux_logits": "yes"}, "aux_logits"),
    ("googlenet", {"dropout": 1.5}, "dropout"),
    ("seed-googlenet", {"fix_3x3": 1}, "fix_3x3"),
])
def test_bad_options_raise_model_error(name, options, fragment):
    with pytest.raises(ModelError, match=fragment):
        create_model(name, **options)


@pytest.mark.parametrize("num_classes", [0, -3, 2.5, True])
def test_bad_num_classes(num_classes):
    with pytest.raises(ModelError, match="num_classes"):
        create_model("googlenet", num_classes=num_classes, width=0.25)


def test_parse_options_types_and_errors():
    assert parse_options(["width=0.5", "fix_3x3=True", "aux-logits=false", "n=3", "s=x"]) == {
        "width": 0.5, "fix_3x3": True, "aux_logits": False, "n": 3, "s": "x"}
    for bad in (["width"], ["=1"], ["a b=1"], ["width=1", "width=2"]):
        with pytest.raises(ModelError):
            parse_options(bad)


def test_model_options_lists_defaults():
    assert model_options("seed-googlenet") == {"fix_3x3": False, "aux_logits": True}
    assert model_options("seed-naive") == {}
    assert set(model_options("googlenet")) >= {"width", "aux_logits"}


# ------------------------------------------------------------------ the report's networks

@pytest.mark.parametrize("key", list(REPORT_PARAMS), ids=lambda k: f"{k[0]}{dict(k[1]) or ''}")
def test_report_parameter_counts_exact(built, key):
    name, options = key
    model = built(name, **dict(options))
    assert sum(p.numel() for p in model.parameters()) == REPORT_PARAMS[key]


def test_seed_googlenet_3x3_quirk(built):
    """The report's "3x3" after the reduce is a 1x1 kernel; fix_3x3 makes it 3x3."""
    quirky = built("seed-googlenet").inception3a.branches[1][1][0]
    fixed = built("seed-googlenet", fix_3x3=True).inception3a.branches[1][1][0]
    assert quirky.kernel_size == (1, 1) and quirky.weight.numel() + 128 == 12_416
    assert fixed.kernel_size == (3, 3)


def test_report_networks_have_no_batch_norm(built):
    for name in ("seed-naive", "seed-googlenet", "seed-inception-v2"):
        model = built(name)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()), name
        assert all(m.bias is not None for m in model.modules() if isinstance(m, nn.Conv2d))


# ---------------------------------------------------------------- every registered model

@pytest.mark.parametrize("name", project_models())
def test_eval_mode_returns_logits(built, name):
    model = fast(built, name).eval()
    images, _ = batch(name)
    with torch.no_grad():
        out = model(images)
    assert isinstance(out, torch.Tensor) and out.shape == (len(images), 10)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", project_models())
def test_train_mode_adds_aux_logits(built, name):
    model = fast(built, name).train()
    images, _ = batch(name)
    with torch.no_grad():
        out = model(images)
    heads = AUX_HEADS.get(name, len(model.default_aux_weights))
    assert len(model.default_aux_weights) == heads
    if heads == 0:
        assert isinstance(out, torch.Tensor) and out.shape == (len(images), 10)
        return
    assert isinstance(out, InceptionOutputs)
    assert out.logits.shape == (len(images), 10)
    assert isinstance(out.aux_logits, tuple) and len(out.aux_logits) == heads
    assert all(a.shape == (len(images), 10) for a in out.aux_logits)


@pytest.mark.parametrize("name", ["seed-googlenet", "googlenet", "inception-v3"])
def test_all_heads_in_eval_mode_match_the_forward_and_the_train_mode_heads(built, name):
    """all_heads: the main head as eval mode's forward gives it, the auxiliary heads as
    train mode runs them (dropout off in both, to compare)."""
    model = copy.deepcopy(fast(built, name)).eval()  # its dropout is changed below
    images, _ = batch(name)
    with torch.no_grad():
        heads = model.all_heads(images)
        assert torch.equal(heads.logits, model(images))
        for module in model.modules():  # train mode without dropout (and frozen BN stats)
            if isinstance(module, nn.Dropout):
                module.p = 0.0
        model.train()
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        trained = model(images)
    assert len(heads.aux_logits) == len(trained.aux_logits) > 0
    for ours, theirs in zip(heads.aux_logits, trained.aux_logits):
        torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("name", project_models())
def test_one_sgd_step_lowers_the_loss(built, name):
    model = fast(built, name).train()
    images, labels = batch(name, seed=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    before = training_loss(model, images, labels)
    optimizer.zero_grad()
    before.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # free the seed networks' large gradients
    with torch.no_grad():
        after = training_loss(model, images, labels)
    assert after.item() < before.item()


def expected_shape_pattern(name: str) -> str:
    """What a model's input error names: (N, 3, 32, 32) for the report's networks, the
    range of sides for the others."""
    sizes = model_info(name).sizes
    if sizes.largest == sizes.smallest:
        return rf"\(N, 3, {sizes.smallest}, {sizes.smallest}\)"
    return rf"\(N, 3, H, W\), H and W from {sizes.smallest} up"


@pytest.mark.parametrize("name", project_models())
def test_wrong_input_shapes_name_the_expected_shape(built, name):
    model = fast(built, name).eval()
    too_small = max(model_info(name).min_size - 1, 0)
    other_size = torch.zeros(1, 3, 28, 28) if model_info(name).max_size == 32 else \
        torch.zeros(1, 3, too_small, too_small)
    for bad in (torch.zeros(3, 32, 32), torch.zeros(1, 1, 32, 32), other_size,
                torch.zeros(1, 3, 32, 32, 1)):
        with pytest.raises(ModelError, match=expected_shape_pattern(name)):
            model(bad)
    with pytest.raises(ModelError, match="float"):
        model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ModelError, match="channels first"):
        model(torch.zeros(2, 32, 32, 3))


def test_report_aux_weights_are_one_and_tuned_are_small(built):
    assert built("seed-googlenet").default_aux_weights == (1.0, 1.0)
    assert built("seed-inception-v2").default_aux_weights == (1.0, 1.0)
    assert fast(built, "googlenet").default_aux_weights == (0.3, 0.3)
    assert fast(built, "inception-v3").default_aux_weights == (0.3,)


@pytest.mark.parametrize("name", ["seed-googlenet", *TUNED])
def test_aux_logits_false_removes_the_heads(built, name):
    with_heads = fast(built, name)
    model = create_model(name, aux_logits=False, **FAST_OPTIONS.get(name, {})).train()
    assert model.default_aux_weights == ()
    assert not any(n.startswith("aux") for n, _ in model.named_children())
    out = model(torch.randn(2, 3, 32, 32))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 10)
    count = sum(p.numel() for p in model.parameters())
    assert count < sum(p.numel() for p in with_heads.parameters())


@pytest.mark.parametrize("name", ["seed-googlenet", "seed-inception-v2", *TUNED])
def test_num_classes(name):
    options = FAST_OPTIONS.get(name, {})
    if name == "seed-inception-v2":
        options = {"aux_logits": False}  # keeps the extra build small enough
    with torch.device("meta"):
        model = create_model(name, num_classes=100, **options).train()
    out = model(torch.zeros(2, 3, 32, 32, device="meta"))
    logits = out.logits if isinstance(out, InceptionOutputs) else out
    assert logits.shape == (2, 100)


def test_meta_build_counts_match_the_real_modules(built):
    for name in ("seed-googlenet", *TUNED):
        options = FAST_OPTIONS.get(name, {})
        with torch.device("meta"):
            meta = create_model(name, **options)
        real = built(name, **options)
        assert [p.shape for p in meta.parameters()] == [p.shape for p in real.parameters()]


# ------------------------------------------------------------------------------ widths

def test_scale_width_rounds_to_multiples_of_eight():
    assert scale_width(192, 1.0) == 192
    assert scale_width(64, 0.25) == 16
    assert scale_width(16, 0.25) == 8   # never below 8
    assert scale_width(24, 0.5) == 16   # 12 rounds half up to 16
    assert scale_width(208, 0.5) == 104
    assert scale_width(96, 2.0) == 192


@pytest.mark.parametrize("name", TUNED)
def test_width_scales_channels_and_parameters(name):
    counts = []
    for width in (0.25, 0.5, 1.0):
        with torch.device("meta"):
            model = create_model(name, width=width)
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        assert all(c.out_channels % 8 == 0 for c in convs)
        counts.append(sum(p.numel() for p in model.parameters()))
    # Parameters grow roughly with the square of the width.
    assert counts[0] < counts[1] < counts[2]
    assert 2.5 < counts[2] / counts[1] < 5.5


@pytest.mark.parametrize("name", TUNED)
def test_full_width_output_shapes(name):
    model = create_model(name).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_cifar_models_keep_resolution_until_two_reductions():
    """No aggressive early downsampling: 32x32 through the stem, then 16 and 8."""
    model = create_model("googlenet", width=0.25).eval()
    sizes = {}
    hooks = [getattr(model, name).register_forward_hook(
        lambda m, a, out, name=name: sizes.__setitem__(name, out.shape[-1]))
        for name in model.stage_names]
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    for hook in hooks:
        hook.remove()
    assert sizes["stem"] == sizes["inception3b"] == 32
    assert sizes["inception4e"] == 16 and sizes["inception5b"] == 8


# --------------------------------------------------- channels_last, bf16 autocast, compile

@pytest.mark.parametrize("name", TUNED)
def test_channels_last_matches_contiguous(name):
    torch.manual_seed(0)
    model = create_model(name, width=0.25).eval()
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = model(images)
        model = model.to(memory_format=torch.channels_last)
        got = model(images.to(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # and it trains
    model.train()
    training_loss(model, images.to(memory_format=torch.channels_last), torch.arange(4)).backward()


@pytest.mark.parametrize("name", TUNED)
def test_bf16_autocast_forward_and_backward(name):
    torch.manual_seed(0)
    model = create_model(name, width=0.25).train()
    images, labels = torch.randn(4, 3, 32, 32), torch.arange(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images)
        loss = F.cross_entropy(out.logits, labels)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


@pytest.mark.slow
def test_torch_compile_matches_eager():
    # the smallest Inception net: compiling a GoogLeNet took minutes of a 2-core CPU's time
    torch.manual_seed(0)
    model = create_model("inception-cpu", width=0.25).eval()
    images = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model)
    with torch.no_grad():
        torch.testing.assert_close(compiled(images), model(images), rtol=1e-3, atol=1e-3)
        # the input check survives compilation
        with pytest.raises(ModelError, match=r"H and W from 9 up"):
            compiled(torch.zeros(2, 3, 8, 8))


@pytest.mark.parametrize("name", project_models())
def test_every_registered_model_follows_the_model_rules(name):
    """The rules of cifar_inception.models.hooks, for every registered model: a builder of
    num_classes and defaulted options with a purpose line, known metadata, a width that
    defaults to 1 where there is one, the logits in eval mode, and one auxiliary output per
    default auxiliary weight in train mode."""
    import inspect

    from cifar_inception.models import hooks
    from cifar_inception.models.registry import can_widen, get_builder
    from cifar_inception.recipes import RECIPES, default_recipe_name

    info = model_info(name)
    assert info.recipe in RECIPES and info.min_size <= 32
    assert info.max_size is None or info.max_size >= 32  # CIFAR's own size, for every model
    assert info.recipe == default_recipe_name(name, cuda=False)
    parameters = inspect.signature(get_builder(name)).parameters
    assert "num_classes" in parameters and model_purpose(name)
    assert all(p.default is not p.empty for p in parameters.values() if p.kind != p.VAR_KEYWORD)
    assert can_widen(name) == ("width" in model_options(name))
    with torch.device("meta"):  # shapes without memory: seed-naive has 232M parameters
        model = create_model(name, num_classes=7)
        x = torch.zeros(2, 3, 32, 32)
        assert model.eval()(x).shape == (2, 7)
        output = model.train()(x)
    aux = output.aux_logits if isinstance(output, InceptionOutputs) else ()
    assert len(aux) == len(hooks.default_aux_weights(model))
    assert all(a.shape == (2, 7) for a in aux)
    assert all(w >= 0 for w in hooks.default_aux_weights(model))
    stem = hooks.stem_conv(model)
    assert stem is None or isinstance(stem, nn.Conv2d)
