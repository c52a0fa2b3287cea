"""One interface for every data set: images in [0, 1], optional labels, optional ground-truth factors.

Readers turn bytes into an :class:`ImageDataset`; where the bytes come from (a path, a cached S3 object) is
not their business. Ground-truth data sets (dSprites) also let metrics sample factors and render the images
for given factors, as disentanglement_lib's ``GroundTruthData`` does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from workers.errors import AeforgeError


class DataError(AeforgeError, ValueError):
    """A data file or source that cannot be used. The message names the file and what was wrong."""


class ImageDataset:
    """Images stored as uint8 ``(N, C, H, W)``; served as float ``[0, 1]`` batches on the storage's device.

    Subclasses with a cheaper storage (dSprites keeps bit-packed pixels) override :meth:`images`.
    """

    def __init__(
        self,
        name: str,
        images_u8: torch.Tensor | None,
        labels: torch.Tensor | None = None,
        factors: torch.Tensor | None = None,
        factor_names: Sequence[str] | None = None,
        factor_sizes: Sequence[int] | None = None,
        num_classes: int | None = None,
    ):
        self.name = name
        self._images = images_u8
        self.labels = labels
        self._factors = factors
        self.factor_names = tuple(factor_names) if factor_names is not None else None
        self.factor_sizes = tuple(int(s) for s in factor_sizes) if factor_sizes is not None else None
        if labels is not None and num_classes is None:
            num_classes = int(labels.max().item()) + 1 if len(labels) else 0
        self.num_classes = num_classes

    @property
    def _u8(self) -> torch.Tensor:
        """The stored images. A subclass that passes None keeps its own storage and overrides what reads this."""
        if self._images is None:
            raise TypeError(f"{type(self).__name__} stores no uint8 image tensor: it must override this method")
        return self._images

    # --- shape ---------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self._u8.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self._u8.shape[1:]
        return c, h, w

    @property
    def device(self) -> torch.device:
        return self._u8.device

    @property
    def has_factors(self) -> bool:
        return self._factors is not None and self.factor_sizes is not None

    def require_factor_sizes(self) -> tuple[int, ...]:
        """The number of values of each ground-truth factor (DataError for a data set without factors)."""
        if self.factor_sizes is None:
            raise DataError(f"data set '{self.name}' has no ground-truth factors")
        return self.factor_sizes

    def require_factor_names(self) -> tuple[str, ...]:
        """The names of the ground-truth factors (DataError for a data set without factors)."""
        if self.factor_names is None:
            raise DataError(f"data set '{self.name}' has no ground-truth factors")
        return self.factor_names

    # --- access --------------------------------------------------------------------------------------
    def images(self, index: torch.Tensor) -> torch.Tensor:
        """Float images in [0, 1], shape (B, C, H, W), on this data set's device."""
        return self._u8[index.to(self._u8.device)].float().div_(255.0)

    def factors(self, index: torch.Tensor) -> torch.Tensor:
        """Ground-truth factor indices, shape (B, K), long."""
        if self._factors is None:
            raise DataError(f"data set '{self.name}' has no ground-truth factors")
        return self._factors[index.to(self._factors.device)]

    def sample_factors(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n factor vectors drawn as the data set's own distribution draws them (rows of the data set)."""
        idx = torch.randint(len(self), (n,), generator=generator)
        return self.factors(idx).cpu()

    def images_from_factors(self, factors: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images whose factors equal the given rows. Generic version: a random data set row for each."""
        if not self.has_factors or self._factors is None:
            raise DataError(f"data set '{self.name}' has no ground-truth factors")
        all_f = self._factors.cpu()
        out = []
        for row in factors.cpu():
            match = torch.nonzero((all_f == row).all(dim=1)).flatten()
            if len(match) == 0:
                raise DataError(f"data set '{self.name}' has no example with factors {row.tolist()}")
            out.append(match[torch.randint(len(match), (1,), generator=generator)])
        return self.images(torch.cat(out))

    # --- derived data sets ---------------------------------------------------------------------------
    def subset(self, index: torch.Tensor) -> ImageDataset:
        """A data set of the given rows (validation split, a rank's shard, ``limit``)."""
        index = index.to(self.device)
        return ImageDataset(
            self.name,
            self._u8[index],
            None if self.labels is None else self.labels[index.to(self.labels.device)],
            None if self._factors is None else self._factors[index.to(self._factors.device)],
            self.factor_names,
            self.factor_sizes,
            self.num_classes,
        )

    def to(self, device: torch.device | str) -> ImageDataset:
        """Move storage to a device (the training loop keeps data on the GPU when it fits)."""
        self._images = self._u8.to(device)
        if self.labels is not None:
            self.labels = self.labels.to(device)
        if self._factors is not None:
            self._factors = self._factors.to(device)
        return self

    def nbytes(self) -> int:
        return int(self._u8.numel() * self._u8.element_size())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, n={len(self)}, shape={self.image_shape})"
