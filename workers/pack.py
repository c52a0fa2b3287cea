"""K models of one variant, architecture, latent size and image shape trained as one (issue 12's packs).

Their parameters and buffers are stacked (``torch.func.stack_module_state``: each of shape (K, ...)), and one
``torch.func.vmap`` of ``functional_call`` computes the K losses in one pass over a (K, B, C, H, W) batch, each model
on its own images with its own noise (drawn with its own generator, Autoencoder.draw_noise) and its own beta (a
buffer, stacked with the weights). Gradients of the summed losses are each model's own, since no parameter is
shared; and Adam is element-wise, so one optimizer over the stacked tensors is K optimizers, one per model (bias
correction counts steps, the same for all). :meth:`Pack.unpack` writes the trained tensors back into K ordinary
models.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from workers.models.base import Autoencoder, Noise


class _LossOf(nn.Module):
    """A model whose forward is its training loss, as (loss, parts): what functional_call (which calls forward)
    and vmap (which maps tensors, dicts and tuples) can take."""

    def __init__(self, model: Autoencoder):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, noise: Noise) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = self.model.loss(x, noise)
        return out.loss, out.parts


def pack_key(model: Autoencoder) -> tuple:
    """What models must share to be packed: everything but what is stacked (weights, beta)."""
    config = model.config.model_dump(exclude={"beta"})
    return (type(model).__name__, repr(sorted(config.items())), tuple(model.image_shape), model.dataset_size)


class Pack:
    """K models trained as one. ``models`` are left as they are until :meth:`unpack`."""

    def __init__(self, models: list[Autoencoder]):
        if not models:
            raise ValueError("a pack needs at least one model")
        keys = {pack_key(m) for m in models}
        if len(keys) > 1:
            raise ValueError("models in one pack must share variant, architecture, latent size, image shape and "
                             "every other model setting but beta")
        self.models = models
        wrapped = [_LossOf(m) for m in models]
        self.params, self.buffers = stack_module_state(wrapped)  # params are new leaves that require grad
        self._base = copy.deepcopy(wrapped[0]).to("meta")  # the code; its tensors are swapped for each model's
        self._losses = vmap(self._one_loss, in_dims=(0, 0, 0, 0))

    def __len__(self) -> int:
        return len(self.models)

    def _one_loss(self, params, buffers, x, noise):
        return functional_call(self._base, (params, buffers), (x, noise))

    def parameters(self) -> list[torch.Tensor]:
        return list(self.params.values())

    def draw_noise(self, x: torch.Tensor, generators: list[torch.Generator]) -> Noise:
        """Each model's noise for its batch ``x[k]`` from its own generator, stacked: (K, ...) per name."""
        drawn = [model.draw_noise(x[k], generators[k]) for k, model in enumerate(self.models)]
        return {name: torch.stack([d[name] for d in drawn]) for name in drawn[0]}

    def losses(self, x: torch.Tensor, noise: Noise) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The K models' losses (K,) and loss parts (each (K,)) on their batches ``x`` (K, B, C, H, W)."""
        if x.shape[0] != len(self):
            raise ValueError(f"a pack of {len(self)} models takes {len(self)} batches, not {x.shape[0]}")
        return self._losses(self.params, self.buffers, x, noise)

    @torch.no_grad()
    def unpack(self) -> list[Autoencoder]:
        """The K models with the pack's trained parameters and buffers written back into them."""
        for k, model in enumerate(self.models):
            for name, tensor in model.named_parameters():
                tensor.copy_(self.params[f"model.{name}"][k])
            for name, tensor in model.named_buffers():
                tensor.copy_(self.buffers[f"model.{name}"][k])
        return self.models
