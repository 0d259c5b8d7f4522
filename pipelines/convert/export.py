"""The backbone back out as a Hugging Face folder (config.json + model.safetensors) that transformers'
LlamaForCausalLM, Qwen2ForCausalLM or Qwen3ForCausalLM loads.

What the target cannot express is refused by name: the latent stream, q/k/v biases outside Qwen2, QK-norm
outside Qwen3, a head_dim Qwen2 has no field for. A layout other than causal is exported with a warning:
transformers runs the model causally unless it is given the matching 4D attention mask; the layout, block
options, logit shift and mask token are recorded under config.json's "mmdlm" key, which
`convert(family, folder, ...)` reads back. A logit-shifted model (Dream, Fast-dLLM v2) exports its
unshifted logits, which is what a causal LM computes: position i scores token i + 1.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings

import torch

from latent.backbone import DiffusionTransformer, rope_type
from latent.folders import atomic_folder

from .families import HF_NAMES
from .weights import ConversionError, write_safetensors

TARGETS = {  # family -> (transformers config class, architecture)
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
}


def _open(model) -> tuple[DiffusionTransformer, str | None, int | None]:
    """(backbone, tokenizer folder or None, EOS id or None) from a backbone or a backbone/pipeline folder."""
    if isinstance(model, DiffusionTransformer):
        return model, None, None
    path = os.fspath(model)
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        return DiffusionTransformer.from_pretrained(path), None, None
    eos = None
    scheduler = os.path.join(path, "scheduler", "scheduler_config.json")
    if os.path.isfile(scheduler):
        with open(scheduler) as f:
            eos = json.load(f).get("eos_token_id")
    tokenizer = os.path.join(path, "tokenizer")
    return DiffusionTransformer.from_pretrained(path, subfolder="model"), (tokenizer if os.path.isdir(tokenizer) else None), eos


def _check(c, family: str) -> None:
    refused = {
        "latent_dim": (c.latent_dim, "the continuous latent stream has no place in a causal LM"),
        "qkv_bias": (c.qkv_bias and family != "qwen2", "q/k/v biases: export as qwen2"),
        "qk_norm": (c.qk_norm != (family == "qwen3"), "QK-norm is Qwen3's (qwen3 has it, llama and qwen2 do not)"),
        "head_dim": (family == "qwen2" and c.head_dim not in (None, c.hidden_size // c.num_heads),
                     "Qwen2 has no head_dim field: export as llama or qwen3"),
    }
    for name, (bad, why) in refused.items():
        if bad:
            raise ConversionError(f"cannot export {name}={getattr(c, name)!r} as {family}: {why}.")


def hf_config(model: DiffusionTransformer, family: str, eos_token_id: int | None = None):
    """The transformers config of the exported model (with the "mmdlm" record)."""
    import transformers

    c = model.config
    head_dim = c.head_dim or c.hidden_size // c.num_heads
    scaling = dict(c.rope_scaling or {})
    kind, theta, max_positions = rope_type(scaling), c.rope_theta, c.max_position_embeddings
    extra = {k: v for k, v in scaling.items() if k not in ("rope_type", "type")}
    if kind == "ntk":  # this project's static NTK is a larger base, which any rotary expresses
        theta, kind, extra = theta * float(scaling["factor"]) ** (head_dim / (head_dim - 2)), None, {}
    if kind == "dynamic":  # transformers measures the stretch against max_position_embeddings
        max_positions = int(extra.pop("original_max_position_embeddings"))
    config_class, architecture = TARGETS[family]
    kwargs = dict(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=model.blocks[0].mlp.down.in_features,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads or c.num_heads,
        max_position_embeddings=max_positions, rms_norm_eps=c.norm_eps, tie_word_embeddings=c.tie_word_embeddings,
        rope_parameters={"rope_type": kind or "default", "rope_theta": theta, **extra},
        bos_token_id=None, eos_token_id=eos_token_id, pad_token_id=None, architectures=[architecture],
        mmdlm={k: c[k] for k in ("attention_layout", "block_size", "block_alignment", "logit_shift", "mask_token_id")},
    )
    if family != "qwen2":
        kwargs.update(head_dim=head_dim, attention_bias=False)
    return getattr(transformers, config_class)(**kwargs)


def hf_tensors(model: DiffusionTransformer, family: str) -> dict[str, torch.Tensor]:
    """Hugging Face name -> tensor (views into the backbone's parameters; fused projections split)."""
    out = {}
    for name, p in model.state_dict().items():
        sources = HF_NAMES.sources(name)
        out.update(zip(sources, p.chunk(len(sources), dim=0), strict=True))
    if family == "qwen2" and not model.config.qkv_bias:  # Qwen2 always has q/k/v biases: zeros change nothing
        for i, block in enumerate(model.blocks):
            q, kv = block.attn.q.weight, block.attn.kv.weight
            for proj, rows in (("q", q.shape[0]), ("k", kv.shape[0] // 2), ("v", kv.shape[0] // 2)):
                out[f"model.layers.{i}.self_attn.{proj}_proj.bias"] = torch.zeros(rows, dtype=q.dtype)
    return out


def export(model, dst: str, family: str = "llama", *, dtype: torch.dtype | None = None) -> list[str]:
    """Write `model` (a DiffusionTransformer, or a backbone or pipeline folder) as a Hugging Face `family`
    folder at `dst` (config.json, model.safetensors, and the pipeline's tokenizer when there is one).
    Returns the warnings it gave."""
    if family not in TARGETS:
        raise ConversionError(f"cannot export as {family!r}; choose one of {sorted(TARGETS)}.")
    model, tokenizer, eos = _open(model)
    c = model.config
    _check(c, family)
    notes = []
    if c.attention_layout != "causal":
        notes.append(
            f"the model's attention_layout is {c.attention_layout!r}, but {TARGETS[family][1]} runs causally unless "
            "given the matching 4D attention mask (docs/converting.md); the layout is recorded in config.json "
            f"under 'mmdlm' and restored by convert('{family}', ...)."
        )
    if c.logit_shift:
        notes.append("the model shifts its logits; the export gives the unshifted ones (position i scores token i + 1).")
    for note in notes:
        warnings.warn(note, UserWarning, stacklevel=2)
    with atomic_folder(dst, replaces=("config.json",)) as tmp:  # a stopped export leaves dst as it was
        hf_config(model, family, eos).save_pretrained(tmp)
        write_safetensors(os.path.join(tmp, "model.safetensors"), hf_tensors(model, family), dtype)
        if tokenizer is not None:
            for name in os.listdir(tokenizer):
                shutil.copy2(os.path.join(tokenizer, name), os.path.join(tmp, name))
    return notes
