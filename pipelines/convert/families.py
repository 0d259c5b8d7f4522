"""Checkpoint families: which config.json they come with, how its fields become backbone options, which
fields are refused, and how their tensor names map onto the backbone's.

Facts per family (checked against transformers' Llama/Qwen2/Qwen3 modeling code and the families' public
modeling and generation code):

| family | names | backbone options | decoding defaults |
|---|---|---|---|
| llama | Llama | causal (an AR base) | no mask token: one is added |
| qwen2 | Llama + q/k/v biases | causal, qkv_bias | no mask token: one is added |
| qwen3 | Llama + q_norm/k_norm, head_dim | causal, qk_norm | no mask token: one is added |
| dream | Qwen2 | bidirectional, logit_shift | mask 151666 |
| fast_dllm_v2 | Qwen2 | block_causal from slot 0, block 32, logit_shift | mask 151665 |
| sdar | Qwen3 | block_causal from slot 0, block 4 (config block_size) | mask 151669 |
| llada | LLaDA native (model.transformer.*) | bidirectional | mask 126336, EOS 126081, EoT 126348 |
"""

from __future__ import annotations

from dataclasses import dataclass, field

from latent.backbone import rope_type

from .weights import ConversionError

# ---- tensor names ---------------------------------------------------------------------------------
# Backbone name -> source name(s); several sources are concatenated along dim 0 into one fused
# projection (k|v into attn.kv, gate|up into mlp.gate_up). Only names the built backbone has are used, so
# biases and QK-norm weights map only when their option is on.
HF_TOP = {"embed.weight": ("model.embed_tokens.weight",), "norm.weight": ("model.norm.weight",),
          "lm_head.weight": ("lm_head.weight",)}
HF_LAYER = {
    "attn_norm.weight": ("input_layernorm.weight",),
    "attn.q.weight": ("self_attn.q_proj.weight",),
    "attn.q.bias": ("self_attn.q_proj.bias",),
    "attn.kv.weight": ("self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "attn.kv.bias": ("self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    "attn.q_norm.weight": ("self_attn.q_norm.weight",),
    "attn.k_norm.weight": ("self_attn.k_norm.weight",),
    "attn.out.weight": ("self_attn.o_proj.weight",),
    "mlp_norm.weight": ("post_attention_layernorm.weight",),
    "mlp.gate_up.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "mlp.down.weight": ("mlp.down_proj.weight",),
}
LLADA_TOP = {"embed.weight": ("model.transformer.wte.weight",), "norm.weight": ("model.transformer.ln_f.weight",),
             "lm_head.weight": ("model.transformer.ff_out.weight",)}
LLADA_LAYER = {
    "attn_norm.weight": ("attn_norm.weight",),
    "attn.q.weight": ("q_proj.weight",),
    "attn.q.bias": ("q_proj.bias",),
    "attn.kv.weight": ("k_proj.weight", "v_proj.weight"),
    "attn.kv.bias": ("k_proj.bias", "v_proj.bias"),
    "attn.out.weight": ("attn_out.weight",),
    "mlp_norm.weight": ("ff_norm.weight",),
    "mlp.gate_up.weight": ("ff_proj.weight", "up_proj.weight"),  # LLaDA's ff_proj is the gate
    "mlp.down.weight": ("ff_out.weight",),  # a block's ff_out is the down projection
}


@dataclass(frozen=True)
class Names:
    top: dict[str, tuple[str, ...]]
    layer: dict[str, tuple[str, ...]]
    layer_prefix: str  # the source prefix of layer i, with {i}
    ignored: tuple[str, ...] = ("rotary_emb.inv_freq",)  # buffers some checkpoints saved: suffixes to skip

    def sources(self, ours: str) -> tuple[str, ...]:
        if ours in self.top:
            return self.top[ours]
        _, i, rest = ours.split(".", 2)  # blocks.{i}.{rest}
        if not ours.startswith("blocks.") or rest not in self.layer:
            raise ConversionError(f"backbone parameter {ours!r} has no source name in this family.")
        return tuple(self.layer_prefix.format(i=i) + s for s in self.layer[rest])


HF_NAMES = Names(HF_TOP, HF_LAYER, "model.layers.{i}.")
LLADA_NAMES = Names(LLADA_TOP, LLADA_LAYER, "model.transformer.blocks.{i}.")

# ---- config fields --------------------------------------------------------------------------------
# Fields that change nothing the backbone computes (training, serving and bookkeeping settings).
HARMLESS = {
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "_name_or_path", "auto_map",
    "use_cache", "initializer_range", "bos_token_id", "pad_token_id", "attention_dropout", "output_attentions",
    "output_hidden_states", "return_dict", "tokenizer_class", "id2label", "label2id", "problem_type",
    "chunk_size_feed_forward", "pretraining_tp", "max_window_layers", "sliding_window", "attn_implementation",
    "debug", "fuse_cross_entropy", "micro_forward", "skip_checkpoint", "use_deepep", "ep_size", "mmdlm",
}
LLADA_HARMLESS = HARMLESS | {
    "alibi_bias_max", "embedding_dropout", "residual_dropout", "flash_attention", "flash_attn_varlen",
    "init_cutoff_factor", "init_device", "init_fn", "init_std", "precision", "attention_layer_norm_with_affine",
    "rope_full_precision", "mlp_ratio", "multi_query_attention",
}
# field -> (accepted values, what the backbone would have to model otherwise)
HF_REFUSED = {
    "hidden_act": (("silu",), "an MLP other than SwiGLU with a SiLU gate"),
    "attention_bias": ((False,), "a bias on o_proj (and on q/k/v for Llama and Qwen3)"),
    "mlp_bias": ((False,), "biases in the MLP"),
    "use_sliding_window": ((False,), "sliding-window attention"),
    "quantization_config": ((None,), "quantised weights (dequantise and save them in bf16 or fp32 first)"),
    "partial_rotary_factor": ((1, 1.0), "rotary embedding on part of each head"),
}
LLADA_REFUSED = {
    "include_bias": ((False,), "biases on every linear layer"),
    "attention_layer_norm": ((False,), "a LayerNorm over all of q and k (QK-norm here is per head)"),
    "block_group_size": ((1,), "grouped blocks (block_group_size > 1)"),
    "block_type": (("llama",), "blocks other than LLaDA's llama block"),
    "activation_type": (("silu",), "an MLP other than SwiGLU (the llama block with SiLU)"),
    "layer_norm_type": (("rms",), "norms other than RMSNorm"),
    "layer_norm_with_affine": ((True,), "norms without a weight"),
    "bias_for_layer_norm": ((False, None), "biases in the norms"),
    "alibi": ((False,), "ALiBi position biases"),
    "rope": ((True,), "attention without rotary positions"),
    "scale_logits": ((False,), "logits scaled by 1/sqrt(d_model)"),
    "input_emb_norm": ((False,), "embeddings scaled by sqrt(d_model)"),
    "clip_qkv": ((None,), "clipping of q, k and v"),
}

# model_type or architecture (lower case) -> what the backbone lacks for it
UNMAPPABLE = {
    "gpt2": "GPT-2 has learned absolute position embeddings (wpe), LayerNorm with biases, a GELU MLP without a "
            "gate and fused Conv1D projections (c_attn); the backbone has rotary positions, RMSNorm and SwiGLU",
    "llada2_moe": "LLaDA2 is a mixture-of-experts model; the backbone has one dense SwiGLU MLP per block",
    "bailing_moe": "LLaDA2 (Bailing MoE) is a mixture-of-experts model; the backbone has one dense MLP per block",
    "diffusion_gemma": "DiffusionGemma uses Gemma blocks (norms scaled by 1 + weight, a GELU-tanh MLP, embeddings "
                       "scaled by sqrt(hidden_size), sliding-window layers, logit soft-capping) and a vision tower",
    "mdlm": "MDLM's DiT conditions every block on the noise level (adaLN modulation) and uses LayerNorm and a GELU "
            "MLP; the backbone has neither adaLN nor LayerNorm",
    "bd3lm": "BD3-LM's DiT conditions every block on the noise level (adaLN modulation) and uses LayerNorm and a "
             "GELU MLP; the backbone has neither adaLN nor LayerNorm",
}
MOE_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size", "num_experts_per_tok")


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # config.json model_type values of the family
    names: Names = HF_NAMES
    options: dict = field(default_factory=dict)  # backbone options the family always has
    layout: dict = field(default_factory=lambda: {"attention_layout": "causal"})  # attention layout defaults
    mask_token_id: int | None = None  # None: an autoregressive base, which has no mask token
    eos_token_id: int | None = None
    eot_token_id: int | None = None

    @property
    def is_diffusion(self) -> bool:
        return self.mask_token_id is not None

    def backbone_config(self, cfg: dict, allow_unknown: bool = False) -> dict:
        """Backbone options from a config.json (refused and unknown fields raise ConversionError)."""
        refuse_unmappable(cfg)
        model_type = cfg.get("model_type")
        if model_type not in self.model_types:
            other = next((f.name for f in FAMILIES.values() if model_type in f.model_types), None)
            hint = f"; it is a {other!r} checkpoint (--from {other})" if other else ""
            raise ConversionError(
                f"config.json has model_type {model_type!r}, not one of the {self.name!r} family's "
                f"{list(self.model_types)}{hint}."
            )
        if self.names is LLADA_NAMES:
            read, kwargs = llada_config(cfg)
            check_fields(cfg, LLADA_REFUSED, LLADA_HARMLESS | read, allow_unknown)
        else:
            read, kwargs = hf_config(cfg)
            check_fields(cfg, HF_REFUSED, HARMLESS | read, allow_unknown)
        layout = dict(self.layout)
        block = cfg.get("block_size", cfg.get("bd_size"))  # SDAR, Fast-dLLM v2 record their block size
        if block is not None and layout.get("attention_layout") == "block_causal":
            layout["block_size"] = int(block)
        return {**kwargs, **self.options, **layout, **saved_layout(cfg)}


def _get(cfg: dict, key: str, default=None, required: bool = False):
    if cfg.get(key) is None:
        if required:
            raise ConversionError(f"config.json lacks {key!r}, which the backbone needs.")
        return default
    return cfg[key]


def refuse_unmappable(cfg: dict) -> None:
    """Raise for architectures the backbone does not model, naming what is missing."""
    kinds = [str(k).lower().replace("_", "") for k in [cfg.get("model_type"), *(cfg.get("architectures") or [])] if k]
    for key, why in UNMAPPABLE.items():
        if any(k.startswith(key.replace("_", "")) for k in kinds):
            raise ConversionError(f"config.json describes {cfg.get('architectures') or cfg.get('model_type')}: {why}.")
    moe = [k for k in MOE_FIELDS if cfg.get(k)]
    if moe:
        raise ConversionError(
            f"config.json sets {moe}: a mixture-of-experts model; the backbone has one dense SwiGLU MLP per block."
        )


def check_fields(cfg: dict, refused: dict, known: set, allow_unknown: bool) -> None:
    for key, (accepted, what) in refused.items():
        if key in cfg and cfg[key] not in accepted:
            raise ConversionError(f"config.json sets {key}={cfg[key]!r}: the backbone does not model {what}.")
    layers = cfg.get("layer_types")
    if layers and any(t != "full_attention" for t in layers):
        raise ConversionError(
            f"config.json layer_types has {sorted(set(layers) - {'full_attention'})}: the backbone does not model "
            "sliding-window attention."
        )
    unknown = sorted(set(cfg) - known - set(refused) - {"layer_types"})
    if unknown and not allow_unknown:
        raise ConversionError(
            f"config.json has field(s) {unknown} that this converter does not know; they may change the "
            "architecture. Check them, then pass allow_unknown_config=True (--allow-unknown-config) to convert."
        )


def hf_rope(cfg: dict) -> tuple[float, dict | None]:
    """rope_theta and rope_scaling from transformers 4 (rope_theta, rope_scaling) or 5 (rope_parameters)."""
    params = cfg.get("rope_parameters") or {}
    if any(isinstance(v, dict) for v in params.values()):
        raise ConversionError("config.json rope_parameters differ per layer type; the backbone has one rotary.")
    theta = float(_get(cfg, "rope_theta", params.get("rope_theta", 10000.0)))
    scaling = cfg.get("rope_scaling") or {k: v for k, v in params.items() if k != "rope_theta"}
    kind = scaling.get("rope_type", scaling.get("type")) if scaling else None
    if kind in (None, "default"):
        return theta, None
    scaling = {"rope_type": kind, **{k: v for k, v in scaling.items() if k not in ("type", "rope_type")}}
    if kind == "dynamic":  # transformers measures the stretch against max_position_embeddings
        scaling.setdefault("original_max_position_embeddings", _get(cfg, "max_position_embeddings", required=True))
    if kind == "ntk":
        raise ConversionError("config.json rope_scaling 'ntk' is this project's own; Hugging Face's NTK is 'dynamic'.")
    try:
        rope_type(scaling)
    except ValueError as err:
        raise ConversionError(f"config.json rope_scaling: {err}") from None
    return theta, scaling


def hf_config(cfg: dict) -> tuple[set, dict]:
    """(fields read, backbone options) of a Llama/Qwen2/Qwen3-style config."""
    heads = _get(cfg, "num_attention_heads", required=True)
    hidden = _get(cfg, "hidden_size", required=True)
    theta, scaling = hf_rope(cfg)
    max_positions = _get(cfg, "max_position_embeddings", required=True)
    if scaling and scaling["rope_type"] == "dynamic":  # dynamic NTK exists to run past the original length
        max_positions = int(max_positions * float(scaling["factor"]))
    head_dim = _get(cfg, "head_dim")
    kwargs = dict(
        vocab_size=_get(cfg, "vocab_size", required=True), hidden_size=hidden,
        num_layers=_get(cfg, "num_hidden_layers", required=True), num_heads=heads,
        num_kv_heads=_get(cfg, "num_key_value_heads", heads), intermediate_size=_get(cfg, "intermediate_size", required=True),
        head_dim=None if head_dim in (None, hidden // heads) else head_dim,
        norm_eps=float(_get(cfg, "rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
        max_position_embeddings=max_positions, tie_word_embeddings=_get(cfg, "tie_word_embeddings"),
    )
    read = {"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "intermediate_size", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
            "max_position_embeddings", "tie_word_embeddings", "mask_token_id", "eos_token_id", "block_size", "bd_size"}
    return read, kwargs


def llada_config(cfg: dict) -> tuple[set, dict]:
    """(fields read, backbone options) of a native LLaDA config."""
    d, heads = _get(cfg, "d_model", required=True), _get(cfg, "n_heads", required=True)
    kv_heads = cfg.get("n_kv_heads") or (1 if cfg.get("multi_query_attention") else heads)
    kwargs = dict(
        vocab_size=_get(cfg, "embedding_size", _get(cfg, "vocab_size", required=True)), hidden_size=d,
        num_layers=_get(cfg, "n_layers", required=True), num_heads=heads, num_kv_heads=kv_heads,
        intermediate_size=_get(cfg, "mlp_hidden_size", _get(cfg, "mlp_ratio", 4) * d),
        norm_eps=float(_get(cfg, "rms_norm_eps", 1e-5)), rope_theta=float(_get(cfg, "rope_theta", 10000.0)),
        max_position_embeddings=_get(cfg, "max_sequence_length", 4096),
        tie_word_embeddings=bool(_get(cfg, "weight_tying", False)), qkv_bias=bool(_get(cfg, "include_qkv_bias", False)),
    )
    read = {"d_model", "n_heads", "n_kv_heads", "n_layers", "mlp_hidden_size", "vocab_size", "embedding_size",
            "rms_norm_eps", "rope_theta", "max_sequence_length", "weight_tying", "include_qkv_bias", "mask_token_id",
            "eos_token_id"}
    return read, kwargs


def saved_layout(cfg: dict) -> dict:
    """The layout options an export from this project recorded under config.json's "mmdlm" key."""
    saved = cfg.get("mmdlm") or {}
    return {k: saved[k] for k in ("attention_layout", "block_size", "block_alignment", "logit_shift") if k in saved}


QWEN_EOS, QWEN_EOT = 151643, 151645  # <|endoftext|>, <|im_end|>
FAMILIES: dict[str, Family] = {
    "llama": Family("llama", ("llama",)),
    "qwen2": Family("qwen2", ("qwen2",), options={"qkv_bias": True}),
    "qwen3": Family("qwen3", ("qwen3",), options={"qk_norm": True}),
    "dream": Family(
        "dream", ("Dream", "dream"), options={"qkv_bias": True, "logit_shift": True},
        layout={"attention_layout": "bidirectional"}, mask_token_id=151666, eos_token_id=QWEN_EOS,
        eot_token_id=QWEN_EOT,
    ),
    "fast_dllm_v2": Family(
        "fast_dllm_v2", ("Fast_dLLM_Qwen",), options={"qkv_bias": True, "logit_shift": True},
        layout={"attention_layout": "block_causal", "block_size": 32, "block_alignment": "start"},
        mask_token_id=151665, eos_token_id=QWEN_EOS, eot_token_id=QWEN_EOT,
    ),
    "sdar": Family(
        "sdar", ("sdar",), options={"qk_norm": True},
        layout={"attention_layout": "block_causal", "block_size": 4, "block_alignment": "start"},
        mask_token_id=151669, eos_token_id=QWEN_EOS, eot_token_id=QWEN_EOT,
    ),
    "llada": Family(
        "llada", ("llada",), names=LLADA_NAMES, layout={"attention_layout": "bidirectional"},
        mask_token_id=126336, eos_token_id=126081, eot_token_id=126348,
    ),
}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ConversionError(f"unknown family {name!r}; choose one of {sorted(FAMILIES)}.")
    return FAMILIES[name]
