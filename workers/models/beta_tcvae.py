"""beta-TCVAE (Chen et al. 2018): the KL term split into index-code mutual information, total correlation and
dimension-wise KL, with weight beta on the total correlation only (alpha = gamma = 1).

    loss = E[-log p(x|z)] + MI + beta * TC + dimension-wise KL

The three terms need the aggregate posterior q(z), estimated on the minibatch with the data set size N, by
minibatch weighted sampling (``mws``) or minibatch stratified sampling (``mss``, default); see losses.tc_terms.
Under DDP with ``gather_global_batch`` the posterior parameters of the whole global batch are gathered across
ranks, so the estimator averages over the global batch, not one rank's shard.
The reported ``kl`` part is the closed-form KL, for comparison with the other VAEs; the optimised KL is the sum
of the three estimated terms.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from workers.losses import kl_standard_normal, reconstruction_nll, tc_terms
from workers.models.base import GatherFn, LossOutput, Noise, Posterior
from workers.models.registry import register
from workers.models.vae import VAE


@register("beta_tcvae")
class BetaTCVAE(VAE):
    stochastic = True

    def loss(self, x: torch.Tensor, noise: Noise | None = None, gather: GatherFn | None = None) -> LossOutput:
        noise = self.draw_noise(x) if noise is None else noise
        posterior = self.encode(x)
        mean, logvar = posterior.mean.float(), posterior.stochastic_logvar().float()
        z = Posterior(mean=mean, logvar=logvar).reparameterise(noise["eps"])  # in float32, as the TC terms are
        recon = reconstruction_nll(self.decode_logits(z.to(posterior.mean.dtype)), x, self.config.likelihood).mean()

        batch = z.shape[0]
        self_index = None
        if gather is not None:
            # Every rank's batch has the same size (the loop drops partial batches), so this rank's rows sit at
            # rank * batch in the gathered tensors.
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
            mean_all, logvar_all = gather(mean), gather(logvar)
            self_index = rank * batch + torch.arange(batch, device=z.device)
        else:
            mean_all, logvar_all = mean, logvar
        terms = tc_terms(z, mean_all, logvar_all, self.dataset_size, self.config.effective_tc_estimator, self_index)
        mi, tc, dwkl = terms["mi"].mean(), terms["tc"].mean(), terms["dwkl"].mean()
        kl = kl_standard_normal(mean, logvar).mean().detach()
        loss = recon + mi + self.beta * tc + dwkl
        return LossOutput(loss=loss, parts={"recon": recon, "kl": kl, "mi": mi, "tc": tc, "dwkl": dwkl})
