import math
import time

import numpy as np
import pytest
import torch

from workers.data.base import DataError, ImageDataset
from workers.data.dsprites import (
    BOX,
    FACTOR_NAMES,
    FACTOR_SIZES,
    FRAME,
    DSprites,
    centre_pixels,
    orientation_values,
    position_values,
)


@pytest.fixture(scope="module")
def data() -> DSprites:
    return DSprites()


def factors_of(shape=0, scale=5, orientation=0, pos_x=16, pos_y=16) -> torch.Tensor:
    return torch.tensor([[shape, scale, orientation, pos_x, pos_y]])


def centre_of_mass(image: torch.Tensor) -> tuple[float, float]:
    """(column, row) of the lit pixels' centre of mass."""
    rows, cols = torch.nonzero(image.squeeze(0), as_tuple=True)
    return float(cols.double().mean()), float(rows.double().mean())


def test_factor_grid_and_length(data):
    assert data.factor_names == FACTOR_NAMES == ("shape", "scale", "orientation", "pos_x", "pos_y")
    assert data.factor_sizes == FACTOR_SIZES == (3, 6, 40, 32, 32)
    assert len(data) == 737_280
    assert data.image_shape == (1, 64, 64)
    assert data.has_factors and data.labels is None
    # The whole data set is a sprite bank, not 737,280 images (those would be 3 GB as bytes).
    assert data.nbytes() < 4_000_000
    values = orientation_values()
    assert values[0] == 0 and values[-1] < 2 * math.pi and len(values) == 40
    assert position_values()[0] == 0 and position_values()[-1] == 1


def test_rendering_is_deterministic():
    index = torch.randint(737_280, (256,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(DSprites().images(index), DSprites().images(index))


def test_index_factor_round_trip(data):
    rows = torch.randint(len(data), (500,), generator=torch.Generator().manual_seed(0))
    factors = data.factors(rows)
    expected = np.stack(np.unravel_index(rows.numpy(), FACTOR_SIZES), axis=1)
    assert torch.equal(factors, torch.from_numpy(expected))
    assert torch.equal(data.row_of_factors(factors), rows)
    assert torch.equal(data.images(rows), data.images_from_factors(factors))
    # Row-major order: the last factor (pos_y) varies fastest.
    assert data.factors(torch.tensor([0, 1, 32, 1024])).tolist() == [
        [0, 0, 0, 0, 0],
        [0, 0, 0, 0, 1],
        [0, 0, 0, 1, 0],
        [0, 0, 1, 0, 0],
    ]


def test_images_are_binary_and_float(data):
    images = data.images(torch.arange(0, 737_280, 997))
    assert images.dtype == torch.float32 and images.shape[1:] == (1, 64, 64)
    assert set(images.unique().tolist()) == {0.0, 1.0}
    assert bool((images.flatten(1).sum(1) > 0).all())  # every image shows its sprite


def test_position_moves_the_centre_of_mass(data):
    centres = centre_pixels()
    for shape in range(3):
        along_x = data.images_from_factors(torch.cat([factors_of(shape, 5, 0, p, 16) for p in range(32)]))
        along_y = data.images_from_factors(torch.cat([factors_of(shape, 5, 0, 16, p) for p in range(32)]))
        xs = [centre_of_mass(image)[0] for image in along_x]
        ys = [centre_of_mass(image)[1] for image in along_y]
        assert all(b > a for a, b in zip(xs, xs[1:])), "pos_x must move the sprite right"
        assert all(b > a for a, b in zip(ys, ys[1:])), "pos_y must move the sprite down"
        assert np.allclose(xs, centres.numpy(), atol=0.75)
        assert np.allclose(ys, centres.numpy(), atol=0.75)
    # The extreme positions keep the sprite inside the frame, near its edges.
    assert float(centres[0]) == (BOX - 1) / 2 and float(centres[-1]) == FRAME - 1 - (BOX - 1) / 2


def test_area_grows_with_scale_and_differs_by_shape(data):
    areas = torch.stack(
        [
            data.images_from_factors(torch.tensor([[shape, scale, 0, 10, 20] for scale in range(6)])).sum((1, 2, 3))
            for shape in range(3)
        ]
    )  # (shape, scale)
    assert bool((areas[:, 1:] > areas[:, :-1]).all())
    # Area goes as scale^2: the largest is about four times the smallest (scale 1 vs 0.5).
    assert torch.allclose(areas[:, -1] / areas[:, 0], torch.full((3,), 4.0), rtol=0.15)
    square, ellipse, heart = areas[:, -1].tolist()
    assert square == 16 * 16  # a scale-1 square is 16 px wide
    assert ellipse < heart < square
    assert min(square - heart, heart - ellipse) > 10


def test_orientation_turns_the_ellipse_counter_clockwise(data):
    for k in (0, 3, 7, 12, 25, 33):
        image = data.images_from_factors(factors_of(1, 5, k, 16, 16))[0, 0]
        rows, cols = torch.nonzero(image, as_tuple=True)
        x, y = cols.double() - cols.double().mean(), -(rows.double() - rows.double().mean())  # y up
        angle = 0.5 * math.atan2(2 * float((x * y).mean()), float((x * x).mean() - (y * y).mean()))
        expected = float(orientation_values()[k]) % math.pi
        difference = (angle - expected + math.pi / 2) % math.pi - math.pi / 2
        assert abs(difference) < math.radians(4), (k, math.degrees(angle), math.degrees(expected))


def test_square_at_45_degrees_is_a_diamond(data):
    upright = data.images_from_factors(factors_of(0, 5, 0))[0, 0]
    diamond = data.images_from_factors(factors_of(0, 5, 5))[0, 0]  # 5 * 9 degrees
    width = lambda image: int(image.any(dim=0).sum())
    assert width(upright) == 16
    assert 21 <= width(diamond) <= 23  # 16 * sqrt(2)


def test_images_from_factors_checks_its_input(data):
    with pytest.raises(DataError, match="out of range"):
        data.images_from_factors(torch.tensor([[3, 0, 0, 0, 0]]))
    with pytest.raises(DataError, match="shape"):
        data.images_from_factors(torch.zeros(2, 4, dtype=torch.long))


def test_subset_limit_and_to(data):
    rows = torch.tensor([5, 700_000, 12, 3])
    part = data.subset(rows)
    assert isinstance(part, DSprites) and len(part) == 4
    assert torch.equal(part.images(torch.arange(4)), data.images(rows))
    assert torch.equal(part.factors(torch.arange(4)), data.factors(rows))
    inner = part.subset(torch.tensor([1, 3]))  # a subset of a subset
    assert torch.equal(inner.factors(torch.arange(2)), data.factors(torch.tensor([700_000, 3])))
    assert (
        part.subset(torch.tensor([-1])).factors(torch.tensor([0])).tolist() == data.factors(torch.tensor([3])).tolist()
    )
    with pytest.raises(IndexError):
        part.subset(torch.tensor([4]))
    # limit: the first N rows, without an index table
    first = DSprites(limit=100)
    assert len(first) == 100 and first.nbytes() == data.nbytes()
    assert torch.equal(first.images(torch.arange(100)), data.images(torch.arange(100)))
    assert len(DSprites(limit=10**9)) == len(data)
    moved = part.to("cpu")
    assert moved.device == torch.device("cpu") and torch.equal(moved.images(torch.arange(4)), data.images(rows))
    assert len(data) == 737_280  # the parent is untouched by its views


def test_sample_factors(data):
    gen = torch.Generator().manual_seed(0)
    sample = data.sample_factors(20_000, gen)
    assert sample.device.type == "cpu" and sample.dtype == torch.long and sample.shape == (20_000, 5)
    assert bool((sample >= 0).all()) and bool((sample < torch.tensor(FACTOR_SIZES)).all())
    shape_counts = torch.bincount(sample[:, 0], minlength=3).double() / 20_000
    assert torch.allclose(
        shape_counts, torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.02
    )  # uniform over the grid
    assert sample[:, 3].unique().numel() == 32
    assert torch.equal(
        data.sample_factors(50, torch.Generator().manual_seed(1)),
        data.sample_factors(50, torch.Generator().manual_seed(1)),
    )
    # A view draws its own rows.
    part = data.subset(torch.tensor([10, 20]))
    drawn = part.sample_factors(100, gen)
    assert {tuple(r) for r in drawn.tolist()} <= {tuple(r) for r in data.factors(torch.tensor([10, 20])).tolist()}
    # Metrics look for a renderer by checking the override.
    assert type(part).images_from_factors is not ImageDataset.images_from_factors


def test_render_speed(data):
    index = torch.randint(len(data), (4096,), generator=torch.Generator().manual_seed(0))
    data.images(index[:64])
    start = time.perf_counter()
    images = data.images(index)
    print(f"dsprites: 4096 images rendered in {time.perf_counter() - start:.3f} s on CPU")
    assert images.shape == (4096, 1, 64, 64)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_renders_the_same_on_gpu(data):
    index = torch.randint(len(data), (2048,), generator=torch.Generator().manual_seed(0))
    on_gpu = DSprites().subset(torch.arange(0, len(data), 3)).to("cuda")
    assert on_gpu.device.type == "cuda"
    images = on_gpu.images(index[:1000].cuda())
    assert images.device.type == "cuda"
    assert torch.equal(images.cpu(), data.images(index[:1000] * 3))
    factors = data.factors(index)
    assert torch.equal(on_gpu.images_from_factors(factors).cpu(), data.images(index))
