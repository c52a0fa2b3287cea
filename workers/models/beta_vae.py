"""beta-VAE (Higgins et al. 2017): the VAE objective with weight beta on the KL term (default 4).

beta > 1 presses the posterior towards the factorised prior, trading reconstruction for disentanglement;
disentanglement_lib sweeps beta over {1, 2, 4, 6, 8, 16}.
"""

from __future__ import annotations

from workers.models.registry import register
from workers.models.vae import VAE


@register("beta_vae")
class BetaVAE(VAE):
    stochastic = True
