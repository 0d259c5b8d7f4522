"""Vision adapter: any timm backbone -> projector (MLP or learned-query resampler) -> `PrefixEmbeds`.

```python
adapter = VisionAdapter(backbone="resnet18", hidden_size=512, projector="resampler", num_queries=32,
                        pretrained_path="weights/resnet18.safetensors")   # local file or folder; random otherwise
pixels = adapter.preprocess([pil_image, "photo.jpg", np_array])          # [B, 3, H, W], normalised
prefix = adapter(pixels)                                                  # PrefixEmbeds([B, P, D], [B, P])
```

Weights never come from a hub: the trunk is built with `pretrained=False` and, when `pretrained_path`
is given, loaded from that local safetensors file (a pickled .pth / .bin is refused, with the line that
converts it). Preprocessing follows the trunk's timm data config (input size, mean/std, interpolation,
crop_pct) and lives in `ImagePreprocessor`, a small picklable object that DataLoader workers run without
the model. Every PIL mode is read at its own depth: 16-bit grey is scaled to [0, 1], not clipped to white.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field

import numpy as np
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import register_to_config

# diffusers' pipeline loader finds the loading method by looking base classes up in this module's namespace.
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401
from PIL import Image, ImageOps

from latent.config_checks import NON_NEGATIVE, POSITIVE, one_of
from latent.loading import PICKLED, refuse_pickle_file, require_safetensors

from .base import ModalityAdapter, PrefixEmbeds, register_adapter

__all__ = ["ImagePreprocessor", "VisionAdapter", "Resampler", "load_image", "IMAGE_EXTENSIONS", "ImageError"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class ImageError(ValueError):
    """An input image is unusable (unreadable, corrupt, wrong shape/dtype, too small or too large)."""


def _name(index, source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return f"image {os.fspath(source)!r}"
    return f"image {index}" if index is not None else "the image"


def load_image(path: str | os.PathLike, max_pixels: int = 64_000_000, index=None) -> Image.Image:
    """Open and fully decode an image file; corrupt, truncated or huge files raise `ImageError`.

    The size is checked from the header before decoding, so a decompression bomb costs nothing.
    """
    path = os.fspath(path)
    label = _name(index, path)
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise ImageError(f"{label} is {w}x{h} = {w * h} pixels, more than max_pixels={max_pixels}.")
            im.load()  # decodes now: truncated files fail here, inside this try
            return ImageOps.exif_transpose(im)  # a copy, upright if the camera recorded a rotation
    except ImageError:
        raise
    except FileNotFoundError as err:
        raise ImageError(f"{label} does not exist.") from err
    except IsADirectoryError as err:
        raise ImageError(f"{label} is a folder, not an image file.") from err
    except PermissionError as err:
        raise ImageError(f"{label} cannot be read: permission denied.") from err
    except Image.DecompressionBombError as err:
        raise ImageError(f"{label} is too large to decode safely: {err}") from err
    except (OSError, SyntaxError, ValueError) as err:  # PIL: UnidentifiedImageError (OSError), truncated data
        raise ImageError(f"{label} is not a readable image ({type(err).__name__}: {err}).") from err


def _pil_to_float(im: Image.Image, background: tuple[int, int, int], label: str) -> torch.Tensor:
    """PIL image of any mode -> float [3, H, W] in [0, 1]; transparency is composited on `background`.

    Integer grey of more than 8 bits ("I;16*" from 16-bit PNG / TIFF, "I") is scaled from 0..65535:
    `convert("RGB")` would clip every value above 255 to white. Float grey ("F") must hold [0, 1], like
    float arrays."""
    if im.mode.startswith("I"):
        grey = np.asarray(im).astype(np.float32)
        if grey.size and (grey.min() < 0 or grey.max() > 65535):
            raise ImageError(
                f"{label} is a {im.mode} image with values in [{grey.min():.0f}, {grey.max():.0f}]; integer images "
                "are read as 16-bit (0..65535): convert it to 8 or 16 bits."
            )
        return torch.from_numpy(grey / 65535.0)[None].expand(3, -1, -1)
    if im.mode == "F":
        return _array_to_float(np.array(im), label, background)
    try:
        if im.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in im.info:
            im = im.convert("RGBA")
            im = Image.alpha_composite(Image.new("RGBA", im.size, (*background, 255)), im)
        if im.mode != "RGB":
            im = im.convert("RGB")
    except ValueError as err:  # a mode PIL cannot turn into RGB
        raise ImageError(f"{label} has PIL mode {im.mode!r}, which cannot be converted to RGB ({err}).") from err
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0


def _array_to_float(arr, label: str, background) -> torch.Tensor:
    """numpy array or tensor ([H, W], [H, W, C] or [C, H, W], C in 1/3/4) -> float [3, H, W] in [0, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(arr)) if isinstance(arr, np.ndarray) else arr.detach().cpu()
    if t.ndim == 2:
        t = t[None]
    if t.ndim != 3:
        raise ImageError(
            f"{label} has shape {tuple(t.shape)}; give [H, W], [H, W, C] or [C, H, W] with C = 1, 3 or 4 "
            "(batches as a list or a [B, C, H, W] tensor)."
        )
    if t.shape[0] in (1, 3, 4) and t.shape[-1] not in (1, 3, 4):
        chw = t
    elif t.shape[-1] in (1, 3, 4):
        chw = t.permute(2, 0, 1)
    elif t.shape[0] in (1, 3, 4):
        chw = t
    else:
        raise ImageError(
            f"{label} has shape {tuple(t.shape)}: no axis of size 1, 3 or 4 to read as channels "
            "(grey, RGB or RGBA are supported)."
        )
    if chw.dtype == torch.uint8:
        x = chw.float() / 255.0
    elif chw.dtype == torch.bool:
        x = chw.float()
    elif chw.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        x = chw.float()
        if x.numel() and not torch.isfinite(x).all():
            raise ImageError(f"{label} holds NaN or infinite values.")
        if x.numel() and (x.min() < -1e-3 or x.max() > 1 + 1e-3):
            raise ImageError(
                f"{label} is a float image with values in [{float(x.min()):.3g}, {float(x.max()):.3g}]; "
                "float images must be in [0, 1] (divide uint8 data by 255, or pass it as uint8)."
            )
        x = x.clamp(0, 1)
    elif chw.dtype == torch.uint16:
        x = chw.float() / 65535.0
    else:
        raise ImageError(f"{label} has dtype {chw.dtype}; use uint8 (0..255), uint16 or float in [0, 1].")
    c = x.shape[0]
    if c == 1:
        x = x.expand(3, -1, -1)
    elif c == 4:
        alpha = x[3:4]
        bg = torch.tensor(background, dtype=x.dtype)[:, None, None] / 255.0
        x = x[:3] * alpha + bg * (1 - alpha)
    return x


@dataclass
class ImagePreprocessor:
    """Images (PIL, numpy, tensors, file paths) -> normalised float [B, 3, H, W] for one timm trunk.

    Resize the shorter side to `size / crop_pct` and centre-crop `size` (timm's eval transform), then
    normalise with `mean` / `std`. Picklable: DataLoader workers run it without the model.
    """

    input_size: tuple[int, int] = (224, 224)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bicubic"
    crop_pct: float = 1.0
    min_side: int = 8
    max_pixels: int = 64_000_000
    background: tuple[int, int, int] = (255, 255, 255)
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_timm(cls, model: nn.Module, image_size: int | tuple[int, int] | None = None, **kw) -> ImagePreprocessor:
        cfg = timm.data.resolve_model_data_config(model)
        size = tuple(cfg["input_size"][1:])
        if image_size is not None:
            size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        interp = cfg.get("interpolation", "bicubic")
        return cls(
            input_size=size, mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
            interpolation=interp if interp in ("bilinear", "bicubic", "nearest") else "bilinear",
            crop_pct=float(cfg.get("crop_pct", 1.0) or 1.0), **kw,
        )

    # ---- one image ------------------------------------------------------------------------------
    def to_float(self, raw, index=None) -> torch.Tensor:
        """One image of any supported kind -> float [3, H, W] in [0, 1], checked."""
        label = _name(index, raw)
        if isinstance(raw, (str, os.PathLike)):
            raw = load_image(raw, self.max_pixels, index)
        if isinstance(raw, Image.Image):
            w, h = raw.size
            self._check_size(h, w, label)
            return _pil_to_float(raw, self.background, label)
        if isinstance(raw, (np.ndarray, torch.Tensor)):
            if isinstance(raw, np.ndarray) and raw.dtype == object:
                raise ImageError(f"{label} is a numpy array of Python objects; give a numeric array.")
            x = _array_to_float(raw, label, self.background)
            self._check_size(x.shape[1], x.shape[2], label)
            return x
        raise ImageError(
            f"{label} is a {type(raw).__name__}; give a PIL image, a numpy array, a tensor or a file path."
        )

    def _check_size(self, h: int, w: int, label: str) -> None:
        if min(h, w) < self.min_side:
            raise ImageError(f"{label} is {w}x{h}; images need at least {self.min_side} pixels on each side.")
        if h * w > self.max_pixels:
            raise ImageError(f"{label} is {w}x{h} = {h * w} pixels, more than max_pixels={self.max_pixels}.")

    def resize_crop(self, x: torch.Tensor) -> torch.Tensor:
        """float [3, H, W] -> [3, *input_size]: shorter side to size / crop_pct, then centre crop."""
        th, tw = self.input_size
        h, w = x.shape[-2:]
        crop = min(self.crop_pct, 1.0)
        # Smallest aspect-preserving scale that covers (th, tw) / crop_pct (timm: shorter side to size / crop_pct).
        s = max(math.floor(th / crop) / h, math.floor(tw / crop) / w)
        nh, nw = max(th, round(h * s)), max(tw, round(w * s))
        if (nh, nw) != (h, w):
            mode = self.interpolation
            x = F.interpolate(
                x[None], size=(nh, nw), mode=mode, antialias=mode in ("bilinear", "bicubic"),
                align_corners=False if mode != "nearest" else None,
            )[0].clamp(0, 1)
        top, left = (nh - th) // 2, (nw - tw) // 2
        return x[:, top : top + th, left : left + tw]

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device)[:, None, None]
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device)[:, None, None]
        return (x - mean) / std

    def one(self, raw, index=None) -> torch.Tensor:
        """One image -> normalised float [3, H, W]."""
        return self.normalize(self.resize_crop(self.to_float(raw, index)))

    # ---- batches --------------------------------------------------------------------------------
    def __call__(self, images) -> torch.Tensor:
        """One image or a list of them (or a [B, C, H, W] tensor / array) -> float [B, 3, H, W]."""
        items = as_image_list(images)
        return torch.stack([self.one(im, i) for i, im in enumerate(items)])


def as_image_list(images) -> list:
    """Normalise the `images` argument: one image, a list/tuple, or a 4D batch -> list of single images."""
    if images is None:
        raise ImageError("images is None; give a PIL image, an array, a tensor, a file path or a list of them.")
    if isinstance(images, (list, tuple)):
        items = list(images)
    elif isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        items = list(images)
    else:
        items = [images]
    if not items:
        raise ImageError("images is empty; give at least one image.")
    return items


class Resampler(nn.Module):
    """Learned-query resampler: a fixed number of queries cross-attend to the image features.

    Features carry a fixed 2D sine-cosine position code (the attention alone is order-blind), so any
    input resolution works and the prefix length is always `num_queries`.
    """

    def __init__(self, in_dim: int, dim: int, num_queries: int, layers: int, heads: int):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(num_queries, dim) * 0.02)
        self.in_norm = nn.LayerNorm(in_dim)
        self.in_proj = nn.Linear(in_dim, dim)
        self.layers = nn.ModuleList()
        for _ in range(layers):
            self.layers.append(
                nn.ModuleDict(
                    dict(
                        q_norm=nn.LayerNorm(dim), kv_norm=nn.LayerNorm(dim),
                        attn=nn.MultiheadAttention(dim, heads, batch_first=True),
                        mlp_norm=nn.LayerNorm(dim),
                        mlp=nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)),
                    )
                )
            )
        self.out_norm = nn.LayerNorm(dim)

    def forward(self, feats: torch.Tensor, grid: tuple[int, int] | None) -> torch.Tensor:
        kv = self.in_proj(self.in_norm(feats))
        if grid is not None:
            kv = kv + sincos_2d(grid, kv.shape[-1], kv.device, kv.dtype)[None]
        q = self.queries[None].expand(feats.shape[0], -1, -1).to(kv.dtype)
        for layer in self.layers:
            kvn = layer["kv_norm"](kv)
            q = q + layer["attn"](layer["q_norm"](q), kvn, kvn, need_weights=False)[0]
            q = q + layer["mlp"](layer["mlp_norm"](q))
        return self.out_norm(q)


def sincos_2d(grid: tuple[int, int], dim: int, device, dtype) -> torch.Tensor:
    """Fixed 2D sine-cosine position code [h * w, dim] (row-major), zero-padded if dim % 4."""
    h, w = grid
    quarter = dim // 4
    freqs = 1.0 / 10000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / max(quarter, 1))
    ys, xs = torch.meshgrid(
        torch.arange(h, device=device, dtype=torch.float32), torch.arange(w, device=device, dtype=torch.float32),
        indexing="ij",
    )
    ay, ax = ys.reshape(-1, 1) * freqs, xs.reshape(-1, 1) * freqs
    code = torch.cat([ay.sin(), ay.cos(), ax.sin(), ax.cos()], dim=1)
    if code.shape[1] < dim:
        code = F.pad(code, (0, dim - code.shape[1]))
    return code.to(dtype)


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A state dict from a local safetensors file, or a folder holding one; pickles are refused by name."""
    if os.path.isdir(path):
        names = sorted(os.listdir(path))
        pick = [n for n in ("model.safetensors", "pytorch_model.safetensors") if n in names]
        pick = pick or [n for n in names if n.endswith(".safetensors")]
        if not pick:
            require_safetensors(path, "model.safetensors", "trunk weights")  # raises, naming any pickles
        if len(pick) > 1 and not pick[0].startswith(("model.", "pytorch_model.")):
            raise ValueError(f"pretrained_path {path!r} holds several weight files {pick}; name one of them.")
        path = os.path.join(path, pick[0])
    if not os.path.isfile(path):
        raise ValueError(f"pretrained_path {path!r} does not exist (weights are only read from local files).")
    if path.endswith(PICKLED):
        raise refuse_pickle_file(path)
    from safetensors.torch import load_file

    try:
        sd = load_file(path, device="cpu")
    except Exception as err:  # noqa: BLE001 - any failure here means a bad file; say which
        raise ValueError(f"Could not read weights from {path!r}: {type(err).__name__}: {err}") from err
    prefixes = ("module.", "trunk.", "model.")
    for p in prefixes:
        if sd and all(k.startswith(p) for k in sd):
            sd = {k[len(p) :]: v for k, v in sd.items()}
    return sd


def load_trunk_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load local pretrained weights into a timm model; the classifier head (absent here) is skipped."""
    path = os.fspath(path)
    sd = _read_state_dict(path)
    filt = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filt is not None:  # timm's own converter (e.g. resizes a ViT's position embedding to img_size)
        try:
            sd = filt(sd, model)
        except Exception:  # noqa: BLE001 - the converter expects the original layout; keep ours
            pass
    own = model.state_dict()
    head = model.pretrained_cfg.get("classifier") if hasattr(model, "pretrained_cfg") else None
    heads = [head] if isinstance(head, str) else list(head or [])
    sd = {k: v for k, v in sd.items() if not any(k == h or k.startswith(h + ".") for h in heads) or k in own}
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [k for k in sd if k in own and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        raise ValueError(
            f"Weights in {path!r} do not fit timm model {type(model).__name__}: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}), "
            f"{len(wrong)} with the wrong shape (e.g. {[(k, tuple(sd[k].shape), tuple(own[k].shape)) for k in wrong[:3]]})."
        )
    model.load_state_dict(sd, strict=True)


def _create_trunk(name: str, image_size, kwargs: dict) -> nn.Module:
    if name not in timm.list_models() and name.split(".")[0] not in timm.list_models():
        close = [m for m in timm.list_models(f"*{name.split('_')[0]}*")][:8]
        raise ValueError(f"timm has no model named {name!r}" + (f"; similar: {close}." if close else "."))
    kwargs = dict(kwargs)
    if image_size is not None and "img_size" not in kwargs:
        try:  # transformers with a fixed patch grid (ViT family) need it at build time
            return timm.create_model(name, pretrained=False, num_classes=0, img_size=image_size, **kwargs)
        except TypeError:
            pass
    return timm.create_model(name, pretrained=False, num_classes=0, **kwargs)


@register_adapter("vision")
class VisionAdapter(ModalityAdapter):
    """timm trunk -> features -> projector -> PrefixEmbeds [B, P, hidden_size].

    backbone: any `timm.list_models()` name. backbone_kwargs: extra `timm.create_model` arguments
    (e.g. a smaller `depth` for tests). image_size: input side (default: the trunk's data config).
    projector: "mlp" (one prefix slot per feature-map cell, after optional `pool_size` x `pool_size`
    average pooling) or "resampler" (`num_queries` learned queries, `resampler_layers` cross-attention
    layers). freeze_trunk: keep the timm trunk fixed (stage 1); `unfreeze_trunk()` for stage 2.
    drop_prefix_tokens: drop a ViT's class/register tokens and keep patch tokens.
    pretrained_path: local weights for the trunk (never saved in the config: after `save_pretrained`
    the trunk's weights travel with the adapter).
    """

    trunk_attr = "trunk_model"
    ignore_for_config = ["pretrained_path"]
    config_rules = {
        "projector": one_of("mlp", "resampler"),
        **{k: POSITIVE for k in ("hidden_size", "num_queries", "pool_size", "projector_hidden", "resampler_heads",
                                 "image_size", "min_image_side", "max_image_pixels")},
        "resampler_layers": NON_NEGATIVE,
    }

    @register_to_config
    def __init__(
        self,
        backbone: str = "resnet18",
        hidden_size: int = 512,
        projector: str = "mlp",
        num_queries: int = 32,
        pool_size: int | None = None,
        projector_hidden: int | None = None,
        resampler_layers: int = 2,
        resampler_heads: int = 8,
        image_size: int | None = None,
        backbone_kwargs: dict | None = None,
        freeze_trunk: bool = True,
        drop_prefix_tokens: bool = True,
        min_image_side: int = 8,
        max_image_pixels: int = 64_000_000,
        pretrained_path: str | None = None,
    ):
        super().__init__()  # checks the config against config_rules first
        if projector == "resampler" and hidden_size % resampler_heads:
            raise ValueError(f"hidden_size={hidden_size} must be divisible by resampler_heads={resampler_heads}.")
        self.trunk_model = _create_trunk(backbone, image_size, backbone_kwargs or {})
        if pretrained_path is not None:
            load_trunk_weights(self.trunk_model, pretrained_path)
        feat_dim = int(getattr(self.trunk_model, "num_features", 0) or self.trunk_model.feature_info[-1]["num_chs"])
        self.feature_dim = feat_dim
        size = image_size if image_size is not None else (backbone_kwargs or {}).get("img_size")
        self._preprocessor = ImagePreprocessor.from_timm(
            self.trunk_model, size, min_side=min_image_side, max_pixels=max_image_pixels
        )
        if projector == "mlp":
            width = projector_hidden or hidden_size
            self.proj = nn.Sequential(
                nn.LayerNorm(feat_dim), nn.Linear(feat_dim, width), nn.GELU(), nn.Linear(width, hidden_size)
            )
        else:
            self.proj = Resampler(feat_dim, hidden_size, num_queries, resampler_layers, resampler_heads)
        self._num_tokens: int | None = None
        if freeze_trunk:
            self.freeze_trunk()

    # ---- data side ------------------------------------------------------------------------------
    @property
    def preprocessor(self) -> ImagePreprocessor:
        return self._preprocessor

    @torch.no_grad()
    def preprocess(self, images) -> torch.Tensor:
        """PIL / numpy / tensor / path, or a list of them -> pixel_values float [B, 3, H, W]."""
        return self._preprocessor(images)

    # ---- model side -----------------------------------------------------------------------------
    def features(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int] | None]:
        """Trunk features as tokens [B, T, C] and their grid (h, w) when known."""
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(
                f"pixel_values must be [B, 3, H, W] (use adapter.preprocess(images)), got {tuple(pixel_values.shape)}."
            )
        p = next(self.trunk_model.parameters())
        pixel_values = pixel_values.to(device=p.device, dtype=p.dtype)
        if self.trunk_frozen:
            with torch.no_grad():
                f = self.trunk_model.forward_features(pixel_values)
        else:
            f = self.trunk_model.forward_features(pixel_values)
        if isinstance(f, (list, tuple)):
            f = f[-1]
        grid = None
        if f.ndim == 4:  # CNN feature map [B, C, h, w]
            if self.config.pool_size is not None and self.config.projector == "mlp":
                f = F.adaptive_avg_pool2d(f, self.config.pool_size)
            grid = tuple(f.shape[-2:])
            f = f.flatten(2).transpose(1, 2)
        elif f.ndim == 3:  # transformer tokens [B, T, C]
            n_pre = int(getattr(self.trunk_model, "num_prefix_tokens", 0) or 0)
            if self.config.drop_prefix_tokens and n_pre and f.shape[1] > n_pre:
                f = f[:, n_pre:]
            side = math.isqrt(f.shape[1])
            if side * side == f.shape[1]:
                grid = (side, side)
                if self.config.pool_size is not None and self.config.projector == "mlp":
                    g = f.transpose(1, 2).reshape(f.shape[0], -1, side, side)
                    g = F.adaptive_avg_pool2d(g, self.config.pool_size)
                    grid = tuple(g.shape[-2:])
                    f = g.flatten(2).transpose(1, 2)
        else:
            raise ValueError(f"timm model {self.config.backbone!r} returned features of shape {tuple(f.shape)}.")
        return f, grid

    def forward(self, pixel_values: torch.Tensor) -> PrefixEmbeds:
        feats, grid = self.features(pixel_values)
        proj_dtype = next(self.proj.parameters()).dtype
        feats = feats.to(proj_dtype)
        if self.config.projector == "mlp":
            embeds = self.proj(feats)
        else:
            embeds = self.proj(feats, grid)
        mask = torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
        return PrefixEmbeds(embeds, mask)

    @property
    def num_prefix_tokens(self) -> int:
        """Prefix slots per image (fixed: the resampler's queries, or the feature grid at input_size)."""
        if self.config.projector == "resampler":
            return self.config.num_queries
        if self._num_tokens is None:
            was = self.training
            self.eval()
            with torch.no_grad():
                p = next(self.trunk_model.parameters())
                x = torch.zeros(1, 3, *self._preprocessor.input_size, device=p.device, dtype=p.dtype)
                self._num_tokens = self.features(x)[0].shape[1]
            self.train(was)
        return self._num_tokens
