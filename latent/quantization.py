"""Post-training weight-only quantization of the backbone's linear layers, and its safetensors folders.

Schemes (torchao does the arithmetic and the matmuls; it is imported only when a scheme is used):

- "int8": symmetric, one scale per output channel (row): w ~ q * scale, q in [-128, 127]
  (torchao `Int8WeightOnlyConfig`). Runs on CPU and CUDA, in float32, bfloat16 and float16.
- "int4": symmetric, one scale per `group_size` consecutive input weights of a row, q in [-8, 7]
  (torchao `IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size))`). Runs
  on CPU and CUDA in any float dtype; in memory torchao keeps each 4-bit value in one byte, on disk two
  values share a byte.

Embeddings, norms and the layers named in `skip` (by default the untied output head and the latent
stream's projections) stay in full precision; a tied head is the embedding and is never quantized.

A quantized backbone saves to a folder of `config.json`, `quantization.json` (scheme, group size, the
quantized layers) and `quantized_model.safetensors`, which holds plain tensors only: each quantized
layer's integers (`<layer>.weight.qdata`, int8; 4-bit values packed two to a uint8) and scales
(`<layer>.weight.scale`), and every other tensor as it is. Loading rebuilds the quantized layers from
those tensors (nothing is quantized again, nothing is unpickled), and refuses, saying what to install,
when torchao is missing.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from .loading import WeightsMismatchError

__all__ = [
    "SCHEMES", "DEFAULT_SKIP", "QUANTIZATION_FILE", "QUANTIZED_WEIGHTS", "QuantizationSpec", "quantize_backbone",
    "quantize_with",
    "quantization_of", "quantized_layers", "is_quantized_folder", "save_quantized", "load_quantized",
    "pack_int4", "unpack_int4",
]

SCHEMES = ("int8", "int4")
DEFAULT_GROUP_SIZE = 32  # int4: a scale per 32 weights (fp32 scales add 1 bit per weight)
DEFAULT_SKIP = ("lm_head", "latent_in", "latent_out", "time_mlp")  # small layers at the edges of the model
QUANTIZATION_FILE = "quantization.json"
QUANTIZED_WEIGHTS = "quantized_model.safetensors"
FORMAT_VERSION = 1
INSTALL_HINT = "pip install 'mmdlm[quant]' (or pip install torchao==0.18.0)"


@dataclass(frozen=True)
class QuantizationSpec:
    """How a backbone was quantized: the scheme, the int4 group size (None for int8), the skipped names."""

    scheme: str
    group_size: int | None
    skip: tuple[str, ...]


def _torchao():
    try:
        import torchao.quantization as tq
    except ImportError as err:
        raise ImportError(f"Weight quantization needs torchao, which is not installed; {INSTALL_HINT}.") from err
    return tq


def _spec(scheme: str, group_size: int | None, skip) -> QuantizationSpec:
    if scheme not in SCHEMES:
        raise ValueError(f"quantization scheme {scheme!r} is unknown; choose one of {', '.join(SCHEMES)}.")
    if isinstance(skip, str):
        raise ValueError(f"`skip` must be a list of module names, got the string {skip!r}; write [{skip!r}].")
    if scheme == "int8":
        if group_size is not None:
            raise ValueError("int8 has one scale per output channel; `group_size` applies to int4 only (leave it None).")
    else:
        group_size = DEFAULT_GROUP_SIZE if group_size is None else group_size
        if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 2 or group_size % 2:
            raise ValueError(f"`group_size` must be an even int >= 2 (e.g. 32, 64, 128), got {group_size!r}.")
    return QuantizationSpec(scheme, group_size, tuple(skip))


def _skipped(name: str, skip: tuple[str, ...]) -> bool:
    """A module is skipped when its name is a skip entry or lies under one ("blocks.0" skips its layers)."""
    return any(name == s or name.startswith(s + ".") for s in skip)


def quantization_of(model: nn.Module) -> QuantizationSpec | None:
    """The spec a model was quantized with (by `quantize_backbone` or a quantized folder), else None."""
    return getattr(model, "_quantization", None)


def quantized_layers(model: nn.Module) -> list[str]:
    """Names of the linear layers whose weights are quantized."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and _is_quantized(m.weight)]


def _is_quantized(weight) -> bool:
    return hasattr(weight, "qdata") and hasattr(weight, "scale")  # torchao's quantized tensor subclasses


@torch.no_grad()
def quantize_backbone(model: nn.Module, scheme: str = "int8", group_size: int | None = None,
                      skip=DEFAULT_SKIP) -> nn.Module:
    """Quantize the weights of `model`'s `nn.Linear` layers in place (weight-only; activations, biases,
    embeddings and norms keep their dtype) and return it.

    scheme: "int8" (a scale per output channel) or "int4" (a scale per `group_size` input weights, default
        32; it must divide every quantized layer's in_features).
    skip: module names left in full precision, with everything under them; by default the untied output
        head and the latent stream's projections. `skip=()` quantizes every linear layer."""
    spec = _spec(scheme, group_size, skip)
    done = quantization_of(model)
    if done is not None or quantized_layers(model):
        raise ValueError(f"The model is already quantized ({done.scheme if done else 'by torchao'}); quantize the "
                         "original full-precision model instead.")
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not _skipped(n, spec.skip)]
    if not names:
        raise ValueError(f"No linear layer is left to quantize (skip={list(spec.skip)}).")
    tq = _torchao()
    if spec.scheme == "int8":
        config = tq.Int8WeightOnlyConfig(set_inductor_config=False)
    else:
        modules = dict(model.named_modules())
        bad = [f"{n} (in_features={modules[n].in_features})" for n in names if modules[n].in_features % spec.group_size]
        if bad:
            raise ValueError(f"int4 group_size={spec.group_size} must divide the in_features of every quantized "
                             f"layer; it does not for {bad[:3]}. Choose a divisor, or add those layers to `skip`.")
        from torchao.quantization.granularity import PerGroup

        config = tq.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(spec.group_size))
    chosen = set(names)
    tq.quantize_(model, config, filter_fn=lambda module, fqn: fqn in chosen)
    model._quantization = spec
    return model


def quantize_with(model: nn.Module, quantization: str | dict) -> nn.Module:
    """`quantize_backbone` from a load option: a scheme name, or a dict of its arguments."""
    if isinstance(quantization, str):
        return quantize_backbone(model, quantization)
    if isinstance(quantization, dict):
        return quantize_backbone(model, **quantization)
    raise ValueError(f"`quantization` must be a scheme ({', '.join(SCHEMES)}) or a dict of quantize_backbone "
                     f"arguments such as {{'scheme': 'int4', 'group_size': 64}}, got {type(quantization).__name__}.")


# ---- storage --------------------------------------------------------------------------------------
def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7], [..., 2k] -> uint8 [..., k]: column 2j in the low nibble, 2j + 1 in the high."""
    nibbles = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_int4`: uint8 [..., k] -> int8 [..., 2k] in [-8, 7]."""
    nibbles = torch.stack([packed & 0xF, packed >> 4], dim=-1).to(torch.int8)
    return torch.where(nibbles >= 8, nibbles - 16, nibbles).flatten(-2)


def _plain_tensors(model: nn.Module, spec: QuantizationSpec) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Every tensor of the state dict as a plain tensor: each quantized weight as its integers and scales."""
    layers = quantized_layers(model)
    quantized = {f"{n}.weight" for n in layers}
    out = {}
    for key, value in model.state_dict().items():
        if key not in quantized:
            out[key] = value.detach().contiguous()
            continue
        if value.zero_point is not None and bool(value.zero_point.any()):
            raise ValueError(f"{key} has a non-zero zero point; only symmetric quantization is stored.")
        q = value.qdata
        out[f"{key}.qdata"] = (pack_int4(q) if spec.scheme == "int4" else q).contiguous()
        out[f"{key}.scale"] = value.scale.contiguous()
    return out, layers


def save_quantized(model: nn.Module, folder: str | os.PathLike) -> None:
    """Write a quantized backbone as config.json + quantization.json + quantized_model.safetensors."""
    from safetensors.torch import save_file

    spec = quantization_of(model)
    if spec is None:
        raise ValueError("The model is not quantized; call quantize_backbone(model, scheme=...) first.")
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    tensors, layers = _plain_tensors(model, spec)
    model.save_config(folder)
    save_file(tensors, os.path.join(folder, QUANTIZED_WEIGHTS), metadata={"format": "pt"})
    import torchao

    dtype = str(next(t for n, t in model.state_dict().items() if n.endswith("weight")).dtype).removeprefix("torch.")
    record = dict(format_version=FORMAT_VERSION, library="torchao", library_version=torchao.__version__,
                  **asdict(spec), dtype=dtype, layers=layers)
    with open(os.path.join(folder, QUANTIZATION_FILE), "w") as f:
        json.dump(record, f, indent=2)


def is_quantized_folder(folder: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(os.fspath(folder), QUANTIZATION_FILE))


def _rebuild(tq, spec: QuantizationSpec, qdata: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
    """The torchao weight holding these integers and scales (the tensor `quantize_backbone` made)."""
    from torchao.quantization import IntxUnpackedToInt8Tensor

    if spec.scheme == "int8":
        return tq.Int8Tensor(qdata, scale, [1, qdata.shape[1]], dtype, zero_point=torch.zeros_like(scale, dtype=torch.int8))
    q = unpack_int4(qdata)
    return IntxUnpackedToInt8Tensor(q, scale, torch.zeros_like(scale, dtype=torch.int8), torch.int4,
                                    [1, spec.group_size], dtype, None)


def load_quantized(cls, folder: str | os.PathLike, torch_dtype: torch.dtype | None = None, device_map=None):
    """A quantized backbone of class `cls` from a folder written by `save_quantized` (see the module doc)."""
    from accelerate import init_empty_weights
    from safetensors.torch import load_file

    folder = os.fspath(folder)
    with open(os.path.join(folder, QUANTIZATION_FILE)) as f:
        record = json.load(f)
    if record.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{folder!r}: {QUANTIZATION_FILE} has format_version {record.get('format_version')!r}; "
                         f"this version reads {FORMAT_VERSION}. Quantize the original folder again.")
    spec = _spec(record["scheme"], record.get("group_size"), record.get("skip", ()))
    try:
        tq = _torchao()
    except ImportError as err:
        raise ImportError(f"{folder!r} holds {spec.scheme}-quantized weights, which need torchao to load; "
                          f"{INSTALL_HINT}, or load the full-precision folder it was made from.") from err
    if device_map is not None:
        raise ValueError("`device_map` is not supported for a quantized folder; load it, then call .to(device).")
    if torch_dtype is not None and str(torch_dtype).removeprefix("torch.") != record["dtype"]:
        raise ValueError(f"{folder!r} was quantized in {record['dtype']}; load it without torch_dtype (or with "
                         f"torch_dtype=torch.{record['dtype']}), or quantize the original in {torch_dtype}.")
    path = os.path.join(folder, QUANTIZED_WEIGHTS)
    if not os.path.isfile(path):
        raise ValueError(f"{folder!r} has {QUANTIZATION_FILE} but no {QUANTIZED_WEIGHTS}; write it with save_quantized().")
    tensors = load_file(path)
    with init_empty_weights(include_buffers=False):  # parameters on the meta device: no full-precision copy
        model = cls.from_config(cls.load_config(folder))
    modules = dict(model.named_modules())
    missing = []
    for name in record["layers"]:
        qdata, scale = tensors.pop(f"{name}.weight.qdata", None), tensors.pop(f"{name}.weight.scale", None)
        if not isinstance(modules.get(name), nn.Linear) or qdata is None or scale is None:
            missing.append(name)
            continue
        weight = _rebuild(tq, spec, qdata, scale, getattr(torch, record["dtype"]))
        if tuple(weight.shape) != tuple(modules[name].weight.shape):
            missing.append(name)
            continue
        modules[name].weight = nn.Parameter(weight, requires_grad=False)
    result = model.load_state_dict(tensors, strict=False, assign=True)
    quantized = {f"{n}.weight" for n in record["layers"]}
    absent = [k for k in result.missing_keys if k not in quantized]
    if missing or absent or result.unexpected_keys:
        problems = {"quantized layers absent or of another shape": missing, "missing tensors": absent,
                    "unused tensors": result.unexpected_keys}
        detail = "; ".join(f"{len(v)} {k} (e.g. {sorted(v)[:3]})" for k, v in problems.items() if v)
        raise WeightsMismatchError(f"The quantized weights in {folder!r} do not fit its config.json: {detail}.")
    model._quantization = spec
    return model.eval()
