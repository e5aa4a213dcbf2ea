"""Batched augmentation (flexexp.data.loader): what it does to each image, and seeding."""

from __future__ import annotations

import pytest
import torch

from flexexp.data.loader import Augment, DeviceLoader, augment, random_affine, random_flip


def images(n: int = 16, c: int = 3, size: int = 8, seed: int = 0) -> torch.Tensor:
    """Random uint8 images ``(n, c, size, size)``; random pixels are never mirror-symmetric."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, size, size), generator=g, dtype=torch.uint8)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------- flip


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_flip_mirrors_exactly_the_chosen_images(seed):
    x = images(32, seed=seed)
    out, mask = random_flip(x, gen(seed))
    assert mask.dtype == torch.bool and mask.shape == (32,)
    assert 0 < int(mask.sum()) < 32  # both kinds are present, so the test tests something
    assert torch.equal(out[mask], x[mask].flip(3))  # mirrored left-right (width axis)
    assert torch.equal(out[~mask], x[~mask])  # the others untouched
    assert not torch.equal(out[mask], x[mask])
    assert out.dtype == x.dtype and out.shape == x.shape


def test_flip_probability_extremes():
    x = images()
    none, mask0 = random_flip(x, gen(0), p=0.0)
    every, mask1 = random_flip(x, gen(0), p=1.0)
    assert not mask0.any() and torch.equal(none, x)
    assert mask1.all() and torch.equal(every, x.flip(3))


# ---------------------------------------------------------------------------- scaling


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_affine_without_scale_or_shift_is_the_identity(dtype):
    x = images(8).to(dtype)
    out = random_affine(x, (1.0, 1.0), 0, gen(0))
    assert out.dtype == dtype and torch.equal(out, x)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize("scale, translate", [((0.9, 1.1), 0), ((0.5, 2.0), 3), ((1.0, 1.0), 2)])
def test_affine_keeps_shape_and_dtype(dtype, scale, translate):
    x = images(6, c=1, size=12).to(dtype)
    out = random_affine(x, scale, translate, gen(1))
    assert out.shape == x.shape and out.dtype == dtype


def test_zoom_in_fills_the_image_and_zoom_out_leaves_a_zero_border():
    x = torch.full((4, 3, 16, 16), 200, dtype=torch.uint8)
    zoom_in = random_affine(x, (1.5, 1.5), 0, gen(0))
    assert torch.equal(zoom_in, x)  # a constant image stays constant: no uncovered pixels
    zoom_out = random_affine(x, (0.5, 0.5), 0, gen(0))
    assert (zoom_out[..., 0, :] == 0).all() and (zoom_out[..., 8, 8] == 200).all()


def test_every_image_draws_its_own_parameters():
    one = images(1, size=16)
    x = one.expand(8, -1, -1, -1).contiguous()  # eight copies of one image
    scaled = random_affine(x, (0.6, 1.4), 2, gen(0))
    assert len({bytes(img.numpy()) for img in scaled}) == 8
    flipped, mask = random_flip(x, gen(5))
    assert 0 < int(mask.sum()) < 8
    assert not torch.equal(flipped[mask][0], flipped[~mask][0])


# ---------------------------------------------------------------------------- seeding

PAPER_AUG = Augment(flip=True, scale=(0.9, 1.1), translate=2)


def test_same_seed_same_batch_other_seed_other_batch():
    x = images(16, size=16)
    a = augment(x, PAPER_AUG, gen(42))
    b = augment(x, PAPER_AUG, gen(42))
    c = augment(x, PAPER_AUG, gen(43))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.shape == x.shape and a.dtype == x.dtype


def test_no_augmentation_is_the_identity():
    x = images()
    assert torch.equal(augment(x, Augment(), gen(0)), x)
    assert not Augment().geometric and PAPER_AUG.geometric


def test_loader_batches_repeat_with_the_seed():
    x, y = images(20, size=8), torch.arange(20)

    def epoch(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        loader = DeviceLoader(x, y, 8, [0.5], [0.25], torch.device("cpu"), train=True,
                              aug=PAPER_AUG, generator=gen(seed))
        return list(loader)

    first, again, other = epoch(3), epoch(3), epoch(4)
    assert [len(yb) for _, yb in first] == [8, 8, 4]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
               for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(first, other, strict=True))
    assert sorted(torch.cat([yb for _, yb in first]).tolist()) == list(range(20))


def test_test_loader_keeps_order_and_pixels():
    x, y = images(10), torch.arange(10)
    loader = DeviceLoader(x, y, 4, [0.5], [0.25], torch.device("cpu"), train=False,
                          aug=PAPER_AUG)
    xs, ys = zip(*loader, strict=True)
    assert torch.equal(torch.cat(ys), y)
    # the same three IEEE operations (each correctly rounded) on the same numbers
    assert torch.equal(torch.cat(xs), (x.float() / 255.0 - 0.5) / 0.25)
