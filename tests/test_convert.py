"""Checkpoints in and out (pipelines.convert): tiny Llama, Qwen2 and Qwen3 models built with transformers'
own classes give the same logits after conversion (causal; bidirectional and block layouts against the HF
model given the matching 4D mask; the logit shift against the HF logits shifted), a LLaDA-named fixture
equals its Llama twin, export loads back into transformers, shards and bf16 stream, the peak memory of
loading stays near one copy, and bad folders are refused by name."""

import builtins
import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from pipelines.cli import main as cli
from pipelines.convert import ConversionError, convert, export, load_backbone
from pipelines.text import TextDiffusionPipeline

REPO = Path(__file__).resolve().parents[1]
HF = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
      "qwen3": (Qwen3Config, Qwen3ForCausalLM)}
SIZES = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=48, max_position_embeddings=64)


def tiny_hf(kind="qwen2", seed=0, **over):
    """A random HF model; biases and norm weights random too, so a dropped one shows in the logits."""
    config_class, model_class = HF[kind]
    extra = {"head_dim": 16} if kind == "qwen3" else {}  # 16 != hidden/heads = 8: head_dim must be read
    torch.manual_seed(seed)
    model = model_class(config_class(**{**SIZES, "rms_norm_eps": 1e-5, **extra, **over})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(1.0 if "norm" in name else 0.0, 0.3)
    return model


def saved(model, folder, **kw):
    model.save_pretrained(folder, **kw)
    return str(folder)


def ids(n=12, b=2, vocab=64, seed=1):
    return torch.randint(0, vocab, (b, n), generator=torch.Generator().manual_seed(seed))


def block_mask(n, size):
    """Blocks counted from position 0: position q sees every key of its own and earlier blocks."""
    blocks = torch.arange(n) // size
    return (blocks[:, None] >= blocks[None, :])[None, None]


@torch.no_grad()
def hf_logits(model, x, mask=None):
    return model(x, attention_mask=mask).logits.float()


def close(a, b, tol=1e-5):
    assert a.shape == b.shape and torch.allclose(a, b, atol=tol, rtol=0), (a - b).abs().max()


# ---- logits against transformers ------------------------------------------------------------------
@pytest.mark.parametrize("kind, over", [
    ("llama", {}),
    ("llama", {"tie_word_embeddings": True}),
    ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0}}),
    ("llama", {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8,
                                   "rope_theta": 10000.0}}),
    ("qwen2", {}),
    ("qwen3", {}),
])
def test_causal_logits_equal_transformers(tmp_path, kind, over):
    hf = tiny_hf(kind, **over)
    model = load_backbone(kind, saved(hf, tmp_path), mask_token_id=3)
    assert model.config.attention_layout == "causal" and model.config.norm_eps == 1e-5
    x = ids()
    close(model(x).logits, hf_logits(hf, x))


def test_dynamic_ntk_rope_equals_transformers_past_the_original_length(tmp_path):
    rope = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    hf = tiny_hf("llama", max_position_embeddings=8, rope_parameters=rope)
    model = load_backbone("llama", saved(hf, tmp_path), mask_token_id=3)
    assert model.config.max_position_embeddings == 16  # dynamic NTK exists to run past the original 8
    x = ids(n=14)  # transformers stretches the base for 14 > 8 positions
    close(model(x).logits, hf_logits(hf, x))


def test_layouts_equal_transformers_given_the_matching_4d_mask(tmp_path):
    hf = tiny_hf("qwen2")
    folder = saved(hf, tmp_path)
    x = ids(n=12)
    bidirectional = load_backbone("qwen2", folder, mask_token_id=3, attention_layout="bidirectional")
    close(bidirectional(x).logits, hf_logits(hf, x, torch.ones(1, 1, 12, 12, dtype=torch.bool)))
    blocks = load_backbone("qwen2", folder, mask_token_id=3, attention_layout="block_causal", block_size=4,
                           block_alignment="start")
    close(blocks(x, prefix_length=5).logits, hf_logits(hf, x, block_mask(12, 4)))  # prefix_length plays no part
    after_prompt = load_backbone("qwen2", folder, mask_token_id=3, attention_layout="block_causal", block_size=4)
    mask = torch.ones(12, 12, dtype=torch.bool)  # prompt of 4 bidirectional, then blocks of 4 after it
    mask[4:, 4:] = block_mask(8, 4)[0, 0]
    mask[:4, 4:] = False
    close(after_prompt(x, prefix_length=4).logits, hf_logits(hf, x, mask[None, None]))


def test_logit_shift_equals_the_transformers_logits_shifted(tmp_path):
    hf = tiny_hf("qwen2")
    folder = saved(hf, tmp_path)
    x = ids()
    ref = hf_logits(hf, x)
    shifted = torch.cat([ref[:, :1], ref[:, :-1]], dim=1)  # Dream: position i from logit i - 1, 0 keeps its own
    model = load_backbone("qwen2", folder, mask_token_id=3, logit_shift=True)
    close(model(x).logits, shifted)
    # the first position of a cached call is scored from the cache's last hidden state, exactly
    cache = model(x[:, :5], use_cache=True).past_key_values
    close(model(x[:, 5:], past_key_values=cache).logits, shifted[:, 5:])
    dream = load_backbone("qwen2", folder, mask_token_id=3, logit_shift=True, attention_layout="bidirectional")
    ref = hf_logits(hf, x, torch.ones(1, 1, 12, 12, dtype=torch.bool))
    close(dream(x).logits, torch.cat([ref[:, :1], ref[:, :-1]], dim=1))


def test_cached_decoding_of_a_shifted_block_model_equals_uncached(tmp_path):
    """Fast-dLLM v2's shape (block_causal from slot 0, logit shift): the exact caches change no token."""
    from latent.sampling import generate

    model = load_backbone("qwen2", saved(tiny_hf("qwen2"), tmp_path), mask_token_id=63, logit_shift=True,
                          attention_layout="block_causal", block_size=4, block_alignment="start")
    prompt = ids(n=8, vocab=60)  # two whole blocks, so decoding blocks are the model's blocks
    runs = [generate(model, prompt, None, gen_length=8, block_length=4, steps=8, cache=c).sequences
            for c in ("none", "prefix_exact", "block_exact")]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


SDAR_FIELDS = dict(attn_implementation="flex_attention", debug=False, fuse_cross_entropy=True, ep_size=1,
                   micro_forward=False, skip_checkpoint=False, use_deepep=False)  # what SDAR's config.json adds


@pytest.mark.parametrize("family, base, fields, layout, shift", [
    ("dream", "qwen2", {"model_type": "Dream", "architectures": ["DreamModel"]}, "full", True),
    ("fast_dllm_v2", "qwen2", {"model_type": "Fast_dLLM_Qwen", "architectures": ["Fast_dLLM_QwenForCausalLM"],
                               "bd_size": 4}, "blocks", True),
    ("sdar", "qwen3", {"model_type": "sdar", "architectures": ["SDARForCausalLM"], "block_size": 4, **SDAR_FIELDS},
     "blocks", False),
])
def test_diffusion_families_equal_their_transformers_twin(tmp_path, family, base, fields, layout, shift):
    """Dream, Fast-dLLM v2 and SDAR are Qwen2/Qwen3 weights with their own layout and shift."""
    hf = tiny_hf(base)
    folder = saved(hf, tmp_path)
    edit_config(folder, mask_token_id=63, **fields)
    model = load_backbone(family, folder)
    assert model.config.mask_token_id == 63 and model.config.logit_shift == shift
    x = ids()
    mask = torch.ones(1, 1, 12, 12, dtype=torch.bool) if layout == "full" else block_mask(12, 4)
    ref = hf_logits(hf, x, mask)
    close(model(x, prefix_length=3).logits, torch.cat([ref[:, :1], ref[:, :-1]], dim=1) if shift else ref)
    convert(family, folder, tmp_path / "pipe")  # the scheduler holds the family's decoding defaults
    scheduler = json.loads((tmp_path / "pipe" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["mask_token_id"] == 63 and scheduler["block_length"] == (32 if layout == "full" else 4)


LLADA_NAMES = {
    "model.embed_tokens.weight": "model.transformer.wte.weight", "model.norm.weight": "model.transformer.ln_f.weight",
    "lm_head.weight": "model.transformer.ff_out.weight", "input_layernorm": "attn_norm", "self_attn.q_proj": "q_proj",
    "self_attn.k_proj": "k_proj", "self_attn.v_proj": "v_proj", "self_attn.o_proj": "attn_out",
    "post_attention_layernorm": "ff_norm", "mlp.gate_proj": "ff_proj", "mlp.up_proj": "up_proj", "mlp.down_proj": "ff_out",
}


def llada_fixture(folder, hf, **config):
    """LLaDA-named weights of a Llama model, with a native LLaDA config.json written by hand."""
    os.makedirs(folder, exist_ok=True)
    tensors = {}
    for name, t in hf.state_dict().items():
        if name in LLADA_NAMES:
            tensors[LLADA_NAMES[name]] = t
            continue
        layer, rest = name.removeprefix("model.layers.").split(".", 1)
        module, kind = rest.rsplit(".", 1)
        tensors[f"model.transformer.blocks.{layer}.{LLADA_NAMES[module]}.{kind}"] = t
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(folder, "model.safetensors"))
    cfg = {
        "model_type": "llada", "architectures": ["LLaDAModelLM"], "d_model": 32, "n_heads": 4, "n_kv_heads": 2,
        "n_layers": 2, "mlp_hidden_size": 48, "vocab_size": 64, "embedding_size": 64, "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5, "weight_tying": False, "mask_token_id": 63, "eos_token_id": 1,
        "max_sequence_length": 64, "block_group_size": 1, "block_type": "llama", "activation_type": "silu",
        "layer_norm_type": "rms", "include_bias": False, "include_qkv_bias": False, "attention_layer_norm": False,
        "alibi": False, "rope": True, "scale_logits": False, "input_emb_norm": False, "init_device": "meta", **config,
    }
    Path(folder, "config.json").write_text(json.dumps(cfg))
    return str(folder)


def test_llada_fixture_equals_its_llama_twin_bidirectionally(tmp_path):
    hf = tiny_hf("llama")
    model = load_backbone("llada", llada_fixture(tmp_path / "llada", hf))
    assert model.config.attention_layout == "bidirectional" and model.config.mask_token_id == 63
    x = ids()
    close(model(x).logits, hf_logits(hf, x, torch.ones(1, 1, 12, 12, dtype=torch.bool)))


# ---- export and round trips -----------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_export_loads_back_into_transformers(tmp_path, kind):
    hf = tiny_hf(kind)
    convert(kind, saved(hf, tmp_path / "hf"), tmp_path / "pipe", mask_token_id=3)
    export(tmp_path / "pipe", tmp_path / "out", family=kind)
    again = HF[kind][1].from_pretrained(tmp_path / "out").eval()
    x = ids()
    close(hf_logits(again, x), hf_logits(hf, x))
    assert load_file(tmp_path / "out" / "model.safetensors").keys() == load_file(tmp_path / "hf" / "model.safetensors").keys()


def test_export_of_a_bidirectional_model_warns_and_records_its_layout(tmp_path):
    hf = tiny_hf("qwen2")
    model = load_backbone("qwen2", saved(hf, tmp_path / "hf"), mask_token_id=3, attention_layout="bidirectional",
                          logit_shift=True)
    with pytest.warns(UserWarning, match="4D attention mask"):
        export(model, tmp_path / "out", family="qwen2")
    record = json.loads((tmp_path / "out" / "config.json").read_text())["mmdlm"]
    assert record["attention_layout"] == "bidirectional" and record["logit_shift"] and record["mask_token_id"] == 3
    back = load_backbone("qwen2", tmp_path / "out")  # the record restores layout, shift and mask token
    x = ids()
    close(back(x).logits, model(x).logits)
    full = torch.ones(1, 1, 12, 12, dtype=torch.bool)  # transformers given the full mask: the unshifted logits
    close(hf_logits(Qwen2ForCausalLM.from_pretrained(tmp_path / "out").eval(), x, full), hf_logits(hf, x, full))


def test_what_a_family_cannot_express_is_refused_on_export(tmp_path):
    model = load_backbone("qwen3", saved(tiny_hf("qwen3"), tmp_path), mask_token_id=3)
    with pytest.raises(ConversionError, match="qk_norm"):
        export(model, tmp_path / "out", family="llama")
    wide_heads = load_backbone("llama", saved(tiny_hf("llama", head_dim=16), tmp_path / "llama"), mask_token_id=3)
    with pytest.raises(ConversionError, match="head_dim"):
        export(wide_heads, tmp_path / "out", family="qwen2")


# ---- streaming, shards, dtype, memory -------------------------------------------------------------
def test_sharded_bf16_checkpoint_stays_bf16(tmp_path):
    hf = tiny_hf("qwen2").to(torch.bfloat16)
    folder = saved(hf, tmp_path, max_shard_size="20KB")
    assert len([f for f in os.listdir(folder) if f.endswith(".safetensors")]) > 1
    assert os.path.isfile(os.path.join(folder, "model.safetensors.index.json"))
    model = load_backbone("qwen2", folder, mask_token_id=3)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    x = ids()
    close(model.float()(x).logits, hf_logits(hf.float(), x))


MEASURE = textwrap.dedent("""
    import os, sys
    def peak():
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
    import torch
    from pipelines.convert import load_backbone
    before = peak()
    model = load_backbone("llama", sys.argv[1], mask_token_id=0)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    print((peak() - before) / os.path.getsize(os.path.join(sys.argv[1], "model.safetensors")))
""")


def test_loading_peaks_near_one_copy_of_the_weights(tmp_path):
    """About 200 MB of bf16 weights, loaded in a fresh process: the peak RSS grows by at most 1.3x their size."""
    vocab, d, layers, inter = 32000, 768, 8, 2048
    LlamaConfig(vocab_size=vocab, hidden_size=d, num_hidden_layers=layers, num_attention_heads=12, num_key_value_heads=4,
                intermediate_size=inter, tie_word_embeddings=False).save_pretrained(tmp_path)
    shapes = {"model.embed_tokens.weight": (vocab, d), "model.norm.weight": (d,), "lm_head.weight": (vocab, d)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                       p + "self_attn.q_proj.weight": (d, d), p + "self_attn.k_proj.weight": (256, d),
                       p + "self_attn.v_proj.weight": (256, d), p + "self_attn.o_proj.weight": (d, d),
                       p + "mlp.gate_proj.weight": (inter, d), p + "mlp.up_proj.weight": (inter, d),
                       p + "mlp.down_proj.weight": (d, inter)})
    g = torch.Generator().manual_seed(0)
    save_file({k: torch.randn(s, generator=g).to(torch.bfloat16) for k, s in shapes.items()},
              tmp_path / "model.safetensors")
    run = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path)], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}, timeout=600)
    assert run.returncode == 0, run.stderr
    ratio = float(run.stdout.strip().splitlines()[-1])
    print(f"peak RSS of loading / weights size = {ratio:.3f}")
    assert ratio <= 1.3


# ---- the pipeline on a converted model --------------------------------------------------------------
WORDS = "the a cat dog sat on mat ran to house big small red blue and with".split()


def tiny_tokenizer():
    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def test_text_pipeline_runs_on_a_converted_qwen2_with_its_tokenizer(tmp_path):
    tok = tiny_tokenizer()
    hf = tiny_hf("qwen2", vocab_size=len(tok), eos_token_id=tok.eos_token_id)
    folder = saved(hf, tmp_path / "hf")
    tok.save_pretrained(folder)
    report = convert("qwen2", folder, tmp_path / "pipe", attention_layout="bidirectional")
    assert report.mask_token_id == len(tok) and "added" in report.mask_token and report.eos_token_id == 1
    pipe = TextDiffusionPipeline.from_pretrained(tmp_path / "pipe")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.tokenizer.mask_token_id == pipe.model.config.mask_token_id == len(tok)
    emb = pipe.model.embed.weight
    close(emb[len(tok)], emb[: len(tok)].mean(0))  # the new row is the mean embedding
    out = pipe(["the cat sat", "a dog"], gen_length=8, block_length=4, steps=8)
    assert out.sequences.shape == (2, 3 + 8) and all(isinstance(t, str) for t in out.texts)
    assert not (out.sequences == len(tok)).any()  # every mask was decoded
    record = json.loads((tmp_path / "pipe" / "conversion.json").read_text())
    assert record["family"] == "qwen2" and record["tokenizer"] == "the checkpoint's own"


def test_command_line_converts_and_exports(tmp_path, capsys):
    folder = saved(tiny_hf("qwen2"), tmp_path / "hf")
    assert cli(["convert", "--from", "qwen2", folder, str(tmp_path / "pipe"), "--mask-token-id", "3"]) == 0
    assert "mask token 3: given" in capsys.readouterr().out
    assert cli(["convert", "--to", "qwen2", str(tmp_path / "pipe"), str(tmp_path / "out")]) == 0
    assert cli(["convert", "--from", "llama", folder, str(tmp_path / "bad")]) == 2
    assert "model_type 'qwen2'" in capsys.readouterr().err


# ---- bad input ------------------------------------------------------------------------------------
def edit_config(folder, **fields):
    path = Path(folder, "config.json")
    cfg = {**json.loads(path.read_text()), **fields}
    path.write_text(json.dumps({k: v for k, v in cfg.items() if v != "<drop>"}))


@pytest.mark.parametrize("kind, fields, match", [
    ("llama", {"hidden_act": "gelu"}, "hidden_act"),
    ("llama", {"attention_bias": True}, "attention_bias"),
    ("llama", {"mlp_bias": True}, "mlp_bias"),
    ("qwen2", {"use_sliding_window": True}, "use_sliding_window"),
    ("qwen2", {"layer_types": ["sliding_attention", "full_attention"]}, "layer_types"),
    ("llama", {"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
    ("llama", {"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}}, "yarn"),
    ("llama", {"num_experts": 8}, "mixture-of-experts"),
    ("llama", {"shiny_new_flag": True}, "shiny_new_flag"),
    ("llama", {"num_hidden_layers": "<drop>"}, "num_hidden_layers"),
])
def test_refused_config_fields_are_named(tmp_path, kind, fields, match):
    folder = saved(tiny_hf(kind), tmp_path)
    edit_config(folder, **fields)
    with pytest.raises(ConversionError, match=match):
        load_backbone(kind, folder, mask_token_id=3)


def test_an_unknown_field_converts_when_allowed(tmp_path):
    folder = saved(tiny_hf("llama"), tmp_path)
    edit_config(folder, shiny_new_flag=True)
    load_backbone("llama", folder, mask_token_id=3, allow_unknown_config=True)


@pytest.mark.parametrize("fields, match", [
    ({"include_bias": True}, "include_bias"),
    ({"attention_layer_norm": True}, "attention_layer_norm"),
    ({"block_group_size": 2}, "block_group_size"),
    ({"activation_type": "gelu"}, "activation_type"),
    ({"layer_norm_type": "default"}, "layer_norm_type"),
    ({"scale_logits": True}, "scale_logits"),
    ({"alibi": True}, "alibi"),
    ({"input_emb_norm": True}, "input_emb_norm"),
])
def test_refused_llada_fields_are_named(tmp_path, fields, match):
    folder = llada_fixture(tmp_path, tiny_hf("llama"), **fields)
    with pytest.raises(ConversionError, match=match):
        load_backbone("llada", folder)


@pytest.mark.parametrize("config, match", [
    (None, "GPT-2 has learned absolute position embeddings"),
    ({"model_type": "llada2_moe", "architectures": ["LLaDA2MoeModelLM"]}, "mixture-of-experts"),
    ({"model_type": "diffusion_gemma", "architectures": ["DiffusionGemmaForConditionalGeneration"]}, "Gemma"),
    ({"model_type": "mdlm", "architectures": ["MDLM"]}, "adaLN"),
])
def test_architectures_that_do_not_map_are_refused_by_name(tmp_path, config, match):
    if config is None:
        GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64)).save_pretrained(tmp_path)
    else:
        Path(tmp_path, "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match=match):
        load_backbone("llama", tmp_path, mask_token_id=3)


class Canary:
    """Unpickling this creates a file: the proof that a pickle was (or was not) opened."""

    path = ""

    def __reduce__(self):
        return builtins.open, (self.path, "w")


def test_pickle_only_folder_is_never_unpickled(tmp_path):
    folder = saved(tiny_hf("llama"), tmp_path)
    os.remove(os.path.join(folder, "model.safetensors"))
    Canary.path = str(tmp_path / "unpickled")
    Path(folder, "pytorch_model.bin").write_bytes(pickle.dumps(Canary()))
    with pytest.raises(ConversionError, match=r"pytorch_model\.bin.*safe_serialization=True"):
        convert("llama", folder, tmp_path / "out", mask_token_id=3)
    assert not (tmp_path / "unpickled").exists()


def test_missing_shard_is_named(tmp_path):
    folder = saved(tiny_hf("qwen2"), tmp_path, max_shard_size="20KB")
    index = json.loads(Path(folder, "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    os.remove(os.path.join(folder, shard))
    with pytest.raises(ConversionError, match=shard):
        load_backbone("qwen2", folder, mask_token_id=3)


def test_shape_mismatch_names_the_tensor_and_file(tmp_path):
    folder = saved(tiny_hf("llama"), tmp_path)
    edit_config(folder, intermediate_size=40)
    with pytest.raises(ConversionError, match=r"mlp\.(gate|up|down)_proj\.weight.*model\.safetensors"):
        load_backbone("llama", folder, mask_token_id=3)


def test_unexpected_and_missing_tensors_are_named(tmp_path):
    folder = saved(tiny_hf("llama"), tmp_path)
    weights = load_file(os.path.join(folder, "model.safetensors"))
    weights["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(32)
    save_file(weights, os.path.join(folder, "model.safetensors"))
    with pytest.raises(ConversionError, match="o_proj.bias"):
        load_backbone("llama", folder, mask_token_id=3)
    del weights["model.layers.0.self_attn.o_proj.bias"], weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, os.path.join(folder, "model.safetensors"))
    with pytest.raises(ConversionError, match=r"lacks.*layers\.1\.mlp\.up_proj"):
        load_backbone("llama", folder, mask_token_id=3)


def test_an_autoregressive_base_without_tokenizer_gets_a_new_mask_row(tmp_path):
    hf = tiny_hf("llama")
    report = convert("llama", saved(hf, tmp_path / "hf"), tmp_path / "pipe")
    assert report.mask_token_id == 64 and "new row" in report.mask_token and "tokenizer=None" in report.tokenizer
    pipe = TextDiffusionPipeline.from_pretrained(tmp_path / "pipe", tokenizer=None)
    model = pipe.model
    assert model.config.vocab_size == 65 and model.lm_head.weight.shape[0] == 65
    close(model.lm_head.weight[64], model.lm_head.weight[:64].mean(0))
    x = ids()
    close(model(x).logits[..., :64], hf_logits(hf, x))  # the old tokens score as before


def test_a_padded_vocabulary_takes_the_mask_token_in_its_first_unused_row(tmp_path):
    tok = tiny_tokenizer()
    folder = saved(tiny_hf("qwen3", vocab_size=len(tok) + 5), tmp_path / "hf")  # Qwen pads its vocabulary too
    tok.save_pretrained(folder)
    report = convert("qwen3", folder, tmp_path / "pipe")
    assert report.mask_token_id == len(tok) and "unused row" in report.mask_token
    pipe = TextDiffusionPipeline.from_pretrained(tmp_path / "pipe")
    assert pipe.model.config.vocab_size == len(tok) + 5 and pipe.tokenizer.mask_token_id == len(tok)
