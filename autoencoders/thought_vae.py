"""LaDiR-style thought VAE: one reasoning step (a short text) <-> k latent thought tokens.

::

    step ids [B, L] --embed--> transformer over [k queries ; L tokens] --> mu, logvar [B, k, C]
    z = mu + sigma * eps  (mu at evaluation)
    z --> transformer over [k latents ; L position queries] --> logits [B, L, V]   (one parallel pass)

Loss: reconstruction cross-entropy of every position (EOS/padding included, so the length is
recovered) plus ``beta`` times the KL divergence of ``N(mu, sigma^2)`` from ``N(0, I)`` (summed over
channels, averaged over thought tokens). ``config.scaling_factor`` (set after training to the inverse
standard deviation of ``mu``, as latent image models do) brings the thoughts to unit scale for the
diffusion backbone: ``diffusion latents = scaling_factor * mu``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401 - diffusers' pipeline loader looks it up here
from diffusers.utils import BaseOutput

from latent.config_checks import FINITE_NON_NEGATIVE, FINITE_POSITIVE, NON_NEGATIVE, POSITIVE
from latent.loading import SafeModelMixin

from .compressor import ParallelDecoder, _layer

__all__ = ["ThoughtVAE", "ThoughtVAEOutput"]


@dataclass
class ThoughtVAEOutput(BaseOutput):
    """``loss = ce + beta * kl``; ``kl``: nats per thought token; ``accuracy``: token accuracy over the
    non-padding positions; ``exact``: fraction of steps reconstructed exactly."""

    loss: torch.Tensor | None = None
    ce: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    accuracy: float | None = None
    exact: float | None = None
    mu: torch.Tensor | None = None
    logvar: torch.Tensor | None = None
    logits: torch.Tensor | None = None


class ThoughtVAE(SafeModelMixin, ConfigMixin):
    """Encode a reasoning step into ``num_latents`` thought tokens of ``latent_dim`` channels and back."""

    config_name = "config.json"
    config_rules = {
        **{k: POSITIVE for k in ("vocab_size", "max_length", "num_latents", "latent_dim", "hidden_size", "num_layers",
                                 "num_heads")},
        "pad_token_id": NON_NEGATIVE, "beta": FINITE_NON_NEGATIVE, "scaling_factor": FINITE_POSITIVE,
    }

    @register_to_config
    def __init__(
        self,
        vocab_size: int = 32,
        max_length: int = 12,
        num_latents: int = 4,
        latent_dim: int = 16,
        hidden_size: int = 128,
        num_layers: int = 2,
        num_heads: int = 4,
        pad_token_id: int = 0,
        beta: float = 1e-3,
        scaling_factor: float = 1.0,
    ):
        super().__init__()
        d = hidden_size
        self.embed = nn.Embedding(vocab_size, d)
        self.pos = nn.Parameter(torch.randn(max_length, d) * 0.02)
        self.queries = nn.Parameter(torch.randn(num_latents, d) * 0.02)
        self.encoder = nn.TransformerEncoder(_layer(d, num_heads), num_layers, enable_nested_tensor=False)
        self.enc_norm = nn.LayerNorm(d)
        self.to_stats = nn.Linear(d, 2 * latent_dim)
        self.decoder = ParallelDecoder(latent_dim, num_latents, max_length, d, num_layers, num_heads)
        self.head = nn.Linear(d, vocab_size)

    def _check_ids(self, input_ids):
        L, V = self.config.max_length, self.config.vocab_size
        if input_ids.ndim != 2 or input_ids.shape[1] != L:
            raise ValueError(f"input_ids must be [B, max_length={L}], got {tuple(input_ids.shape)}.")
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= V):
            raise ValueError(f"input_ids hold ids outside [0, vocab_size={V}).")
        return input_ids.to(self.pos.device)

    def encode(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Step ids ``[B, max_length]`` -> ``(mu, logvar)``, each ``[B, num_latents, latent_dim]``."""
        input_ids = self._check_ids(input_ids)
        B, k = input_ids.shape[0], self.config.num_latents
        x = torch.cat([self.queries.expand(B, -1, -1), self.embed(input_ids) + self.pos], dim=1)
        pad = torch.cat([torch.zeros(B, k, dtype=torch.bool, device=x.device), input_ids == self.config.pad_token_id], 1)
        h = self.enc_norm(self.encoder(x, src_key_padding_mask=pad)[:, :k])
        mu, logvar = self.to_stats(h).chunk(2, dim=-1)
        return mu, logvar.clamp(-12.0, 6.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Thought latents ``[B, num_latents, latent_dim]`` (unscaled) -> logits ``[B, max_length, V]``."""
        from latent.continuous import check_finite

        want = (self.config.num_latents, self.config.latent_dim)
        if z.ndim != 3 or tuple(z.shape[1:]) != want:
            raise ValueError(f"thought latents must be [B, {want[0]}, latent_dim={want[1]}], got {tuple(z.shape)}.")
        check_finite(z, "thought latents")
        return self.head(self.decoder(z.to(self.pos.dtype)))

    @torch.no_grad()
    def decode_ids(self, z: torch.Tensor) -> torch.Tensor:
        return self.decode(z).argmax(-1)

    def forward(self, input_ids, sample: bool | None = None, generator=None, beta: float | None = None):
        return self.loss(input_ids, sample=sample, generator=generator, beta=beta)

    def loss(self, input_ids, sample: bool | None = None, generator: torch.Generator | None = None,
             beta: float | None = None, noise: torch.Tensor | None = None) -> ThoughtVAEOutput:
        """CE + beta * KL. ``sample`` (default: in training mode) draws z from the posterior, else z = mu;
        ``noise`` ``[B, k, C]``: the Gaussian draw of that sample made by the caller instead of ``generator``."""
        input_ids = self._check_ids(input_ids)
        beta = self.config.beta if beta is None else beta
        mu, logvar = self.encode(input_ids)
        sample = self.training if sample is None else sample
        z = mu
        if sample:
            eps = noise if noise is not None else torch.randn(mu.shape, generator=generator)
            z = mu + (0.5 * logvar).exp() * eps.to(mu.device)
        logits = self.decode(z)
        ce = F.cross_entropy(logits.transpose(1, 2), input_ids)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1).mean()
        with torch.no_grad():
            real = input_ids != self.config.pad_token_id
            hit = logits.argmax(-1) == input_ids
            acc = float(hit[real].float().mean()) if bool(real.any()) else float("nan")
            exact = float(hit.all(-1).float().mean())
        return ThoughtVAEOutput(loss=ce + beta * kl, ce=ce, kl=kl, accuracy=acc, exact=exact, mu=mu, logvar=logvar,
                                logits=logits)

    # ---- diffusion scale -------------------------------------------------------------------------
    @torch.no_grad()
    def to_diffusion(self, input_ids) -> torch.Tensor:
        """Clean diffusion latents of steps: ``scaling_factor * mu``."""
        return self.encode(input_ids)[0] * self.config.scaling_factor

    @torch.no_grad()
    def from_diffusion(self, latents: torch.Tensor) -> torch.Tensor:
        """Token ids of the steps that diffusion latents decode to."""
        return self.decode_ids(latents / self.config.scaling_factor)

    @torch.no_grad()
    def fit_scaling_factor(self, input_ids) -> float:
        """Set ``config.scaling_factor`` to ``1 / std(mu)`` over these steps and return it."""
        sf = float(1.0 / self.encode(input_ids)[0].std().clamp(min=1e-6))
        self.register_to_config(scaling_factor=sf)
        return sf
