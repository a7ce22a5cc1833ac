"""Batched augmentation: checked against torch's own padding, per image, on uint8 and float."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cifar_inception.augment import (
    AugmentPolicy,
    erase,
    flip_where,
    normalize,
    random_crop,
    random_cutout,
    random_flip,
    translate,
)


def _images(n=6, h=8, w=8, dtype=torch.uint8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, h, w, 3), generator=g)
    return x.to(dtype)


def _reference_shift(image_hwc, dy, dx, padding, mode):
    """One image: pad with torch (reflect or zeros), then cut the shifted window."""
    chw = image_hwc.permute(2, 0, 1).float()[None]
    padded = F.pad(chw, (padding,) * 4, mode="reflect" if mode == "reflect" else "constant")
    h, w = image_hwc.shape[:2]
    window = padded[0, :, padding + dy: padding + dy + h, padding + dx: padding + dx + w]
    return window.permute(1, 2, 0)


@pytest.mark.parametrize("mode", ["reflect", "zeros"])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_translate_matches_padded_crop(mode, dtype):
    x = _images(n=5, dtype=dtype)
    dy = torch.tensor([-3, 0, 2, 3, -1])
    dx = torch.tensor([1, -3, 0, 3, -2])
    out = translate(x, dy, dx, padding_mode=mode)
    assert out.shape == x.shape and out.dtype == dtype
    for i in range(len(x)):
        expected = _reference_shift(x[i], int(dy[i]), int(dx[i]), 3, mode)
        assert torch.equal(out[i].float(), expected), f"image {i}"


def test_translate_by_zero_is_identity():
    x = _images()
    zero = torch.zeros(len(x), dtype=torch.long)
    assert torch.equal(translate(x, zero, zero), x)


def test_random_crop_is_a_window_of_the_padded_image():
    x = _images(n=16, h=10, w=10)
    out = random_crop(x, 2, generator=torch.Generator().manual_seed(1))
    padded = F.pad(x.permute(0, 3, 1, 2).float(), (2,) * 4, mode="reflect").permute(0, 2, 3, 1)
    for i in range(len(x)):
        windows = [padded[i, top:top + 10, left:left + 10]
                   for top in range(5) for left in range(5)]
        assert any(torch.equal(out[i].float(), w) for w in windows), f"image {i}"
    assert not torch.equal(out, x)  # 16 images all unshifted has probability 25**-16


def test_random_ops_are_deterministic_given_the_generator():
    x = _images(n=32)
    policy = AugmentPolicy(crop_padding=2, flip=True, cutout=3)
    a = policy(x, generator=torch.Generator().manual_seed(7))
    b = policy(x, generator=torch.Generator().manual_seed(7))
    c = policy(x, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_random_flip_flips_about_half():
    x = _images(n=400, h=4, w=4)
    out = random_flip(x, generator=torch.Generator().manual_seed(0))
    flipped = (out == x.flip(2)).flatten(1).all(1) & ~(out == x).flatten(1).all(1)
    kept = (out == x).flatten(1).all(1)
    assert bool((flipped | kept).all())
    assert 150 < int(flipped.sum()) < 250


def test_flip_where_follows_mask():
    x = _images(n=3)
    out = flip_where(x, torch.tensor([True, False, True]))
    assert torch.equal(out[0], x[0].flip(1))
    assert torch.equal(out[1], x[1])
    assert torch.equal(out[2], x[2].flip(1))


def test_erase_fills_a_clipped_square_per_channel():
    x = torch.full((2, 6, 6, 3), 9, dtype=torch.uint8)
    out = erase(x, torch.tensor([0, 3]), torch.tensor([0, 3]), 4, fill=(1, 2, 3))
    # image 0: square centred at the corner, clipped to rows/cols 0..1
    assert torch.equal(out[0, :2, :2], torch.tensor([1, 2, 3], dtype=torch.uint8).expand(2, 2, 3))
    assert int((out[0, :, :, 0] == 1).sum()) == 4
    # image 1: a full 4x4 square, rows/cols 1..4
    assert int((out[1, :, :, 0] == 1).sum()) == 16
    assert bool((out[1, 1:5, 1:5, 2] == 3).all()) and bool((out[1, 0, :, 2] == 9).all())


def test_random_cutout_blanks_at_most_a_square():
    x = torch.full((50, 8, 8, 3), 200, dtype=torch.uint8)
    out = random_cutout(x, 3, generator=torch.Generator().manual_seed(0))
    blanked = (out[..., 0] == 0).flatten(1).sum(1)
    assert int(blanked.max()) == 9 and int(blanked.min()) >= 1


def test_policy_off_returns_input():
    x = _images()
    policy = AugmentPolicy()
    assert not policy.active
    assert policy(x, generator=torch.Generator()) is x


def test_normalize_layout_and_values():
    x = torch.tensor([[[[255, 0, 51]]]], dtype=torch.uint8)  # (1, 1, 1, 3)
    out = normalize(x, mean=(0.5, 0.0, 0.2), std=(0.5, 1.0, 0.1))
    assert out.shape == (1, 3, 1, 1)
    assert torch.allclose(out.flatten(), torch.tensor([1.0, 0.0, 0.0]), atol=1e-6)


def test_alternating_flips_mirror_each_image_every_other_epoch():
    from cifar_inception.augment import alternating_flips

    def draw(epoch):
        return alternating_flips(1000, epoch, generator=torch.Generator().manual_seed(3))

    even, odd = draw(0), draw(1)
    assert torch.equal(even, draw(2)) and torch.equal(odd, ~even)
    assert 400 < int(even.sum()) < 600


def test_policy_flips_exactly_the_masked_images():
    from cifar_inception.augment import AugmentPolicy

    images = torch.arange(2 * 4 * 4 * 3, dtype=torch.uint8).reshape(2, 4, 4, 3)
    mask = torch.tensor([True, False])
    out = AugmentPolicy(flip=True)(images, generator=torch.Generator(), flip_mask=mask)
    assert torch.equal(out[0], images[0].flip(1)) and torch.equal(out[1], images[1])
