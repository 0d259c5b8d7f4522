"""Checkpoints from elsewhere onto the backbone: `load_backbone` (weights only) and `convert` (a pipeline folder).

Loading streams: the backbone is built on the meta device (no memory), then each tensor is read from its
shard straight into its place in the backbone's parameters, in the checkpoint's dtype (bf16 stays bf16),
so the peak stays near one copy of the weights. Pickled weights are refused; every missing or unexpected
tensor, shape mismatch and unknown config field is an error that names the tensor, file or field.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

import torch
from accelerate import init_empty_weights

from latent.backbone import DiffusionTransformer
from latent.folders import atomic_folder
from latent.scheduler import MaskedDiffusionScheduler

from ..text import TextDiffusionPipeline
from .families import Family, get_family
from .weights import ConversionError, checkpoint_index, read_into

NEW_MASK_TOKEN = "<|mask|>"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# Options a caller may set on top of the family's (the rest come from config.json).
OPTIONS = ("attention_layout", "block_size", "block_alignment", "logit_shift", "attention_backend",
           "max_position_embeddings")


@dataclass
class ConversionReport:
    """What a conversion did; `convert` also writes it to DST/conversion.json."""

    family: str
    source: str
    destination: str | None = None
    mask_token_id: int | None = None
    mask_token: str = ""  # how the mask token was chosen (checkpoint, given, tokenizer, added)
    eos_token_id: int | None = None
    eot_token_id: int | None = None
    tokenizer: str = ""  # the tokenizer written, or why there is none
    dtype: str = ""
    backbone: dict = field(default_factory=dict)  # the backbone's config

    def lines(self) -> list[str]:
        return [
            f"{self.family} checkpoint {self.source} -> {self.destination}",
            f"backbone: {self.backbone.get('attention_layout')} layout, {self.backbone.get('num_layers')} layers, "
            f"hidden {self.backbone.get('hidden_size')}, vocabulary {self.backbone.get('vocab_size')}, {self.dtype}",
            f"mask token {self.mask_token_id}: {self.mask_token}",
            f"EOS {self.eos_token_id}, EoT {self.eot_token_id}",
            f"tokenizer: {self.tokenizer}",
        ]


def read_config(src: str) -> dict:
    if not os.path.isdir(src):
        raise ConversionError(f"{src!r} is not a folder; give a local checkpoint folder (nothing is downloaded).")
    path = os.path.join(src, "config.json")
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConversionError(f"{src!r} has no config.json; a checkpoint folder needs one.") from None
    except json.JSONDecodeError as err:
        raise ConversionError(f"{path!r} is not valid JSON: {err}") from None


def checkpoint_mask_id(family: Family, cfg: dict) -> int | None:
    """The mask token id a checkpoint declares (config.json, a record of this project's export) or its
    family's; None for an autoregressive base."""
    saved = (cfg.get("mmdlm") or {}).get("mask_token_id")
    return next((m for m in (cfg.get("mask_token_id"), saved, family.mask_token_id) if m is not None), None)


def load_backbone(family: str | Family, src: str, *, mask_token_id: int | None = None, new_rows=(),
                  dtype: torch.dtype | None = None, allow_unknown_config: bool = False,
                  **options) -> DiffusionTransformer:
    """A `DiffusionTransformer` holding the weights of checkpoint folder `src`.

    mask_token_id: default the checkpoint's (see `checkpoint_mask_id`); required for an autoregressive base.
    new_rows: token ids whose embedding (and output) rows are set to the mean of the checkpoint's rows; ids
        at or past the checkpoint's vocabulary grow it (a mask token added to an autoregressive base).
    dtype: default the checkpoint's own (that of its embedding).
    options: backbone options over the family's: attention_layout, block_size, block_alignment, logit_shift,
        attention_backend, max_position_embeddings.
    """
    family = get_family(family) if isinstance(family, str) else family
    cfg = read_config(src)
    config = family.backbone_config(cfg, allow_unknown_config)
    entries = checkpoint_index(src)  # refuses pickles, missing shards
    bad = sorted(set(options) - set(OPTIONS))
    if bad:
        raise ConversionError(f"unknown backbone option(s) {bad}; a conversion may set {list(OPTIONS)}.")
    config.update({k: v for k, v in options.items() if v is not None})
    head = family.names.top["lm_head.weight"][0]
    if config["tie_word_embeddings"] is None:  # not stated: tied exactly when the checkpoint has no head
        config["tie_word_embeddings"] = head not in entries
    rows = config["vocab_size"]
    config["vocab_size"] = max([rows, *(r + 1 for r in new_rows)])
    config["mask_token_id"] = checkpoint_mask_id(family, cfg) if mask_token_id is None else mask_token_id
    if config["mask_token_id"] is None:
        raise ConversionError(f"a {family.name} checkpoint has no mask token; give mask_token_id (or let convert add one).")
    try:
        with init_empty_weights():
            model = DiffusionTransformer(**config)
    except ValueError as err:
        raise ConversionError(f"config.json gives a backbone the backbone refuses: {err}") from None

    plan = {name: family.names.sources(name) for name, _ in model.named_parameters()}
    used = {s for sources in plan.values() for s in sources}
    missing = sorted(used - set(entries))
    if missing:
        raise ConversionError(f"{src!r} lacks tensor(s) the backbone needs: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    ignored = {n for n in entries if n.endswith(family.names.ignored) or (n == head and config["tie_word_embeddings"])}
    unexpected = sorted(set(entries) - used - ignored)
    if unexpected:
        raise ConversionError(
            f"{src!r} holds tensor(s) the backbone has no place for: {unexpected[:8]}"
            f"{' ...' if len(unexpected) > 8 else ''} (a bias, norm or layer this family does not have?)."
        )
    dtype = dtype or entries[family.names.top["embed.weight"][0]].dtype
    state = {name: torch.empty(p.shape, dtype=dtype) for name, p in model.named_parameters()}
    _read_all(plan, entries, state, rows)
    for name in ("embed.weight", "lm_head.weight"):
        if name in state and new_rows:
            state[name][list(new_rows)] = state[name][:rows].float().mean(0).to(dtype)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def _read_all(plan: dict, entries: dict, state: dict, rows: int) -> None:
    """Read every source tensor into its rows of the backbone parameter, file by file in byte order."""
    parts = []  # (entry, source name, parameter name, first row, last row)
    for name, sources in plan.items():
        # fused parts split dim 0 equally; embedding rows past the checkpoint's vocabulary are new tokens
        n = rows if name in ("embed.weight", "lm_head.weight") else state[name].shape[0] // len(sources)
        for j, source in enumerate(sources):
            parts.append((entries[source], source, name, j * n, (j + 1) * n))
    for entry, source, name, lo, hi in sorted(parts, key=lambda p: (p[0].file, p[0].begin)):
        out = state[name][lo:hi]
        if tuple(out.shape) != entry.shape:
            raise ConversionError(
                f"tensor {source!r} in {os.path.basename(entry.file)!r} has shape {entry.shape}, but config.json "
                f"gives the backbone's {name!r} a part of shape {tuple(out.shape)}; the config (sizes, heads, "
                "head_dim, vocab_size) and the weights disagree."
            )
        read_into(entry, out)


# ---- the pipeline folder --------------------------------------------------------------------------
def load_tokenizer(src: str):
    """(tokenizer or None, what happened). The class tokenizer_config.json names is used when transformers
    has it (AutoTokenizer would pick one from the model type instead); the tokenizer's own code is never
    run (no trust_remote_code): a custom class falls back to the tokenizer.json beside it."""
    if not any(os.path.isfile(os.path.join(src, f)) for f in TOKENIZER_FILES):
        return None, (f"none: {src!r} has no tokenizer files; the pipeline takes and returns token ids "
                      "(load it with TextDiffusionPipeline.from_pretrained(DST, tokenizer=None))")
    import transformers

    try:
        with open(os.path.join(src, "tokenizer_config.json")) as f:
            named = json.load(f).get("tokenizer_class")
    except (OSError, json.JSONDecodeError):
        named = None
    try:
        if named and hasattr(transformers, named):
            return getattr(transformers, named).from_pretrained(src, local_files_only=True), "the checkpoint's own"
        if os.path.isfile(os.path.join(src, "tokenizer.json")):
            tok = transformers.PreTrainedTokenizerFast.from_pretrained(src, local_files_only=True)
            return tok, f"the checkpoint's tokenizer.json (its class {named!r} is not in transformers)"
        return transformers.AutoTokenizer.from_pretrained(src, local_files_only=True, trust_remote_code=False), \
            "the checkpoint's own"
    except (OSError, ValueError, ImportError, KeyError, TypeError) as err:
        return None, f"none: the checkpoint's tokenizer did not load without running its code ({err})"


def _first(value):
    return value[0] if isinstance(value, (list, tuple)) and value else value


def _choose_mask(family, cfg, vocab: int, tokenizer, given: int | None) -> tuple[int, tuple, str]:
    """(mask id, rows to initialise, how it was chosen); an added mask token is added to the tokenizer too."""
    if given is not None:
        if not 0 <= given < vocab:
            raise ConversionError(f"mask_token_id={given} is outside the checkpoint's vocabulary [0, {vocab}).")
        return given, (), "given"
    declared = checkpoint_mask_id(family, cfg)
    if declared is not None:
        return declared, (), "the checkpoint's (config.json or its family)"
    if tokenizer is not None and tokenizer.mask_token_id is not None:
        return tokenizer.mask_token_id, (), "the tokenizer's mask token"
    new = vocab if tokenizer is None else len(tokenizer)
    if new > vocab:
        raise ConversionError(f"the tokenizer has {new} tokens but the embedding only {vocab} rows.")
    if tokenizer is not None:
        tokenizer.add_special_tokens({"mask_token": NEW_MASK_TOKEN})
    where = "a new row" if new == vocab else "an unused row of the embedding"
    return new, (new,), f"added {NEW_MASK_TOKEN!r} as id {new} ({where}, set to the mean embedding)"


def convert(family: str, src: str, dst: str, mask_token_id: int | None = None, *, dtype: torch.dtype | None = None,
            allow_unknown_config: bool = False, **options) -> ConversionReport:
    """Convert checkpoint folder `src` of `family` (llama, qwen2, qwen3, llada, dream, fast_dllm_v2, sdar)
    into a `TextDiffusionPipeline` folder `dst`: the backbone, the checkpoint's tokenizer (when `src` has one)
    and a `MaskedDiffusionScheduler` with the family's decoding defaults (mask, EOS and EoT ids, block size).

    An autoregressive base (llama, qwen2, qwen3) has no mask token: give `mask_token_id`, or one is added
    (one more embedding and output row, the mean of the others). Its layout stays causal, so the converted
    model computes what the source does, unless `options` say otherwise (attention_layout, block_size,
    block_alignment, logit_shift; see `load_backbone`). Returns what was done; also written to
    DST/conversion.json.
    """
    fam = get_family(family)
    cfg = read_config(src)
    vocab = fam.backbone_config(cfg, allow_unknown_config)["vocab_size"]
    tokenizer, tokenizer_note = load_tokenizer(src)
    mask, new_rows, how = _choose_mask(fam, cfg, vocab, tokenizer, mask_token_id)
    model = load_backbone(fam, src, mask_token_id=mask, new_rows=new_rows, dtype=dtype,
                          allow_unknown_config=allow_unknown_config, **options)
    if tokenizer is not None and tokenizer.mask_token_id != mask:
        token = tokenizer.convert_ids_to_tokens(mask)
        if token is None:
            raise ConversionError(f"mask token id {mask} is not a token of the checkpoint's tokenizer.")
        tokenizer.mask_token = token
    eos = _first(cfg.get("eos_token_id"))
    if eos is None:
        eos = tokenizer.eos_token_id if tokenizer is not None and tokenizer.eos_token_id is not None else fam.eos_token_id
    eot = fam.eot_token_id if fam.eot_token_id is not None and fam.eot_token_id < model.config.vocab_size else None
    c = model.config
    scheduler = MaskedDiffusionScheduler(
        block_length=c.block_size if c.attention_layout == "block_causal" else 32,
        mask_token_id=mask, eos_token_id=eos, eot_token_id=eot,
    )
    pipe = TextDiffusionPipeline(model=model, tokenizer=tokenizer, scheduler=scheduler)
    report = ConversionReport(
        family=fam.name, source=os.path.abspath(src), destination=os.path.abspath(dst), mask_token_id=mask,
        mask_token=how, eos_token_id=eos, eot_token_id=eot, tokenizer=tokenizer_note,
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."), backbone=dict(model.config),
    )
    with atomic_folder(dst, replaces=("model_index.json",)) as tmp:  # a stopped conversion leaves dst as it was
        pipe.save_pretrained(tmp)
        with open(os.path.join(tmp, "conversion.json"), "w") as f:
            json.dump(asdict(report), f, indent=2, default=str)
    return report
