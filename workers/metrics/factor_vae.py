"""FactorVAE score (Kim & Mnih 2018), as disentanglement_lib computes it.

A vote: pick a factor k, draw ``vote_batch_size`` images that share one value of v_k, divide their codes by the
codes' standard deviation over the data, and vote for (k, the code dimension of least variance). Dimensions whose
standard deviation over the data is below ``prune_threshold`` (disentanglement_lib's 0.05, on the raw codes) are
collapsed and left out. The classifier maps each code dimension to the factor it got most training votes for;
the score is its accuracy on held-out votes (chance: 1 / number of factors).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from workers.data.base import ImageDataset
from workers.metrics.sampling import FactorDraw, FactorSampler, Representation, factor_columns


def varying_factors(sampler: FactorSampler, what: str, columns: Sequence[int] | None = None) -> torch.Tensor:
    """Indices of the factors with more than one value (among ``columns``, the scored factors, when given); at
    least two are needed to tell factors apart."""
    varying = torch.tensor(
        [k for k, size in enumerate(sampler.factor_sizes) if size > 1 and (columns is None or k in columns)],
        dtype=torch.long,
    )
    if len(varying) < 2:
        scored = "" if columns is None else f" among the scored factors {list(columns)}"
        raise ValueError(
            f"the {what} needs at least 2 factors with more than one value{scored}; data set "
            f"'{sampler.dataset.name}' has factor sizes {list(sampler.factor_sizes)}"
        )
    return varying


def draw_sharing_groups(
    sampler: FactorSampler, factor_ids: torch.Tensor, groups: int, group_size: int
) -> tuple[torch.Tensor, FactorDraw]:
    """``groups`` groups of ``group_size`` draws; group g shares one value of a factor drawn from ``factor_ids``.

    Returns the chosen factor per group (groups,) and the draws (groups * group_size rows, group-major).
    """
    chosen = factor_ids[torch.randint(len(factor_ids), (groups,), generator=sampler.generator)]
    anchors = sampler.sample(groups).factors
    values = anchors[torch.arange(groups), chosen]
    draw = sampler.sample_sharing(chosen.repeat_interleave(group_size), values.repeat_interleave(group_size))
    return chosen, draw


def _votes(
    sampler: FactorSampler,
    representation: Representation,
    factor_ids: torch.Tensor,
    num_votes: int,
    vote_batch_size: int,
    batch_size: int,
    scale: torch.Tensor,
    active: torch.Tensor,
) -> torch.Tensor:
    chosen, draw = draw_sharing_groups(sampler, factor_ids, num_votes, vote_batch_size)
    codes = sampler.codes(draw, representation, batch_size)
    codes = codes.view(num_votes, vote_batch_size, -1)[:, :, active] / scale[active]
    least_varying = codes.var(dim=1).argmin(dim=1).cpu()  # index among the active dimensions
    votes = torch.zeros(sampler.num_factors, int(active.sum()), dtype=torch.long)
    votes.index_put_((chosen, least_varying), torch.ones_like(chosen), accumulate=True)
    return votes


@torch.no_grad()
def factor_vae_score(
    representation: Representation,
    dataset: ImageDataset,
    num_train: int,
    num_eval: int,
    num_variance_estimate: int,
    vote_batch_size: int = 64,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
    prune_threshold: float = 0.05,
    factors: Sequence[str | int] | None = None,
) -> dict[str, float]:
    """``train_accuracy``, ``eval_accuracy`` (the score) and ``num_active_dims``, from ``num_train`` and
    ``num_eval`` votes of ``vote_batch_size`` images each; the data's code scale from ``num_variance_estimate``
    draws. Votes hold one of the scored ``factors`` (default: all) fixed; the others vary as the data draws them."""
    if vote_batch_size < 2 or num_variance_estimate < 2:
        raise ValueError("the FactorVAE score needs vote_batch_size and num_variance_estimate of at least 2")
    sampler = FactorSampler(dataset, generator, "the FactorVAE score")
    factor_ids = varying_factors(
        sampler, "FactorVAE score", None if factors is None else factor_columns(dataset, factors)
    )
    global_codes = sampler.codes(sampler.sample(num_variance_estimate), representation, batch_size)
    scale = global_codes.std(dim=0)
    active = scale >= prune_threshold
    if not bool(active.any()):
        return {"train_accuracy": 0.0, "eval_accuracy": 0.0, "num_active_dims": 0.0}
    train_votes = _votes(sampler, representation, factor_ids, num_train, vote_batch_size, batch_size, scale, active)
    eval_votes = _votes(sampler, representation, factor_ids, num_eval, vote_batch_size, batch_size, scale, active)
    classifier = train_votes.argmax(dim=0)  # the factor each active dimension stands for
    dims = torch.arange(train_votes.shape[1])
    return {
        "train_accuracy": float(train_votes[classifier, dims].sum() / train_votes.sum()),
        "eval_accuracy": float(eval_votes[classifier, dims].sum() / eval_votes.sum()),
        "num_active_dims": float(active.sum()),
    }
