"""The time-to-accuracy models: inception-cpu and inception-fast."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cifar_inception.errors import ModelError
from cifar_inception.models import create_model, list_models
from cifar_inception.models.blocks import Branches
from cifar_inception.models.registry import model_purpose
from cifar_inception.models.fast import STEM_CHANNELS, FastInception, FusedInceptionConv
from cifar_inception.summary import count_macs

NAMES = ("inception-cpu", "inception-fast")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny batches: one thread each


def small(name: str, **options) -> FastInception:
    torch.manual_seed(0)
    return create_model(name, **{"width": 0.25, **options})


def test_registered_with_a_purpose():
    assert set(NAMES) <= set(list_models())
    assert all(model_purpose(name) for name in NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_logits_shape_in_both_modes(name):
    model = small(name)
    x = torch.randn(4, 3, 32, 32)
    for training in (True, False):
        model.train(training)
        out = model(x)
        assert isinstance(out, torch.Tensor) and out.shape == (4, 10)
    assert model.default_aux_weights == ()


def test_every_stage_is_built_from_parallel_branches():
    model = small("inception-cpu")
    branches = [m for m in model.modules() if isinstance(m, Branches)]
    assert len(branches) == 6  # two Inception modules per group, three groups
    assert all(len(b.branches) == 2 for b in branches)


def test_widths_set_the_groups_and_width_may_leave_the_first_alone():
    def channels(model):
        return [getattr(model, f"group{i}").out_channels for i in (1, 2, 3)]
    assert channels(create_model("inception-cpu")) == [32, 128, 128]
    assert channels(create_model("inception-cpu", widths="32/128/256", width=1.5)) == [48, 192, 384]
    tapered = create_model("inception-cpu", widths="32,128,256", width=1.5, widen_first=False)
    assert channels(tapered) == [32, 192, 384]
    assert tapered(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_the_gpu_model_is_wider_and_width_scales_cost():
    cpu, gpu = create_model("inception-cpu"), create_model("inception-fast")
    assert count_macs(gpu) > 2 * count_macs(cpu)
    assert count_macs(create_model("inception-cpu", width=0.5)) < count_macs(cpu) / 2


def test_reduce_pools_inside_the_first_module_of_each_group():
    """Same weights, fewer multiply-adds: the pooling moves into the first module's branches."""
    plain, reduced = small("inception-cpu"), small("inception-cpu", reduce=True)
    assert [p.shape for p in plain.parameters()] == [p.shape for p in reduced.parameters()]
    assert count_macs(reduced) < 0.95 * count_macs(plain)
    for group in ("group1", "group2", "group3"):
        first = getattr(reduced, group)[0]
        assert isinstance(first, Branches)
        assert all(isinstance(branch[1], nn.MaxPool2d) for branch in first.branches)
    assert reduced.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@torch.no_grad()
def _copy_into_fused(separate: FastInception, fused: FastInception) -> None:
    """Give ``fused`` the weights of ``separate``: each module's two first convolutions
    stacked (the 3x3 branch's first), everything else as it is."""
    shared = {k: v for k, v in separate.state_dict().items() if k in fused.state_dict()}
    fused.load_state_dict(shared, strict=False)
    modules = dict(separate.named_modules())
    for name, module in fused.named_modules():
        if isinstance(module, FusedInceptionConv):
            wide, deep = (list(branch.modules()) for branch in modules[name].branches)
            wide_conv, first, second = [m for m in wide + deep if isinstance(m, nn.Conv2d)]
            module.first.weight.copy_(torch.cat([wide_conv.weight, first.weight]))
            module.deep[2].weight.copy_(second.weight)
            norm = next(m for m in deep if isinstance(m, nn.BatchNorm2d))
            module.deep[0].load_state_dict(norm.state_dict())


@pytest.mark.parametrize("reduce,dirac_offset", [(False, False), (True, False), (True, True)])
def test_fuse_computes_the_same_function_with_the_same_initialisation(reduce, dirac_offset):
    """One convolution for both branches' first layers: the same weights in another layout,
    the same outputs and gradients, and identity filters in the same places."""
    separate = small("inception-cpu", reduce=reduce, dirac_offset=dirac_offset)
    fused = small("inception-cpu", reduce=reduce, fuse=True, dirac_offset=dirac_offset)
    count = lambda model: sum(p.numel() for p in model.parameters())  # noqa: E731
    assert count(fused) == count(separate) and count_macs(fused) == count_macs(separate)
    assert sum(isinstance(m, FusedInceptionConv) for m in fused.modules()) == 6
    # the deterministic part of the initialisation: identity filters in each branch's part
    identity = [(m.first.weight.flatten(2)[..., 4] == 1).nonzero().tolist()
                for m in fused.modules() if isinstance(m, FusedInceptionConv)]
    _copy_into_fused(separate, fused)
    assert identity == [(m.first.weight.flatten(2)[..., 4] == 1).nonzero().tolist()
                        for m in fused.modules() if isinstance(m, FusedInceptionConv)]
    x = torch.randn(4, 3, 32, 32)
    for model in (separate, fused):
        model.train()
        model(x).square().sum().backward()
    torch.testing.assert_close(fused.train()(x), separate.train()(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused.stem[0].weight.grad, separate.stem[0].weight.grad,
                               rtol=1e-3, atol=1e-5)


def test_depths_add_modules_on_the_pooled_grid_and_keep_the_earlier_names():
    base = small("inception-cpu", reduce=True, fuse=True)
    deeper = small("inception-cpu", reduce=True, fuse=True, depths="2,2,3")
    def modules(group):
        return sum(isinstance(m, FusedInceptionConv) for m in group.modules())
    assert [modules(getattr(deeper, f"group{i}")) for i in (1, 2, 3)] == [2, 2, 3]
    assert set(base.state_dict()) < set(deeper.state_dict())
    assert count_macs(deeper) > count_macs(base)
    assert deeper(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("aux, taps", [(1, ["group2"]), (2, ["group1", "group2"])])
def test_aux_heads_read_the_groups_before_the_last_in_training_only(aux, taps):
    plain = small("inception-cpu", reduce=True, fuse=True)
    model = small("inception-cpu", reduce=True, fuse=True, aux=aux)
    assert list(model.aux_taps) == taps and model.default_aux_weights == (0.3,) * aux
    # the trunk and its initialisation are the plain net's: the heads only add to it
    for name, tensor in plain.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], tensor)
    x = torch.randn(2, 3, 32, 32)
    output = model.train()(x)
    assert output.logits.shape == (2, 10) and [a.shape for a in output.aux_logits] == [(2, 10)] * aux
    assert model.eval()(x).shape == (2, 10)


@pytest.mark.parametrize("fuse", [False, True])
def test_dirac_offset_starts_the_deep_branch_on_the_channels_the_wide_one_leaves(fuse):
    """A module as wide as its input, evaluated fresh (its inner norm the identity): the 3x3
    branch passes on the first half of the channels; the deep branch passes on the first
    quarter again (GELU'd) by default, the third quarter with ``dirac_offset``."""
    x = torch.randn(2, 32, 8, 8)
    for offset, start in ((False, 0), (True, 16)):
        model = small("inception-cpu", fuse=fuse, dirac_offset=offset).eval()
        module = next(m for m in model.group2.modules()
                      if isinstance(m, (FusedInceptionConv, Branches)) and m.out_channels == 32
                      and next(m.parameters()).shape[1] == 32)
        with torch.no_grad():
            out = module(x)
        torch.testing.assert_close(out[:, :16], x[:, :16])
        torch.testing.assert_close(out[:, 16:24], F.gelu(x[:, start:start + 8]))


def test_batch_norm_scale_is_frozen_unless_asked():
    frozen = [m.weight.requires_grad for m in small("inception-cpu").modules()
              if isinstance(m, nn.BatchNorm2d)]
    learnt = [m.weight.requires_grad for m in small("inception-cpu", bn_scale=True).modules()
              if isinstance(m, nn.BatchNorm2d)]
    assert frozen and not any(frozen)
    assert learnt and all(learnt)


def test_relu_option_replaces_gelu():
    model = small("inception-cpu", act="relu")
    assert not any(isinstance(m, nn.GELU) for m in model.modules())
    assert any(isinstance(m, nn.ReLU) for m in model.modules())


@pytest.mark.parametrize("options, fragment", [
    ({"act": "tanh"}, "act must be one of"),
    ({"width": 0}, "width"),
    ({"bn_scale": "yes"}, "bn_scale"),
    ({"reduce": 1}, "reduce"),
    ({"fuse": "yes"}, "fuse"),
    ({"widths": "32/128"}, "three channel counts"),
    ({"widths": "32/128/250"}, "multiples of 8"),
    ({"widths": "a/b/c"}, "widths"),
    ({"widths": 32}, "widths"),
    ({"widen_first": "no"}, "widen_first"),
    ({"dirac_offset": "yes"}, "dirac_offset"),
    ({"depths": "2/2/1"}, "depths must be three layer counts from 2 to 8"),
    ({"depths": "2/2"}, "depths"),
    ({"depth": 3}, "no option 'depth'"),
    ({"aux": 3}, "aux must be an integer from 0 to 2"),
    ({"aux": True}, "aux must be"),
])
def test_bad_options(options, fragment):
    with pytest.raises(ModelError, match=fragment):
        create_model("inception-cpu", **options)


def test_wrong_input_is_refused_with_the_expected_shape():
    with pytest.raises(ModelError, match=r"\(N, 3, H, W\), H and W from 9 up"):
        small("inception-cpu")(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ModelError, match="channels first"):
        small("inception-cpu")(torch.zeros(2, 28, 28, 3))


def _correlated_images(n: int = 64) -> torch.Tensor:
    """Smooth, colour-correlated images: neighbouring pixels and channels far from white."""
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(n, 1, 8, 8, generator=generator)
    base = F.interpolate(base, size=32, mode="bilinear", align_corners=False)
    tint = torch.tensor([1.0, 0.9, 0.7]).view(1, 3, 1, 1)
    return base * tint + 0.1 * torch.randn(n, 3, 32, 32, generator=generator)


def test_whitening_init_decorrelates_patches():
    model = small("inception-cpu")
    images = _correlated_images()
    model.init_from_data(images, eps=0.0)
    conv = model.stem_conv()
    assert torch.equal(conv.bias, torch.zeros_like(conv.bias))
    half = STEM_CHANNELS // 2
    assert torch.allclose(conv.weight[half:], -conv.weight[:half])
    with torch.no_grad():
        out = F.conv2d(images, conv.weight[:half])  # the stem without bias and activation
    flat = out.permute(0, 2, 3, 1).reshape(-1, half)
    flat = flat - flat.mean(0)
    covariance = flat.T @ flat / len(flat)
    assert torch.allclose(covariance, torch.eye(half), atol=1e-3)
    # the raw patches were strongly correlated, so this is not true before
    raw = F.unfold(images, 2).transpose(1, 2).reshape(-1, half)
    raw = raw - raw.mean(0)
    assert not torch.allclose(raw.T @ raw / len(raw), torch.eye(half), atol=0.1)


def test_channels_last_and_bf16_autocast_agree_with_fp32():
    model = small("inception-cpu").eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        reference = model(x)
        last = model.to(memory_format=torch.channels_last)(
            x.contiguous(memory_format=torch.channels_last))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x).float()
    assert torch.allclose(reference, last, atol=1e-4)
    assert torch.allclose(reference, low, atol=0.05 * reference.abs().max().item() + 1e-3)


def test_a_few_steps_fit_a_tiny_batch():
    model = small("inception-cpu").train()
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = torch.arange(16) % 10
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5,
                                momentum=0.9, nesterov=True)
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_the_plain_baseline_has_the_parameters_of_its_description():
    """airbench94's network: a 2x2 whitening conv 3 -> 24 (with bias), then three groups of
    conv3x3-pool-BN-GELU-conv3x3-BN-GELU of widths 64/256/256 (convs without bias, each BN a
    scale and a shift), a max-pool and a linear head 256 -> 10 without bias."""
    widths, previous, expected = (64, 256, 256), 24, 3 * 2 * 2 * 24 + 24
    for out in widths:
        expected += 9 * previous * out + 9 * out * out + 2 * (2 * out)
        previous = out
    expected += 256 * 10
    model = create_model("baseline-plain")
    assert sum(p.numel() for p in model.parameters()) == expected == 1_972_792
    assert not any(isinstance(m, Branches) for m in model.modules())  # no Inception module
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
