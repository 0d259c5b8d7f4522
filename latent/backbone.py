"""The shared diffusion backbone: a transformer read top to bottom in one file.

Pre-norm blocks with RMSNorm, rotary positions (with the rope scalings of Hugging Face configs),
grouped-query attention (optional q/k/v biases and per-head QK-norm) and a SwiGLU MLP. One forward
denoises a token canvas (logits over the vocabulary) and, when `latent_dim` is set, a stream of
continuous latents (a prediction in latent space), after optional prefix embeddings from modality
adapters. The attention layout (bidirectional, causal, block_causal, prefix) is a config choice;
docs/backbone-contract.md states the exact rules and the KV-cache semantics. The options that
checkpoints from elsewhere need (norm eps, biases, QK-norm, head_dim, logit shift, block alignment) are
config fields of this one class; pipelines/convert maps those checkpoints onto it.
"""

from __future__ import annotations

import inspect
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401 - diffusers' loader finds the base class here by name
from diffusers.utils import BaseOutput

from . import quantization as quantized
from .attention import BACKENDS, attention
from .cache import KVCache
from .config_checks import BACKBONE_RULES
from .loading import SafeModelMixin
from .masks import BLOCK_ALIGNMENTS, LAYOUTS, combine_masks, layout_mask


@dataclass
class BackboneOutput(BaseOutput):
    logits: torch.Tensor | None = None  # [B, N, V] float32
    latent_pred: torch.Tensor | None = None  # [B, M, C]
    past_key_values: KVCache | None = None
    hidden_states: torch.Tensor | None = None  # [B, S, D]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


# rope_type -> the keys its rope_scaling dict must hold (besides rope_type itself)
ROPE_SCALINGS = {
    "ntk": ("factor",),
    "linear": ("factor",),
    "dynamic": ("factor", "original_max_position_embeddings"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def rope_type(scaling: dict | None) -> str | None:
    """The scaling's kind: Hugging Face's `rope_type` (or the older `type`); None for no scaling."""
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        if kind is None and "factor" in scaling:
            raise ValueError(f"rope_scaling={scaling} names no 'rope_type'; give one of {sorted(ROPE_SCALINGS)}.")
        return None
    if kind not in ROPE_SCALINGS:
        raise ValueError(
            f"rope_scaling rope_type {kind!r} is not modelled by the backbone; it supports {sorted(ROPE_SCALINGS)}."
        )
    missing = [k for k in ROPE_SCALINGS[kind] if scaling.get(k) is None]
    if missing:
        raise ValueError(f"rope_scaling of rope_type {kind!r} needs {missing}; got {scaling}.")
    if scaling.get("partial_rotary_factor", 1.0) != 1.0 or scaling.get("attention_factor", 1.0) not in (None, 1.0):
        raise ValueError(f"rope_scaling {scaling}: partial rotary and attention factors are not modelled.")
    return kind


class Rotary(nn.Module):
    """Rotary position embedding with the scalings of Hugging Face configs (`rope_scaling["rope_type"]`):

    - "linear": positions divided by `factor`.
    - "llama3": Llama 3.1's per-frequency scaling: wavelengths longer than original/low_freq_factor are
      divided by `factor`, shorter than original/high_freq_factor kept, the band between interpolated.
    - "dynamic": NTK base raised once a call reaches past `original_max_position_embeddings` L0, to
      theta * (factor * L / L0 - factor + 1) ** (d / (d - 2)) for the call's longest position L, as
      transformers computes it (recomputed every call; cached keys keep the frequencies they were made with).
    - "ntk": this project's static NTK-aware stretch, theta * factor ** (d / (d - 2)) at every length.
    """

    def __init__(self, head_dim: int, theta: float, scaling: dict | None):
        super().__init__()
        self.kind, self.scaling, self.head_dim, self.theta = rope_type(scaling), scaling, head_dim, theta
        if self.kind == "ntk":
            theta = theta * float(scaling["factor"]) ** (head_dim / (head_dim - 2))
        inv_freq = self.frequencies(theta)
        if self.kind == "linear":
            inv_freq = inv_freq / float(scaling["factor"])
        elif self.kind == "llama3":
            inv_freq = self._llama3(inv_freq, scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _apply(self, fn, *args, **kwargs):
        # A bf16/fp16 cast of the model must not round the frequencies: at position 1000, a bf16 inv_freq
        # puts angles up to 1.2 radians off (head_dim 128). Moves (device) apply; dtype casts leave them float32.
        frequencies = self.inv_freq
        super()._apply(fn, *args, **kwargs)
        self.inv_freq = frequencies.to(self.inv_freq.device)
        return self

    def frequencies(self, theta, device=None):
        return 1.0 / theta ** (torch.arange(0, self.head_dim, 2, device=device).float() / self.head_dim)

    @staticmethod
    def _llama3(inv_freq, s):
        factor, low, high, original = (float(s[k]) for k in ROPE_SCALINGS["llama3"])
        wavelength = 2 * math.pi / inv_freq
        smooth = ((original / wavelength - low) / (high - low)).clamp(0, 1)  # 0: long waves, 1: short waves
        return (1 - smooth) * inv_freq / factor + smooth * inv_freq

    def forward(self, positions: torch.Tensor):  # [B, S] -> cos, sin [B, 1, S, d]
        inv_freq = self.inv_freq
        if self.kind == "dynamic":
            factor, original = float(self.scaling["factor"]), float(self.scaling["original_max_position_embeddings"])
            stretch = ((positions.max() + 1).float() / original).clamp(min=1.0)
            theta = self.theta * (factor * stretch - factor + 1) ** (self.head_dim / (self.head_dim - 2))
            inv_freq = self.frequencies(theta, positions.device)
        freqs = positions.float()[..., None] * inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]
        return emb.cos(), emb.sin()


def rotate(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat([-x2, x1], dim=-1) * sin).type_as(x)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, head_dim: int, backend: str, bias: bool = False,
                 qk_norm: bool = False, eps: float = 1e-6):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.backend = backend
        self.q = nn.Linear(dim, heads * head_dim, bias=bias)
        self.kv = nn.Linear(dim, 2 * kv_heads * head_dim, bias=bias)
        self.out = nn.Linear(heads * head_dim, dim, bias=False)
        # Qwen3 / SDAR: an RMSNorm over each head's query and key, before rotary.
        self.q_norm = RMSNorm(head_dim, eps) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(head_dim, eps) if qk_norm else nn.Identity()

    def forward(self, x, cos, sin, mask, cached: tuple | None, cache_position: int | None):
        b, s, _ = x.shape
        q = self.q_norm(self.q(x).view(b, s, self.heads, self.head_dim)).transpose(1, 2)
        k, v = self.kv(x).view(b, s, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = rotate(q, cos, sin), rotate(self.k_norm(k), cos, sin)
        new_kv = (k, v)
        if cached is not None:
            old_k, old_v = cached
            if cache_position is None:
                k, v = torch.cat([old_k, k], dim=2), torch.cat([old_v, v], dim=2)
            else:  # dual cache: fresh K/V of these slots replace the stale ones, in place
                old_k[:, :, cache_position : cache_position + s] = k
                old_v[:, :, cache_position : cache_position + s] = v
                k, v = old_k, old_v
            new_kv = (k, v)
        y = attention(q, k, v, mask, self.backend)
        return self.out(y.transpose(1, 2).reshape(b, s, -1)), new_kv


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, dim: int, hidden: int, eps: float, **attention_options):
        super().__init__()
        self.attn_norm = RMSNorm(dim, eps)
        self.attn = Attention(dim, eps=eps, **attention_options)
        self.mlp_norm = RMSNorm(dim, eps)
        self.mlp = SwiGLU(dim, hidden)

    def forward(self, x, cos, sin, mask, cached=None, cache_position=None):
        h, kv = self.attn(self.attn_norm(x), cos, sin, mask, cached, cache_position)
        x = x + h
        return x + self.mlp(self.mlp_norm(x)), kv


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of noise levels t in [0, 1] (any shape) -> [..., dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    args = t.float()[..., None] * 1000.0 * freqs
    return torch.cat([args.cos(), args.sin()], dim=-1)


class DiffusionTransformer(SafeModelMixin, ConfigMixin):
    """Masked-diffusion (and optionally latent-diffusion) transformer. See docs/backbone-contract.md.

    Options for checkpoints from elsewhere (defaults keep this project's own models unchanged):
    `norm_eps` for every RMSNorm (Llama and LLaDA use 1e-5), `head_dim` when it is not
    hidden_size / num_heads (Qwen3), `qkv_bias` (Qwen2), `qk_norm` (Qwen3, SDAR), `tie_word_embeddings`,
    `logit_shift` (Dream, Fast-dLLM v2: logits[i] come from the hidden state of slot i - 1) and
    `block_alignment` ("prefix": block_causal blocks start after the prefix; "start": they count from
    slot 0, as SDAR, Fast-dLLM v2 and LLaDA2 do).
    """

    config_name = "config.json"
    config_rules = BACKBONE_RULES  # checked when the config is read, before the weights
    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 512,
        num_layers: int = 8,
        num_heads: int = 8,
        num_kv_heads: int | None = None,
        intermediate_size: int | None = None,
        mask_token_id: int = 0,
        max_position_embeddings: int = 1024,
        attention_layout: str = "bidirectional",
        block_size: int = 32,
        rope_theta: float = 10000.0,
        rope_scaling: dict | None = None,
        latent_dim: int = 0,
        attention_backend: str = "auto",
        tie_word_embeddings: bool = True,
        norm_eps: float = 1e-6,
        head_dim: int | None = None,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        logit_shift: bool = False,
        block_alignment: str = "prefix",
    ):
        super().__init__()
        kv_heads = num_kv_heads or num_heads
        if num_heads % kv_heads or (head_dim is None and hidden_size % num_heads):
            raise ValueError(
                f"num_heads ({num_heads}) must be divisible by num_kv_heads ({kv_heads}), and without head_dim "
                f"hidden_size ({hidden_size}) by num_heads."
            )
        head_dim = head_dim or hidden_size // num_heads
        if head_dim % 2:
            raise ValueError(f"head size {head_dim} (head_dim, default hidden_size/num_heads) must be even (rotary).")
        if attention_layout not in LAYOUTS:
            raise ValueError(f"attention_layout={attention_layout!r} is unknown; choose one of {LAYOUTS}.")
        if block_alignment not in BLOCK_ALIGNMENTS:
            raise ValueError(f"block_alignment={block_alignment!r} is unknown; choose one of {BLOCK_ALIGNMENTS}.")
        if attention_backend not in BACKENDS:
            raise ValueError(f"attention_backend={attention_backend!r} is unknown; choose one of {BACKENDS}.")
        if not 0 <= mask_token_id < vocab_size:
            raise ValueError(f"mask_token_id={mask_token_id} must be a token id in [0, vocab_size={vocab_size}).")
        hidden = intermediate_size or 64 * math.ceil(8 * hidden_size / 3 / 64)

        self.embed = nn.Embedding(vocab_size, hidden_size)
        self.rotary = Rotary(head_dim, rope_theta, rope_scaling)
        attention_options = dict(heads=num_heads, kv_heads=kv_heads, head_dim=head_dim, backend=attention_backend,
                                 bias=qkv_bias, qk_norm=qk_norm)
        self.blocks = nn.ModuleList(Block(hidden_size, hidden, norm_eps, **attention_options) for _ in range(num_layers))
        self.norm = RMSNorm(hidden_size, norm_eps)
        # Tied output weights reuse the embedding (no second parameter: safetensors refuses shared storage).
        self.lm_head = None if tie_word_embeddings else nn.Linear(hidden_size, vocab_size, bias=False)
        if latent_dim:
            self.latent_in = nn.Linear(latent_dim, hidden_size)
            self.time_mlp = nn.Sequential(
                nn.Linear(hidden_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
            )
            self.latent_out = nn.Linear(hidden_size, latent_dim)
        self.gradient_checkpointing = False
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2 style: residual projections shrink with depth
            if name.endswith(("attn.out.weight", "mlp.down.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * num_layers))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    # ---- input assembly -------------------------------------------------------------------------
    def _embed_inputs(self, input_ids, prefix_embeds, latents, timestep):
        parts, cfg = [], self.config
        if prefix_embeds is not None:
            if prefix_embeds.ndim != 3 or prefix_embeds.shape[-1] != cfg.hidden_size:
                raise ValueError(
                    f"prefix_embeds must be [B, P, hidden_size={cfg.hidden_size}], got {tuple(prefix_embeds.shape)}."
                )
            parts.append(prefix_embeds.to(self.embed.weight.dtype))
        if input_ids is not None:
            if input_ids.dtype != torch.long or input_ids.ndim != 2:
                raise ValueError(
                    f"input_ids must be a [B, N] int64 tensor, got dtype {input_ids.dtype} and shape "
                    f"{tuple(input_ids.shape)}; use .long() and add a batch dimension."
                )
            if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= cfg.vocab_size):
                raise ValueError(f"input_ids hold ids outside [0, vocab_size={cfg.vocab_size}).")
            parts.append(self.embed(input_ids))
        if latents is not None:
            if not cfg.latent_dim:
                raise ValueError("latents were given but the model has latent_dim=0; set latent_dim in its config.")
            if latents.ndim != 3 or latents.shape[-1] != cfg.latent_dim:
                raise ValueError(f"latents must be [B, M, latent_dim={cfg.latent_dim}], got {tuple(latents.shape)}.")
            if timestep is None:
                raise ValueError("timestep is required with latents: a [B] or [B, M] noise level in [0, 1].")
            t = torch.as_tensor(timestep, device=latents.device, dtype=torch.float32)
            t = t.expand(latents.shape[0]) if t.ndim == 0 else t
            t = t[:, None].expand(-1, latents.shape[1]) if t.ndim == 1 else t
            if t.shape != latents.shape[:2]:
                raise ValueError(f"timestep must be [B] or [B, M]={tuple(latents.shape[:2])}, got {tuple(t.shape)}.")
            temb = self.time_mlp(timestep_embedding(t, cfg.hidden_size).to(latents.dtype))
            parts.append(self.latent_in(latents.to(self.latent_in.weight.dtype)) + temb.to(self.latent_in.weight.dtype))
        if not parts:
            raise ValueError("Give at least one of input_ids, prefix_embeds or latents.")
        batch = {p.shape[0] for p in parts}
        if len(batch) != 1:
            raise ValueError(f"prefix_embeds, input_ids and latents disagree on batch size: {sorted(batch)}.")
        return torch.cat(parts, dim=1)

    def _positions(self, position_ids, slots, n_prefix, n_tokens, batch):
        default = slots[None].expand(batch, -1)
        if position_ids is None:
            return default
        if position_ids.ndim == 1:
            position_ids = position_ids[None]
        if position_ids.shape[-1] == slots.numel():
            return position_ids.expand(batch, -1)
        if position_ids.shape[-1] == n_tokens:
            pos = default.clone()
            pos[:, n_prefix : n_prefix + n_tokens] = position_ids
            return pos
        raise ValueError(
            f"position_ids must be [B, {n_tokens}] (tokens) or [B, {slots.numel()}] (all new slots), "
            f"got {tuple(position_ids.shape)}."
        )

    def _mask(self, attention_mask, query_slots, num_keys, batch, n_prefix, n_tokens, prefix_length, cache, cache_position):
        cfg = self.config
        n_new = query_slots.numel()
        if attention_mask is not None and attention_mask.ndim == 4:
            want = (num_keys, n_new)
            if attention_mask.shape[-2:] != (n_new, num_keys) or attention_mask.shape[0] not in (1, batch):
                raise ValueError(
                    f"A 4D attention_mask must be [B, 1, {want[1]}, {want[0]}] (queries x keys), "
                    f"got {tuple(attention_mask.shape)}."
                )
            if attention_mask.dtype == torch.bool:
                return attention_mask, None
            return attention_mask > -1e4, None  # additive float mask: 0 keeps, large negative drops
        keep = None
        if attention_mask is not None:
            if attention_mask.ndim != 2 or attention_mask.shape[0] != batch:
                raise ValueError(
                    f"attention_mask must be [B={batch}, {n_new}] (1 = keep) or 4D, got {tuple(attention_mask.shape)}."
                )
            keep = attention_mask.bool()
            n_latent = n_new - n_prefix - n_tokens
            # Accept a mask over all new slots, over prefix + tokens, or over the tokens alone;
            # slots it does not cover (prefix embeddings, latents) are always valid.
            if keep.shape[1] == n_tokens:
                keep = torch.cat([keep.new_ones(batch, n_prefix), keep], dim=1)
            if keep.shape[1] == n_prefix + n_tokens:
                keep = torch.cat([keep, keep.new_ones(batch, n_latent)], dim=1)
            if keep.shape[1] != n_new:
                raise ValueError(
                    f"attention_mask covers {attention_mask.shape[1]} slots; give [B, {n_tokens}] (tokens) or "
                    f"[B, {n_new}] (prefix + tokens + latents)."
                )
        if cache is not None:
            old = cache.key_mask
            if keep is None:
                keep = torch.ones(batch, n_new, dtype=torch.bool, device=query_slots.device)
            if cache_position is None:
                keep = torch.cat([old, keep], dim=1)
            else:
                old[:, cache_position : cache_position + n_new] = keep
                keep = old
        if prefix_length is None:
            prefix_length = n_prefix
        layout = layout_mask(cfg.attention_layout, query_slots, num_keys, batch, prefix_length, cfg.block_size,
                             cfg.block_alignment)
        return combine_masks(layout, keep, query_slots), keep

    # ---- forward --------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        latents: torch.Tensor | None = None,
        timestep: torch.Tensor | None = None,
        prefix_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        prefix_length: int | torch.Tensor | None = None,
        cache_position: int | None = None,
        logits_positions: torch.Tensor | None = None,
        return_dict: bool = True,
        **unknown,
    ) -> BackboneOutput:
        if unknown:  # a misspelt keyword would otherwise be ignored without a word
            accepted = [p for p in inspect.signature(type(self).forward).parameters if p not in ("self", "unknown")]
            raise TypeError(
                f"DiffusionTransformer.forward got unknown keyword argument(s) {sorted(unknown)}; it accepts "
                f"{', '.join(accepted)}."
            )
        cfg = self.config
        x = self._embed_inputs(input_ids, prefix_embeds, latents, timestep)
        batch, n_new, _ = x.shape
        n_prefix = 0 if prefix_embeds is None else prefix_embeds.shape[1]
        n_tokens = 0 if input_ids is None else input_ids.shape[1]
        cached = past_key_values.length if past_key_values is not None else 0
        if past_key_values is not None and past_key_values.batch_size != batch:
            raise ValueError(f"past_key_values hold {past_key_values.batch_size} rows; inputs have {batch}.")
        if cache_position is not None:
            if past_key_values is None or not 0 <= cache_position <= cached - n_new:
                raise ValueError(
                    f"cache_position={cache_position} needs past_key_values covering slots "
                    f"[{cache_position}, {cache_position + n_new}); the cache has {cached}."
                )
            start, num_keys = cache_position, cached
        else:
            start, num_keys = cached, cached + n_new
        slots = torch.arange(start, start + n_new, device=x.device)
        positions = self._positions(position_ids, slots, n_prefix, n_tokens, batch)
        # The context limit is on rotary positions (BD3-LM training feeds 2N slots at positions 0..N-1).
        longest = max(num_keys, 0) if position_ids is None else int(positions.max()) + 1
        if longest > cfg.max_position_embeddings:
            raise ValueError(
                f"The sequence reaches position {longest} (cache + prefix + tokens + latents) but the model's "
                f"context is max_position_embeddings={cfg.max_position_embeddings}; shorten the prompt or gen_length."
            )
        mask, key_mask = self._mask(
            attention_mask, slots, num_keys, batch, n_prefix, n_tokens, prefix_length, past_key_values, cache_position
        )
        cos, sin = self.rotary(positions)

        new_keys, new_values = [], []
        for i, block in enumerate(self.blocks):
            layer_cache = None if past_key_values is None else (past_key_values.keys[i], past_key_values.values[i])
            if self.gradient_checkpointing and self.training:
                x, (k, v) = torch.utils.checkpoint.checkpoint(
                    block, x, cos, sin, mask, layer_cache, cache_position, use_reentrant=False
                )
            else:
                x, (k, v) = block(x, cos, sin, mask, layer_cache, cache_position)
            new_keys.append(k)
            new_values.append(v)
        h = self.norm(x)

        logits = None
        if n_tokens:
            h_tok = h[:, n_prefix : n_prefix + n_tokens]
            if cfg.logit_shift:
                h_tok = self._shifted(h_tok, h, n_prefix, past_key_values, start)
            if logits_positions is not None:  # [B, n] token positions of this call: only their logits
                h_tok = h_tok.gather(1, logits_positions[..., None].expand(-1, -1, h_tok.shape[-1]))
            logits = (F.linear(h_tok, self.embed.weight) if self.lm_head is None else self.lm_head(h_tok)).float()
        latent_pred = self.latent_out(h[:, n_prefix + n_tokens :]) if latents is not None else None
        cache = None
        if use_cache or cache_position is not None:
            if key_mask is None:
                key_mask = torch.ones(batch, num_keys, dtype=torch.bool, device=x.device)
            hidden = self._cached_hidden(h, past_key_values, cache_position) if cfg.logit_shift else None
            cache = KVCache(new_keys, new_values, key_mask, hidden)
        out = BackboneOutput(logits=logits, latent_pred=latent_pred, past_key_values=cache, hidden_states=h)
        return out if return_dict else out.to_tuple()

    # ---- logit shift (Dream, Fast-dLLM v2) ------------------------------------------------------
    @staticmethod
    def _shifted(h_tok, h, n_prefix, cache, start):
        """Hidden states predicting each token: slot i - 1's. The first token takes the slot before it (the
        last prefix slot, or the cache's last hidden state before this call's slots), and its own when no
        slot precedes it, as Dream's decoding does at position 0."""
        if n_prefix:
            before = h[:, n_prefix - 1 : n_prefix]
        elif cache is not None and cache.hidden is not None and start > 0:
            before = cache.hidden[:, start - 1 : start].to(h_tok.dtype)
        else:
            before = h_tok[:, :1]
        return torch.cat([before, h_tok[:, :-1]], dim=1)

    @staticmethod
    def _cached_hidden(h, cache, cache_position):
        """The final hidden states of every cached slot, kept so a later call can shift its first logit."""
        if cache is None or cache.hidden is None:
            return h if cache is None else None  # a cache without them cannot be completed
        old = cache.hidden
        if cache_position is None:
            return torch.cat([old, h], dim=1)
        old[:, cache_position : cache_position + h.shape[1]] = h
        return old

    def set_attention_backend(self, backend: str) -> None:
        """Run every attention layer on `backend` (one of latent.attention.BACKENDS) from now on, e.g. to
        compare xformers with SDPA on one loaded model; the config records it, so a save keeps it."""
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is unknown; choose one of {BACKENDS}.")
        for block in self.blocks:
            block.attn.backend = backend
        self.register_to_config(attention_backend=backend)

    # ---- safe loading ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, quantization: str | dict | None = None, **kwargs):
        """Load from a local folder of safetensors weights; pickled checkpoints are refused.

        A folder written from a quantized backbone (with quantization.json) loads quantized as it was saved.
        `quantization` ("int8", "int4", or a dict of `latent.quantization.quantize_backbone` arguments)
        quantizes a full-precision folder's weights after loading."""
        path = os.fspath(pretrained_model_name_or_path)
        sub = kwargs.get("subfolder") or ""
        folder = os.path.join(path, sub)
        if not os.path.isdir(folder):
            raise ValueError(f"{folder!r} is not a folder; give a directory written by save_pretrained().")
        names = os.listdir(folder)
        if not any(n.endswith(".safetensors") or n.endswith(".safetensors.index.json") for n in names):
            pickled = [n for n in names if n.endswith((".bin", ".pt", ".pth", ".ckpt"))]
            hint = f" It holds pickled weights {pickled}, which are never loaded (they can run code)." if pickled else ""
            raise ValueError(f"No safetensors weights in {folder!r}.{hint} Convert them to safetensors first.")
        if quantized.is_quantized_folder(folder):
            if quantization is not None:
                raise ValueError(f"{folder!r} is already quantized; load it without `quantization`, or quantize "
                                 "the full-precision folder it was made from.")
            return quantized.load_quantized(cls, folder, kwargs.get("torch_dtype"), kwargs.get("device_map"))
        kwargs["use_safetensors"] = True
        kwargs.setdefault("local_files_only", True)
        try:
            model = super().from_pretrained(path, **kwargs)
        except (OSError, RuntimeError, ValueError) as err:
            if "safetensors" in str(err).lower() or "header" in str(err).lower():
                raise ValueError(f"The safetensors weights in {folder!r} are corrupt or truncated: {err}") from err
            raise
        return model if quantization is None else quantized.quantize_with(model, quantization)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """diffusers' `save_pretrained`; a quantized backbone writes its integers and scales as plain
        safetensors instead (`latent.quantization.save_quantized`)."""
        if quantized.quantization_of(self) is None:
            return super().save_pretrained(save_directory, *args, **kwargs)
        quantized.save_quantized(self, save_directory)
