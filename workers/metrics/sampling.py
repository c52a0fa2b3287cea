"""What every metric draws: evaluation rows, noise on the model's device, ground-truth factors and their images.

Ground-truth draws go one of two ways, chosen by what the data set offers:

- a data set that renders any factor combination (it overrides ``ImageDataset.images_from_factors``, as dSprites
  does): factors come from ``sample_factors``, chosen columns are overwritten, and the images come from
  ``images_from_factors``;
- a plain :class:`ImageDataset` (a validation split, an image folder with a factor table): rows are drawn
  directly, and a row whose factor k must equal v is drawn uniformly among the rows that have that value. The
  generic ``images_from_factors`` draws the same distribution on a complete grid, but with one Python loop step per
  image, and it fails on combinations a split lacks; this draws from the distribution the rows have.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from workers.data.base import DataError, ImageDataset

Representation = Callable[[torch.Tensor], torch.Tensor]


def model_device(model: torch.nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def example_rows(dataset: ImageDataset, max_examples: int, generator: torch.Generator | None) -> torch.Tensor:
    """Up to ``max_examples`` distinct rows of the data set, in random order (CPU, long)."""
    if max_examples < 1:
        raise ValueError(f"max_examples must be at least 1, not {max_examples}")
    n = len(dataset)
    if n == 0:
        raise DataError(f"data set '{dataset.name}' is empty: there is nothing to evaluate")
    return torch.randperm(n, generator=generator)[: min(max_examples, n)]


def noise_generator(device: torch.device, generator: torch.Generator | None) -> torch.Generator | None:
    """A generator on ``device`` seeded from ``generator`` (CPU), so sampled noise is reproducible on any device."""
    if generator is None:
        return None
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return torch.Generator(device=device).manual_seed(seed)


def encode_rows(
    model, dataset: ImageDataset, rows: torch.Tensor, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Posterior means and log-variances (None for deterministic models) of the given rows, float32 on the
    model's device."""
    device = model_device(model)
    means, logvars = [], []
    for chunk in rows.split(batch_size):
        posterior = model.encode(dataset.images(chunk).to(device))
        means.append(posterior.mean.float())
        if posterior.logvar is not None:
            logvars.append(posterior.logvar.float())
    return torch.cat(means), (torch.cat(logvars) if logvars else None)


def encode_stochastic_rows(
    model, dataset: ImageDataset, rows: torch.Tensor, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`encode_rows` for a model of the VAE family, whose posteriors have log-variances (ValueError if not)."""
    mean, logvar = encode_rows(model, dataset, rows, batch_size)
    if logvar is None:
        raise ValueError("the model's posterior has no log-variances: only vae, beta_vae and beta_tcvae have them")
    return mean, logvar


def require_stochastic(model, what: str) -> None:
    if not getattr(model, "stochastic", False):
        variant = getattr(getattr(model, "config", None), "variant", type(model).__name__)
        raise ValueError(
            f"{what} needs a posterior q(z|x) and the prior p(z) of the VAE family (variants vae, beta_vae, "
            f"beta_tcvae); variant '{variant}' is a deterministic autoencoder"
        )


def require_factors(dataset: ImageDataset, what: str) -> None:
    if not dataset.has_factors:
        raise DataError(f"{what} needs ground-truth factors, and data set '{dataset.name}' has none")


@dataclass
class FactorDraw:
    """Factor vectors (n, K) on the CPU, and the data set rows they came from (None where the data set renders
    images from factors)."""

    factors: torch.Tensor
    rows: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.factors.shape[0])


class FactorSampler:
    """Draws ground-truth factor vectors, with chosen factors held fixed, and encodes their images."""

    def __init__(self, dataset: ImageDataset, generator: torch.Generator | None = None, what: str = "this metric"):
        require_factors(dataset, what)
        if len(dataset) == 0:
            raise DataError(f"data set '{dataset.name}' is empty: there is nothing to evaluate")
        self.dataset = dataset
        self.generator = generator
        self.factor_sizes = dataset.require_factor_sizes()
        self.renders = type(dataset).images_from_factors is not ImageDataset.images_from_factors
        self._groups: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def num_factors(self) -> int:
        return len(self.factor_sizes)

    def sample(self, n: int) -> FactorDraw:
        """n factor vectors drawn as the data set draws them."""
        if self.renders:
            return FactorDraw(self.dataset.sample_factors(n, self.generator).long().cpu())
        rows = torch.randint(len(self.dataset), (n,), generator=self.generator)
        return FactorDraw(self.dataset.factors(rows).long().cpu(), rows)

    def sample_sharing(self, factor_index: torch.Tensor, values: torch.Tensor) -> FactorDraw:
        """One draw per entry: draw i has factor ``factor_index[i]`` equal to ``values[i]``, the others drawn as
        the data set draws them."""
        factor_index, values = factor_index.long().cpu(), values.long().cpu()
        n = factor_index.shape[0]
        if self.renders:
            factors = self.dataset.sample_factors(n, self.generator).long().cpu().clone()
            factors[torch.arange(n), factor_index] = values
            return FactorDraw(factors)
        order, start, count = self._value_groups()
        if n and int(values.max()) >= count.shape[1]:
            raise DataError(f"data set '{self.dataset.name}' has no row with factor value {int(values.max())}")
        group_size = count[factor_index, values]
        if n and bool((group_size == 0).any()):
            bad = int(torch.nonzero(group_size == 0)[0, 0])
            raise DataError(
                f"data set '{self.dataset.name}' has no row with factor "
                f"'{self._factor_name(int(factor_index[bad]))}' = {int(values[bad])}"
            )
        offset = (torch.rand(n, generator=self.generator) * group_size).long().clamp_max(group_size - 1)
        rows = order[start[factor_index, values] + offset]
        return FactorDraw(self.dataset.factors(rows).long().cpu(), rows)

    def images(self, draw: FactorDraw, start: int, stop: int) -> torch.Tensor:
        if draw.rows is not None:
            return self.dataset.images(draw.rows[start:stop])
        return self.dataset.images_from_factors(draw.factors[start:stop], self.generator)

    def codes(self, draw: FactorDraw, representation: Representation, batch_size: int) -> torch.Tensor:
        """representation(images) of every draw, float32, on whatever device the representation returns."""
        parts = [
            torch.as_tensor(representation(self.images(draw, s, s + batch_size))).float()
            for s in range(0, len(draw), batch_size)
        ]
        return torch.cat(parts)

    def train_test_codes(
        self, representation: Representation, num_train: int, num_test: int, batch_size: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(train codes, train factors, test codes, test factors) as NumPy arrays: ``num_train`` then ``num_test``
        fresh draws, then their codes (in that order, so a generator gives the same draws every time)."""
        train, test = self.sample(num_train), self.sample(num_test)
        train_codes = self.codes(train, representation, batch_size).cpu().numpy()
        test_codes = self.codes(test, representation, batch_size).cpu().numpy()
        return train_codes, train.factors.numpy(), test_codes, test.factors.numpy()

    def _factor_name(self, k: int) -> str:
        names = self.dataset.factor_names
        return names[k] if names is not None and k < len(names) else str(k)

    def _value_groups(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For every factor, the rows sorted by its value: ``order`` (K*N,) holds factor k's sorted rows at
        k*N..(k+1)*N; ``start``/``count`` (K, V) locate the rows with value v inside it."""
        if self._groups is None:
            n = len(self.dataset)
            table = self.dataset.factors(torch.arange(n)).long().cpu()  # (N, K)
            k = table.shape[1]
            num_values = max(max(self.factor_sizes), int(table.max()) + 1)
            order = torch.cat([torch.argsort(table[:, j], stable=True) for j in range(k)])
            count = torch.stack([torch.bincount(table[:, j], minlength=num_values) for j in range(k)])
            start = torch.cumsum(count, dim=1) - count + n * torch.arange(k).unsqueeze(1)
            self._groups = (order, start, count)
        return self._groups


def train_test_arrays(
    what: str, train_codes, train_factors, test_codes, test_factors
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Codes (N, D) as float64 and factors (N, K) as arrays, for a metric that fits on the training set and scores
    on the test set; ValueError (naming ``what``) unless the rows and the dimensions of the two sets match."""
    train_codes, test_codes = np.asarray(train_codes, np.float64), np.asarray(test_codes, np.float64)
    train_factors, test_factors = np.asarray(train_factors), np.asarray(test_factors)
    if train_codes.shape[0] != train_factors.shape[0] or test_codes.shape[0] != test_factors.shape[0]:
        raise ValueError(f"{what}: codes and factors must have the same number of rows")
    if train_codes.shape[1] != test_codes.shape[1] or train_factors.shape[1] != test_factors.shape[1]:
        raise ValueError(f"{what}: training and test sets must have the same code and factor dimensions")
    return train_codes, train_factors, test_codes, test_factors


def factor_columns(dataset: ImageDataset, factors) -> list[int]:
    """Column indices of the named (or numbered) factors; all factors when ``factors`` is None."""
    sizes = dataset.factor_sizes or ()
    if factors is None:
        return list(range(len(sizes)))
    names = list(dataset.factor_names or ())
    columns = []
    for f in factors:
        if isinstance(f, int):
            if not 0 <= f < len(sizes):
                raise ValueError(
                    f"factors: index {f} is out of range for data set '{dataset.name}' ({len(sizes)} factors)"
                )
            columns.append(f)
        elif f in names:
            columns.append(names.index(f))
        else:
            raise ValueError(f"factors: '{f}' is not a factor of data set '{dataset.name}' (factors: {names})")
    if not columns:
        raise ValueError("factors: give at least one factor, or None for all of them")
    return columns
