"""Speech adapter (DIFFA style): waveform -> features -> speech encoder -> semantic + acoustic adapters -> prefix.

```python
adapter = AudioAdapter(hidden_size=256)                       # in-project conv-subsampler + transformer encoder
adapter = AudioAdapter(hidden_size=256, encoder="hf", encoder_path="weights/whisper-tiny")  # local folder only
batch = adapter.preprocess(["a.wav", (array, 22050), tensor])  # AudioBatch: padded features + lengths
prefix = adapter(batch)                                       # PrefixEmbeds([B, P, D], [B, P]), padding on the left
```

Pieces (each usable alone):

- `AudioPreprocessor` (data side, picklable): files (WAV/FLAC/OGG via soundfile), numpy arrays, tensors,
  `(array, sampling_rate)` pairs or `{"array", "sampling_rate"}` dicts -> checked mono float32 at 16 kHz
  (torchaudio resampling, channel mean as downmix) -> features: log-mel or Kaldi fbank with per-utterance
  mean/variance normalisation, Whisper's own log-mel, or the normalised waveform (wav2vec2).
- `SpeechEncoder`: a convolutional subsampler (two stride-2 convolutions, 4x fewer frames) and a pre-norm
  transformer, trained in this project; or `HFSpeechEncoder`, any transformers Whisper / wav2vec2-like
  encoder rebuilt from its config (weights only from a local folder). Both return every layer's hidden
  states and the valid-frame mask.
- `SemanticAdapter`: stacks `downsample` consecutive frames of the LAST encoder layer and projects them with an
  MLP (one prefix slot per `downsample` frames, so its length follows the audio).
- `AcousticAdapter`: a learned-layer-weighted sum of SEVERAL encoder layers, read by `num_queries` learned queries
  through masked cross-attention (a fixed number of prefix slots).
  Both are `ModelMixin`s: `adapter.semantic.save_pretrained(dir)` / `SemanticAdapter.from_pretrained(dir)`.
- `AudioAdapter`: the registered modality adapter ("audio") chaining them; its prefix is [semantic | acoustic]
  with every row's valid slots moved to the END (left padding), so a clip gets the same relative positions to
  the text after it whatever else is in the batch.

Bad input raises `AudioError` (a `ValueError`) naming the input: unreadable files, empty, silent, NaN/inf,
shorter than one analysis frame, longer than `max_seconds`, unsupported dtypes, or shapes that are not
[T], [C, T] or [T, C].
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchaudio
from diffusers.configuration_utils import ConfigMixin, register_to_config

# diffusers' pipeline loader finds the loading method by looking base classes up in this module's namespace.
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401

from latent.config_checks import FINITE_NON_NEGATIVE, FINITE_POSITIVE, POSITIVE
from latent.loading import SafeModelMixin, load_hf_model

from .base import ModalityAdapter, PrefixEmbeds, left_align, register_adapter
from .ctc_alignment import align_batch

__all__ = [
    "SAMPLE_RATE", "AUDIO_EXTENSIONS", "AudioError", "AudioBatch", "AudioPreprocessor", "load_audio",
    "as_audio_list", "SpeechEncoder", "HFSpeechEncoder", "SemanticAdapter", "AcousticAdapter", "AudioAdapter",
    "left_align", "ctc_best_path", "warp_frequencies",
]

SAMPLE_RATE = 16_000
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".aiff", ".aif", ".au", ".mp3")
FEATURES = ("log_mel", "fbank", "whisper", "waveform")
# integer PCM: dtype -> (offset, scale) so that float = (x - offset) / scale lies in [-1, 1)
_PCM = {torch.int16: (0.0, 32768.0), torch.int32: (0.0, 2147483648.0), torch.int8: (0.0, 128.0),
        torch.uint8: (128.0, 128.0)}


class AudioError(ValueError):
    """An input clip is unusable (unreadable, empty, silent, non-finite, too short or long, wrong shape/dtype)."""


def _label(index, source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return f"audio {os.fspath(source)!r}"
    if isinstance(source, dict) and isinstance(source.get("path"), (str, os.PathLike)):
        return f"audio {os.fspath(source['path'])!r}"
    return f"audio {index}" if index is not None else "the audio"


def load_audio(path: str | os.PathLike, max_seconds: float | None = None, index=None) -> tuple[np.ndarray, int]:
    """Read a sound file with soundfile -> (float32 [T, C] in [-1, 1], sampling rate). Errors name the file;
    the duration is checked from the header before decoding."""
    import soundfile as sf

    path = os.fspath(path)
    label = _label(index, path)
    if not os.path.exists(path):
        raise AudioError(f"{label} does not exist.")
    if os.path.isdir(path):
        raise AudioError(f"{label} is a folder, not a sound file.")
    try:
        info = sf.info(path)
        if max_seconds is not None and info.samplerate > 0 and info.frames / info.samplerate > max_seconds:
            raise AudioError(
                f"{label} lasts {info.frames / info.samplerate:.2f} s, longer than max_seconds={max_seconds:g}."
            )
        data, sr = sf.read(path, dtype="float32", always_2d=True)
    except AudioError:
        raise
    except PermissionError as err:
        raise AudioError(f"{label} cannot be read: permission denied.") from err
    except Exception as err:  # noqa: BLE001 - soundfile raises LibsndfileError / RuntimeError / TypeError
        raise AudioError(f"{label} is not a readable sound file ({type(err).__name__}: {err}).") from err
    return data, int(sr)


def as_audio_list(audio) -> list:
    """Normalise the `audio` argument: one clip or a list/tuple of clips -> a list of clips.

    A list of numbers is read as ONE clip; a (array, int) pair is one clip with its sampling rate.
    Several clips are always a list (a 2D array is one multi-channel clip, never a batch)."""
    if audio is None:
        raise AudioError("audio is None; give a file path, an array, a tensor, (array, sampling_rate) or a list.")
    if isinstance(audio, tuple) and len(audio) == 2 and isinstance(audio[1], (int, float)) and not isinstance(
        audio[1], bool
    ):
        return [audio]
    if isinstance(audio, (list, tuple)):
        if audio and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in audio):
            return [np.asarray(audio, dtype=np.float32)]
        items = list(audio)
    else:
        items = [audio]
    if not items:
        raise AudioError("audio is empty; give at least one clip.")
    return items


def warp_frequencies(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Features [B, T, F] with row b's frequency axis stretched by factors[b]: bin k takes the value at
    k / factor (linear interpolation, the top bin past the edge), so a factor above 1 moves formants up."""
    f = x.shape[-1]
    source = (torch.arange(f, dtype=x.dtype, device=x.device) / factors.to(x)[:, None]).clamp(max=f - 1)
    lo = source.floor().long().clamp(max=f - 2) if f > 1 else source.floor().long()
    hi = (lo + 1).clamp(max=f - 1)
    frac = (source - lo).clamp(0, 1)[:, None, :]
    take = lambda index: x.gather(2, index[:, None, :].expand(-1, x.shape[1], -1))  # noqa: E731
    return take(lo) * (1 - frac) + take(hi) * frac


@dataclass
class AudioBatch:
    """Padded model inputs of a batch of clips.

    values: [B, T, F] features (log_mel / fbank / whisper) or [B, T] normalised waveform (waveform).
    lengths: [B] valid frames (or samples) of each row; positions >= length are zeros.
    """

    values: torch.Tensor
    lengths: torch.Tensor

    @property
    def mask(self) -> torch.Tensor:
        """[B, T] bool, True on valid frames."""
        return torch.arange(self.values.shape[1], device=self.lengths.device)[None] < self.lengths[:, None]

    def __len__(self) -> int:
        return self.values.shape[0]

    def to(self, *args, **kwargs) -> AudioBatch:
        values = self.values.to(*args, **kwargs)
        return AudioBatch(values, self.lengths.to(values.device))

    def select(self, rows) -> AudioBatch:
        return AudioBatch(self.values[rows], self.lengths[rows])


@dataclass
class AudioPreprocessor:
    """Clips of any supported kind -> checked 16 kHz mono waveform -> normalised features (`AudioBatch`).

    feature: "log_mel" (torchaudio MelSpectrogram, natural log), "fbank" (torchaudio's Kaldi fbank),
    "whisper" (Whisper's log10 mel, clamped to max - 8 and scaled, padded to `fixed_frames`) or "waveform"
    (samples, zero mean and unit variance). `normalize` applies per-utterance mean/variance normalisation
    to log_mel / fbank features (each mel bin over the clip's frames) and to the waveform.
    A bare array or tensor is taken to be at `sample_rate` unless a sampling rate comes with it.
    Picklable: DataLoader workers run it without the model.
    """

    sample_rate: int = SAMPLE_RATE
    feature: str = "log_mel"
    n_mels: int = 80
    n_fft: int = 400
    win_length: int = 400  # 25 ms at 16 kHz: the shortest clip accepted ("one frame")
    hop_length: int = 160  # 10 ms
    normalize: bool = True
    max_seconds: float = 30.0
    fixed_frames: int | None = None  # whisper: features padded to this many frames (2 * max_source_positions)
    min_peak: float = 1e-4  # a clip whose largest |sample| is below this is "silent"
    max_float_peak: float = 2.0  # float samples beyond this are integer PCM stored as float: refused
    max_channels: int = 8
    eps: float = 1e-5
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.feature not in FEATURES:
            raise ValueError(f"feature={self.feature!r} is unknown; choose one of {FEATURES}.")
        if self.feature == "whisper":
            if self.fixed_frames is None:
                raise ValueError("feature='whisper' needs fixed_frames (2 * the encoder's max_source_positions).")
            self.max_seconds = min(self.max_seconds, self.fixed_frames * self.hop_length / self.sample_rate)

    def __getstate__(self):  # the cached transforms are rebuilt in each worker
        state = dict(self.__dict__)
        state["_cache"] = {}
        return state

    # ---- waveform ---------------------------------------------------------------------------------
    @property
    def min_samples(self) -> int:
        return self.win_length

    @property
    def max_samples(self) -> int:
        return int(self.max_seconds * self.sample_rate)

    def waveform(self, raw, index=None, sampling_rate: int | None = None) -> torch.Tensor:
        """One clip -> float32 [T] mono at `sample_rate`, checked. See `as_audio_list` for the kinds."""
        label = _label(index, raw)
        sr = sampling_rate
        if isinstance(raw, dict):
            if "array" in raw:
                sr = raw.get("sampling_rate", raw.get("sample_rate", sr))
                raw = raw["array"]
            elif "path" in raw:
                raw = raw["path"]
            else:
                raise AudioError(f"{label} is a dict without 'array' or 'path'; got keys {sorted(raw)}.")
        if isinstance(raw, tuple):
            if len(raw) != 2 or not isinstance(raw[1], (int, float)) or isinstance(raw[1], bool):
                raise AudioError(f"{label} is a tuple; give (array, sampling_rate).")
            raw, sr = raw
        if isinstance(raw, (str, os.PathLike)):
            data, sr = load_audio(raw, self.max_seconds, index)
            x = torch.from_numpy(data).T  # [C, T]
        elif isinstance(raw, (np.ndarray, torch.Tensor)):
            x = self._array(raw, label)
        else:
            raise AudioError(
                f"{label} is a {type(raw).__name__}; give a file path, a numpy array, a tensor, "
                "(array, sampling_rate) or {'array': ..., 'sampling_rate': ...}."
            )
        sr = self.sample_rate if sr is None else sr
        if not float(sr).is_integer() or sr <= 0:
            raise AudioError(f"{label} has sampling rate {sr!r}; give a positive integer in Hz.")
        sr = int(sr)
        if x.shape[-1] == 0:
            raise AudioError(f"{label} is empty (0 samples).")
        if not bool(torch.isfinite(x).all()):
            raise AudioError(f"{label} holds NaN or infinite samples.")
        seconds = x.shape[-1] / sr
        if seconds > self.max_seconds + 1e-9:
            raise AudioError(f"{label} lasts {seconds:.2f} s, longer than max_seconds={self.max_seconds:g}.")
        x = x.mean(0) if x.shape[0] > 1 else x[0]  # downmix: the mean of the channels
        if sr != self.sample_rate:
            x = torchaudio.functional.resample(x, sr, self.sample_rate)
        if x.shape[-1] < self.min_samples:
            raise AudioError(
                f"{label} has {x.shape[-1]} samples at {self.sample_rate} Hz, shorter than one analysis frame "
                f"({self.min_samples} samples = {1000 * self.min_samples / self.sample_rate:g} ms)."
            )
        x = x[: self.max_samples]  # resampling can add a sample or two at the limit
        peak = float(x.abs().max())
        if peak < self.min_peak:
            raise AudioError(f"{label} is silent (peak amplitude {peak:.2g} < min_peak={self.min_peak:g}).")
        return x.contiguous()

    def _array(self, raw, label: str) -> torch.Tensor:
        """An array or tensor -> float32 [C, T] in [-1, 1] (integer PCM scaled by its width)."""
        if isinstance(raw, np.ndarray):
            if raw.dtype == object or raw.dtype.kind in "USV":
                raise AudioError(f"{label} is a numpy array of dtype {raw.dtype}; give numeric samples.")
            if raw.dtype.kind == "u" and raw.dtype != np.uint8:
                raise AudioError(f"{label} has dtype {raw.dtype}; give float in [-1, 1], int16, int32 or uint8 PCM.")
            t = torch.from_numpy(np.ascontiguousarray(raw))
        else:
            t = raw.detach().cpu()
        if t.ndim == 1:
            t = t[None]
        elif t.ndim == 2:
            c0, c1 = t.shape
            if c0 <= self.max_channels and (c0 <= c1 or c1 > self.max_channels):
                pass  # [C, T]
            elif c1 <= self.max_channels:
                t = t.T  # [T, C]
            else:
                raise AudioError(
                    f"{label} has shape {tuple(t.shape)}: no axis of at most {self.max_channels} channels. A clip is "
                    "[T], [C, T] or [T, C]; give several clips as a list."
                )
        else:
            raise AudioError(
                f"{label} has shape {tuple(t.shape)}; a clip is [T], [C, T] or [T, C] (several clips: a list)."
            )
        if t.dtype in _PCM:
            off, scale = _PCM[t.dtype]
            return (t.float() - off) / scale
        if t.dtype == torch.bool or not t.is_floating_point():
            raise AudioError(
                f"{label} has dtype {t.dtype}; give float samples in [-1, 1] or integer PCM as int16 / int32 / uint8."
            )
        x = t.float()
        if x.numel() and bool(torch.isfinite(x).all()):
            peak = float(x.abs().max())
            if peak > self.max_float_peak:
                raise AudioError(
                    f"{label} is float audio with peak {peak:.4g}; float samples must lie in [-1, 1] (this looks like "
                    "integer PCM stored as float: divide by 32768, or pass the int16 array itself)."
                )
        return x

    # ---- features ---------------------------------------------------------------------------------
    def num_frames(self, num_samples: int) -> int:
        """Valid feature frames (or samples for "waveform") of a clip of `num_samples` samples."""
        if self.feature == "waveform":
            return num_samples
        if self.feature == "fbank":
            return 1 + (num_samples - self.win_length) // self.hop_length
        if self.feature == "whisper":
            return min(self.fixed_frames, -(-num_samples // self.hop_length))
        return 1 + num_samples // self.hop_length  # centred STFT

    def features(self, wave: torch.Tensor) -> torch.Tensor:
        """A checked waveform [T] -> features [frames, n_mels] (or the normalised waveform [T])."""
        if self.feature == "waveform":
            x = wave.float()
            return (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-7) if self.normalize else x
        if self.feature == "whisper":
            return self._whisper(wave)
        if self.feature == "fbank":
            feats = torchaudio.compliance.kaldi.fbank(
                wave[None] * 32768.0, num_mel_bins=self.n_mels, sample_frequency=float(self.sample_rate),
                frame_length=1000.0 * self.win_length / self.sample_rate,
                frame_shift=1000.0 * self.hop_length / self.sample_rate, dither=0.0, energy_floor=0.0,
            )
        else:
            mel = self._cache.get("mel")
            if mel is None:
                mel = self._cache["mel"] = torchaudio.transforms.MelSpectrogram(
                    sample_rate=self.sample_rate, n_fft=self.n_fft, win_length=self.win_length,
                    hop_length=self.hop_length, n_mels=self.n_mels, power=2.0,
                )
            feats = torch.log(mel(wave.float()) + 1e-6).T  # [frames, n_mels]
        if self.normalize:
            feats = normalize_utterance(feats, self.eps)
        return feats

    def _whisper(self, wave: torch.Tensor) -> torch.Tensor:
        n = self.fixed_frames * self.hop_length
        x = F.pad(wave.float(), (0, max(0, n - wave.shape[-1])))[:n]
        filt = self._cache.get("whisper_mel")
        if filt is None:
            filt = self._cache["whisper_mel"] = torchaudio.functional.melscale_fbanks(
                self.n_fft // 2 + 1, 0.0, self.sample_rate / 2, self.n_mels, self.sample_rate,
                norm="slaney", mel_scale="slaney",
            )  # [freqs, n_mels]
        spec = torch.stft(x, self.n_fft, self.hop_length, window=torch.hann_window(self.n_fft), return_complex=True)
        power = spec[:, :-1].abs() ** 2  # Whisper drops the last frame
        logmel = torch.clamp(filt.T @ power, min=1e-10).log10()
        logmel = torch.maximum(logmel, logmel.max() - 8.0)
        return ((logmel + 4.0) / 4.0).T  # [fixed_frames, n_mels]

    # ---- one clip, batches ------------------------------------------------------------------------
    def one(self, raw, index=None, sampling_rate: int | None = None) -> torch.Tensor:
        """One clip -> its features (unpadded)."""
        return self.features(self.waveform(raw, index, sampling_rate))

    def collate(self, feats: list[torch.Tensor], lengths: list[int] | None = None) -> AudioBatch:
        """Pad features of several clips (from `one`) into an `AudioBatch`."""
        if not feats:
            raise AudioError("no clips to collate.")
        if lengths is None:
            lengths = [f.shape[0] for f in feats]
        width = max(f.shape[0] for f in feats)
        values = feats[0].new_zeros((len(feats), width, *feats[0].shape[1:]))
        for i, f in enumerate(feats):
            values[i, : f.shape[0]] = f  # whisper rows keep their whole padded window (the encoder sees it)
        return AudioBatch(values, torch.tensor(lengths, dtype=torch.long))

    def item(self, raw, index=None, sampling_rate: int | None = None) -> tuple[torch.Tensor, int]:
        """One clip -> (features, valid frames): what `collate` takes."""
        wave = self.waveform(raw, index, sampling_rate)
        return self.features(wave), self.num_frames(wave.shape[-1])

    def __call__(self, audio, sampling_rate: int | None = None) -> AudioBatch:
        """One clip or a list -> `AudioBatch` (zero padded, with lengths)."""
        items = [self.item(a, i, sampling_rate) for i, a in enumerate(as_audio_list(audio))]
        return self.collate([f for f, _ in items], [n for _, n in items])


def normalize_utterance(feats: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-utterance mean/variance normalisation of [frames, dims]: every dim gets zero mean, unit variance."""
    mean = feats.mean(0, keepdim=True)
    var = feats.var(0, unbiased=False, keepdim=True)
    return (feats - mean) / torch.sqrt(var + eps)


# ---- the in-project encoder --------------------------------------------------------------------------
def sincos_1d(length: int, dim: int, device=None, dtype=torch.float32, offset: int = 0) -> torch.Tensor:
    """Fixed sine-cosine position code [length, dim]."""
    half = dim // 2
    freqs = 1.0 / 10000 ** (torch.arange(half, device=device, dtype=torch.float32) / max(half, 1))
    pos = torch.arange(offset, offset + length, device=device, dtype=torch.float32)[:, None] * freqs
    code = torch.cat([pos.sin(), pos.cos()], dim=1)
    if code.shape[1] < dim:
        code = F.pad(code, (0, dim - code.shape[1]))
    return code.to(dtype)


def _half(lengths: torch.Tensor) -> torch.Tensor:
    """Frames after a kernel-3, stride-2, padding-1 convolution: ceil(L / 2)."""
    return (lengths + 1) // 2


class _Block(nn.Module):
    """Pre-norm transformer block with a key padding mask (SDPA)."""

    def __init__(self, dim: int, heads: int, ff: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, ff), nn.GELU(), nn.Linear(ff, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        x = x + self.drop(self.out(a.transpose(1, 2).reshape(b, t, d)))
        return x + self.drop(self.mlp(self.norm2(x)))


class SpeechEncoder(nn.Module):
    """Features [B, T, F] -> two stride-2 convolutions (T/4 frames) -> transformer layers.

    Returns (hidden_states, mask): `num_layers + 1` tensors [B, T', dim] (the subsampler's output, then each
    layer; the last is layer-normed) and the valid-frame mask [B, T']. Padded frames are zeroed between the
    convolutions and never attended, so a clip's outputs do not depend on how much padding follows it.
    """

    def __init__(self, in_dim: int, dim: int = 256, layers: int = 4, heads: int = 4, ff: int | None = None,
                 channels: int | None = None, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"encoder_dim={dim} must be divisible by encoder_heads={heads}.")
        c = channels or min(dim, 64)
        self.conv1 = nn.Conv2d(1, c, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, stride=2, padding=1)
        freq = _half(_half(torch.tensor(in_dim))).item()
        self.proj = nn.Linear(c * freq, dim)
        self.blocks = nn.ModuleList(_Block(dim, heads, ff or 4 * dim, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.dim = dim

    @property
    def num_hidden_states(self) -> int:
        return len(self.blocks) + 1

    @property
    def hidden_dim(self) -> int:
        return self.dim

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        return _half(_half(lengths))

    def forward(self, batch: AudioBatch) -> tuple[list[torch.Tensor], torch.Tensor]:
        x = batch.values
        if x.ndim != 3:
            raise ValueError(f"SpeechEncoder takes features [B, T, F], got {tuple(x.shape)}; use feature='log_mel'.")
        lengths = batch.lengths.to(x.device)
        x = x[:, None]  # [B, 1, T, F]
        len1 = _half(lengths)
        x = F.gelu(self.conv1(x))
        x = x * (torch.arange(x.shape[2], device=x.device)[None] < len1[:, None])[:, None, :, None]
        len2 = _half(len1)
        x = F.gelu(self.conv2(x))
        mask = torch.arange(x.shape[2], device=x.device)[None] < len2[:, None]
        x = x * mask[:, None, :, None]
        b, c, t, f = x.shape
        h = self.proj(x.permute(0, 2, 1, 3).reshape(b, t, c * f)) + sincos_1d(t, self.dim, x.device, x.dtype)[None]
        states = [h]
        for blk in self.blocks:
            h = blk(h, mask)
            states.append(h)
        states[-1] = self.norm(h)
        return states, mask


# ---- transformers encoders -----------------------------------------------------------------------------
class HFSpeechEncoder(nn.Module):
    """A transformers speech encoder (Whisper's encoder, or wav2vec2 / HuBERT / WavLM) rebuilt from its config.

    `config` is the transformers config dict (with "model_type"); weights come from `AudioAdapter`'s state dict
    or, once, from a local folder (`from_folder`). Returns every hidden state and the valid-frame mask.
    """

    def __init__(self, config: dict):
        super().__init__()
        from transformers import AutoConfig, AutoModel

        cfg = dict(config)
        model_type = cfg.pop("model_type", None)
        if model_type is None:
            raise ValueError("encoder_config needs a 'model_type' (e.g. 'whisper', 'wav2vec2').")
        hf_cfg = AutoConfig.for_model(model_type, **{k: v for k, v in cfg.items() if not k.startswith("_")})
        self.model_type = model_type
        self.hf_config = hf_cfg
        model = AutoModel.from_config(hf_cfg)
        self.model = model.get_encoder() if self.is_whisper else model

    @property
    def is_whisper(self) -> bool:
        return self.model_type == "whisper"

    @staticmethod
    def read_folder(path: str | os.PathLike) -> tuple[dict, dict]:
        """(config dict, encoder state dict) of a local transformers folder (full model or encoder)."""
        from transformers import AutoConfig, AutoModel

        path = os.fspath(path)
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(
                f"encoder_path {path!r} holds no config.json; give a local folder written by a transformers "
                "model's save_pretrained() (nothing is downloaded)."
            )
        cfg = AutoConfig.from_pretrained(path, local_files_only=True)
        model = load_hf_model(AutoModel, path, "speech encoder")  # safetensors only, no tensor left random
        enc = model.get_encoder() if cfg.model_type == "whisper" else model
        return cfg.to_dict(), enc.state_dict()

    @property
    def num_hidden_states(self) -> int:
        c = self.hf_config
        return (c.encoder_layers if self.is_whisper else c.num_hidden_layers) + 1

    @property
    def hidden_dim(self) -> int:
        return self.hf_config.d_model if self.is_whisper else self.hf_config.hidden_size

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        if self.is_whisper:
            return (lengths - 1) // 2 + 1
        return self.model._get_feat_extract_output_lengths(lengths).long()

    def forward(self, batch: AudioBatch) -> tuple[list[torch.Tensor], torch.Tensor]:
        x, lengths = batch.values, batch.lengths.to(batch.values.device)
        if self.is_whisper:
            if x.ndim != 3:
                raise ValueError(f"a Whisper encoder takes features [B, T, n_mels], got {tuple(x.shape)}.")
            out = self.model(x.transpose(1, 2), output_hidden_states=True)
        else:
            if x.ndim != 2:
                raise ValueError(f"a {self.model_type} encoder takes waveforms [B, T], got {tuple(x.shape)}.")
            # models with group-norm feature extractors were trained without attention masks on zero padding
            attn = batch.mask.long() if getattr(self.hf_config, "feat_extract_norm", "layer") == "layer" else None
            out = self.model(x, attention_mask=attn, output_hidden_states=True)
        states = list(out.hidden_states)
        if len(states) == self.num_hidden_states - 1:  # some versions omit the embedding output
            states = [states[0], *states]
        states[-1] = out.last_hidden_state  # after the final layer norm
        out_len = self.output_lengths(lengths)
        mask = torch.arange(states[-1].shape[1], device=x.device)[None] < out_len[:, None]
        return states, mask


def _warps(decoder, batch: AudioBatch) -> tuple:
    """A transcript decoder's test-time frequency warps, checked against the inputs they stretch."""
    warps = tuple(getattr(decoder, "warps", ()) or ())
    if warps and batch.values.ndim != 3:
        raise ValueError("test-time frequency warps (decoder.warps) stretch the features' frequency axis "
                         f"[B, T, F]; these inputs are {list(batch.values.shape)} (a waveform). Use a decoder "
                         "with warps=().")
    return warps


def ctc_best_path(logits: torch.Tensor, mask: torch.Tensor, blank: int) -> list[list[int]]:
    """Greedy CTC decoding of frame logits [B, T, V] with valid-frame mask [B, T]: the argmax label of every valid
    frame, runs of one label collapsed, blanks dropped. Padded frames are skipped, so a run split by padding is
    still one token. One list of token ids per row."""
    labels = logits.argmax(-1).cpu()
    mask = mask.bool().cpu()
    out = []
    for row, valid in zip(labels, mask, strict=True):
        runs = torch.unique_consecutive(row[valid])
        out.append(runs[runs != blank].tolist())
    return out


# ---- the two adapters -----------------------------------------------------------------------------------
class SemanticAdapter(SafeModelMixin, ConfigMixin):
    """Downsampling projector over the last encoder layer, then an MLP to the backbone width.

    pooling="stack": `downsample` consecutive frames are stacked, [B, T, C] -> [B, ceil(T / k), D].
    pooling="ctc": CTC compression. A CTC head over `vocab_size` tokens (+ blank) labels every frame; runs of frames
    with the same non-blank label are averaged into one slot and blank frames are dropped, so the prefix holds about
    one slot per recognised token, in order, like the text the backbone was trained on. The head is trained with a
    CTC loss (`ctc_logits`); the LM loss reaches the encoder through the averaged frames.

    token_embeddings (pooling="ctc"): each slot also carries the backbone's input embedding of the tokens the CTC
    head hears there, weighted by its posteriors (the mean over the slot's frames, blank left out and the rest
    renormalised): slot = posteriors @ E + MLP(frames). A frozen backbone then starts from text it already reads,
    and the MLP (its last layer starts at zero) learns what the text misses. E is the `token_embedding` buffer
    [vocab_size, hidden_size], saved with the adapter; `set_token_embeddings` copies it from the backbone. The
    posteriors carry no gradient, so the LM loss never moves the CTC head that a transcript decoder reads.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, in_dim: int, hidden_size: int, downsample: int = 2, hidden: int | None = None,
                 pooling: str = "stack", vocab_size: int | None = None, token_embeddings: bool = False):
        super().__init__()
        if pooling not in ("stack", "ctc"):
            raise ValueError(f"semantic pooling must be 'stack' or 'ctc', got {pooling!r}.")
        if downsample < 1:
            raise ValueError(f"semantic downsample must be >= 1, got {downsample}.")
        if pooling == "ctc" and not vocab_size:
            raise ValueError("semantic pooling='ctc' needs vocab_size (the tokenizer's size) for its CTC head.")
        if token_embeddings and pooling != "ctc":
            raise ValueError("semantic token_embeddings need pooling='ctc': the slots' tokens come from the CTC head.")
        width = hidden or hidden_size
        d_in = in_dim * downsample if pooling == "stack" else in_dim
        self.net = nn.Sequential(nn.LayerNorm(d_in), nn.Linear(d_in, width), nn.GELU(), nn.Linear(width, hidden_size))
        if pooling == "ctc":
            self.ctc = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, vocab_size + 1))
        if token_embeddings:
            self._add_token_part()

    def set_token_embeddings(self, weight: torch.Tensor) -> SemanticAdapter:
        """Copy the backbone's input embeddings (`[>= vocab_size, hidden_size]`; rows past the CTC vocabulary
        are ignored) into the slots' token part, turning it on if it was off (the MLP's last layer then
        restarts at zero, so the slots start as the posterior-weighted embeddings alone)."""
        cfg = self.config
        if cfg.pooling != "ctc":
            raise ValueError("semantic token embeddings need pooling='ctc': the slots' tokens come from the CTC head.")
        weight = weight.detach()
        if weight.ndim != 2 or weight.shape[0] < cfg.vocab_size or weight.shape[1] != cfg.hidden_size:
            raise ValueError(f"token embeddings must be [>= vocab_size={cfg.vocab_size}, hidden_size={cfg.hidden_size}]"
                             f", got {list(weight.shape)}: pass the backbone's input embedding weight.")
        if not cfg.token_embeddings:
            self._add_token_part()
            self.register_to_config(token_embeddings=True)
        self.token_embedding.copy_(weight[: cfg.vocab_size])
        return self

    def _add_token_part(self) -> None:
        last = self.net[-1]
        self.register_buffer("token_embedding", last.weight.new_zeros(self.config.vocab_size, self.config.hidden_size))
        nn.init.zeros_(last.weight)  # the slots start as the embeddings alone
        nn.init.zeros_(last.bias)

    @property
    def blank(self) -> int:
        return self.config.vocab_size

    def ctc_logits(self, states: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """[B, T, vocab_size + 1] frame labels of the CTC head (blank = vocab_size)."""
        h = states[-1] if isinstance(states, (list, tuple)) else states
        return self.ctc(h)

    def ctc_best_path(self, states: list[torch.Tensor] | torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
        """Token ids the CTC head reads in each clip (`ctc_best_path` of its logits): a transcript without
        the backbone."""
        if self.config.pooling != "ctc":
            raise ValueError(f"the CTC best path needs semantic pooling='ctc' (a CTC head); this adapter's pooling is "
                             f"{self.config.pooling!r}.")
        return ctc_best_path(self.ctc_logits(states), mask, self.blank)

    def forward(self, states: list[torch.Tensor] | torch.Tensor, mask: torch.Tensor,
                labels: torch.Tensor | None = None) -> PrefixEmbeds:
        """The slots of encoder ``states``. ``labels`` [B, T] (pooling="ctc"): frame labels to pool by instead of
        the head's argmax, e.g. a decoded transcript force-aligned to the frames (`modalities.ctc_alignment`);
        the token part then embeds each slot's aligned token."""
        h = states[-1] if isinstance(states, (list, tuple)) else states
        h = h * mask[..., None].to(h.dtype)
        if self.config.pooling == "ctc":
            return self._ctc_pool(h, mask, labels)
        if labels is not None:
            raise ValueError("frame `labels` choose CTC slots; this adapter's pooling is 'stack'.")
        k = self.config.downsample
        b, t, c = h.shape
        pad = (-t) % k
        if pad:
            h = F.pad(h, (0, 0, 0, pad))
        h = h.reshape(b, (t + pad) // k, k * c)
        lengths = (mask.sum(1) + k - 1) // k
        out_mask = torch.arange(h.shape[1], device=h.device)[None] < lengths[:, None]
        return PrefixEmbeds(self.net(h), out_mask)

    def _ctc_pool(self, h: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor | None = None) -> PrefixEmbeds:
        if labels is None:
            with torch.no_grad():
                logits = self.ctc_logits(h)
                label = logits.argmax(-1)  # [B, T]
        else:  # the caller's labels: the head's logits are not needed
            label = labels.to(h.device)
        if label.shape != mask.shape:
            raise ValueError(f"frame labels must be [B, T] = {list(mask.shape)}, got {list(label.shape)}.")
        b, t, c = h.shape
        prev = F.pad(label, (1, 0), value=-1)[:, :-1]
        start = (label != prev) & mask  # a new run of one label
        seg = torch.cumsum(start.long(), 1) - 1  # run index of every frame
        keep = mask & (label != self.blank)
        # a clip whose frames are all blank keeps one slot: the mean of its frames
        empty = ~keep.any(1)
        if bool(empty.any()):
            keep = keep | (empty[:, None] & mask)
            seg = torch.where(empty[:, None], torch.zeros_like(seg), seg)
        # renumber the kept runs 0..n-1 per row
        first = F.pad(seg, (1, 0), value=-1)[:, :-1] != seg
        kept_start = keep & (first | ~F.pad(keep, (1, 0), value=False)[:, :-1])
        slot = torch.cumsum(kept_start.long(), 1) - 1
        n = kept_start.sum(1)
        width = max(1, int(n.max()))
        index = torch.where(keep, slot, torch.full_like(slot, width))  # dropped frames -> a spare column
        sums = h.new_zeros(b, width + 1, c).scatter_add_(1, index[..., None].expand(-1, -1, c), h)
        counts = h.new_zeros(b, width + 1).scatter_add_(1, index, keep.to(h.dtype))
        pooled = sums[:, :width] / counts[:, :width].clamp(min=1)[..., None]
        out_mask = torch.arange(width, device=h.device)[None] < n[:, None]
        slots = self.net(pooled)
        if self.config.token_embeddings:
            post = logits.float().softmax(-1) if labels is None else F.one_hot(label, self.blank + 1).float()
            slots = slots + self._slot_tokens(post, index, keep, width) @ self.token_embedding.to(slots.dtype)
        return PrefixEmbeds(slots * out_mask[..., None].to(h.dtype), out_mask)

    @torch.no_grad()
    def _slot_tokens(self, post: torch.Tensor, index: torch.Tensor, keep: torch.Tensor, width: int) -> torch.Tensor:
        """[B, width, vocab_size] token posteriors of each slot: the mean of its frames' ``post`` [B, T, V + 1],
        blank left out."""
        post = post[..., : self.config.vocab_size] * keep[..., None]
        sums = post.new_zeros(post.shape[0], width + 1, post.shape[-1])
        sums.scatter_add_(1, index[..., None].expand(-1, -1, post.shape[-1]), post)
        sums = sums[:, :width]
        return sums / sums.sum(-1, keepdim=True).clamp(min=1e-12)


class AcousticAdapter(SafeModelMixin, ConfigMixin):
    """Learned-query resampler over several encoder layers: a softmax-weighted sum (learned layer weights) of
    the layer-normed hidden states `layers`, read by `num_queries` queries through cross-attention that
    ignores padded frames. Always `num_queries` prefix slots."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, in_dim: int, hidden_size: int, layers: list[int], num_queries: int = 16, depth: int = 1,
                 heads: int = 4, width: int | None = None):
        super().__init__()
        width = width or hidden_size
        if not layers:
            raise ValueError("the acoustic adapter needs at least one encoder layer in `layers`.")
        if width % heads:
            raise ValueError(f"acoustic width {width} must be divisible by heads={heads}.")
        if num_queries < 1:
            raise ValueError(f"num_queries must be >= 1, got {num_queries}.")
        self.layer_weights = nn.Parameter(torch.zeros(len(layers)))
        self.layer_norm = nn.LayerNorm(in_dim, elementwise_affine=False)
        self.in_proj = nn.Linear(in_dim, width)
        self.queries = nn.Parameter(torch.randn(num_queries, width) * 0.02)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(dict(
                q_norm=nn.LayerNorm(width), kv_norm=nn.LayerNorm(width),
                attn=nn.MultiheadAttention(width, heads, batch_first=True), mlp_norm=nn.LayerNorm(width),
                mlp=nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)),
            ))
            for _ in range(depth)
        )
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, hidden_size))

    @property
    def weights(self) -> torch.Tensor:
        """The learned mixing weights of the layers (softmax, sums to 1)."""
        return torch.softmax(self.layer_weights, 0)

    def forward(self, states: list[torch.Tensor], mask: torch.Tensor) -> PrefixEmbeds:
        idx = list(self.config.layers)
        if max(idx) >= len(states) or min(idx) < -len(states):
            raise ValueError(f"acoustic layers {idx} out of range for {len(states)} encoder hidden states.")
        w = self.weights.to(states[0].dtype)
        mixed = sum(w[i] * self.layer_norm(states[j]) for i, j in enumerate(idx))
        kv = self.in_proj(mixed)
        kv = kv + sincos_1d(kv.shape[1], kv.shape[2], kv.device, kv.dtype)[None]
        q = self.queries[None].expand(kv.shape[0], -1, -1).to(kv.dtype)
        ignore = ~mask
        for blk in self.blocks:
            kvn = blk["kv_norm"](kv)
            q = q + blk["attn"](blk["q_norm"](q), kvn, kvn, key_padding_mask=ignore, need_weights=False)[0]
            q = q + blk["mlp"](blk["mlp_norm"](q))
        embeds = self.out(q)
        return PrefixEmbeds(embeds, torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device))


PARTS = ("semantic", "acoustic")


@register_adapter("audio")
class AudioAdapter(ModalityAdapter):
    """Speech -> PrefixEmbeds [B, P, hidden_size] (DIFFA's dual adapters on a speech encoder).

    hidden_size: the backbone width D.
    encoder: "transformer" (in-project `SpeechEncoder`: `encoder_dim`, `encoder_layers`, `encoder_heads`) or
        "hf" (a transformers encoder; `encoder_path` names a local folder the first time, after which its
        config lives in `encoder_config` and its weights in this adapter's own files).
    feature: "log_mel" | "fbank" (in-project encoder); HF encoders pick theirs ("whisper" or "waveform").
    max_seconds: the longest clip accepted; min_peak: silence threshold.
    semantic_downsample: frames per semantic slot (semantic_pooling="stack"); semantic_pooling="ctc": one slot per
        run of frames with the same non-blank label of a CTC head over `ctc_vocab_size` tokens (CTC compression).
    semantic_token_embeddings (CTC pooling): each semantic slot adds the backbone's input embeddings of the tokens
        the CTC head hears there, weighted by its posteriors (`set_token_embeddings` copies them from the backbone;
        see `SemanticAdapter`).
    acoustic_queries: acoustic slots; acoustic_layers: which
        encoder hidden states the acoustic adapter mixes (default: all).
    prefix_parts: the adapters whose outputs form the prefix, in order (e.g. ["semantic"] for an ASR stage).
    freeze_encoder: keep the encoder fixed (`unfreeze_trunk()` to train it).
    """

    trunk_attr = "speech_encoder"
    ignore_for_config = ["encoder_path"]
    config_rules = {
        **{k: POSITIVE for k in ("hidden_size", "encoder_dim", "encoder_layers", "encoder_heads", "n_mels",
                                 "sample_rate", "semantic_downsample", "semantic_hidden", "ctc_vocab_size",
                                 "acoustic_queries", "acoustic_depth", "acoustic_heads")},
        "max_seconds": FINITE_POSITIVE, "min_peak": FINITE_NON_NEGATIVE,
        "encoder_dropout": ("in [0, 1)", lambda v: 0 <= v < 1),
    }

    @register_to_config
    def __init__(
        self,
        hidden_size: int = 512,
        encoder: str = "transformer",
        encoder_config: dict | None = None,
        encoder_dim: int = 256,
        encoder_layers: int = 4,
        encoder_heads: int = 4,
        encoder_dropout: float = 0.0,
        feature: str = "log_mel",
        n_mels: int = 80,
        sample_rate: int = SAMPLE_RATE,
        max_seconds: float = 30.0,
        min_peak: float = 1e-4,
        semantic_downsample: int = 2,
        semantic_hidden: int | None = None,
        semantic_pooling: str = "stack",
        ctc_vocab_size: int | None = None,
        semantic_token_embeddings: bool = False,
        acoustic_queries: int = 16,
        acoustic_layers: list[int] | None = None,
        acoustic_depth: int = 1,
        acoustic_heads: int = 4,
        prefix_parts: list[str] | tuple[str, ...] = PARTS,
        freeze_encoder: bool = False,
        encoder_path: str | None = None,
    ):
        super().__init__()
        parts = list(prefix_parts)
        if not parts or any(p not in PARTS for p in parts) or len(set(parts)) != len(parts):
            raise ValueError(f"prefix_parts must list some of {PARTS} once each, got {parts}.")
        if encoder == "transformer":
            if feature not in ("log_mel", "fbank"):
                raise ValueError(f"the in-project encoder takes feature 'log_mel' or 'fbank', got {feature!r}.")
            self.speech_encoder = SpeechEncoder(n_mels, encoder_dim, encoder_layers, encoder_heads, dropout=encoder_dropout)
            pre = AudioPreprocessor(sample_rate=sample_rate, feature=feature, n_mels=n_mels, max_seconds=max_seconds,
                                    min_peak=min_peak)
        elif encoder == "hf":
            state = None
            if encoder_path is not None:
                encoder_config, state = HFSpeechEncoder.read_folder(encoder_path)
                self.register_to_config(encoder_config=encoder_config)
            if not encoder_config:
                raise ValueError("encoder='hf' needs encoder_path (a local transformers folder) or encoder_config.")
            self.speech_encoder = HFSpeechEncoder(encoder_config)
            if state is not None:
                self.speech_encoder.model.load_state_dict(state, strict=True)
            if self.speech_encoder.is_whisper:
                c = self.speech_encoder.hf_config
                pre = AudioPreprocessor(sample_rate=sample_rate, feature="whisper", n_mels=c.num_mel_bins,
                                        fixed_frames=2 * c.max_source_positions, max_seconds=max_seconds,
                                        min_peak=min_peak)
            else:
                pre = AudioPreprocessor(sample_rate=sample_rate, feature="waveform", max_seconds=max_seconds,
                                        min_peak=min_peak)
        else:
            raise ValueError(f"encoder={encoder!r} is unknown; choose 'transformer' or 'hf'.")
        self._preprocessor = pre
        dim, n_states = self.speech_encoder.hidden_dim, self.speech_encoder.num_hidden_states
        layers = list(range(n_states)) if acoustic_layers is None else [int(i) for i in acoustic_layers]
        if any(not -n_states <= i < n_states for i in layers):
            raise ValueError(f"acoustic_layers {layers} out of range: the encoder has {n_states} hidden states.")
        self.semantic = SemanticAdapter(dim, hidden_size, semantic_downsample, semantic_hidden, semantic_pooling,
                                        ctc_vocab_size, semantic_token_embeddings)
        self.acoustic = AcousticAdapter(dim, hidden_size, layers, acoustic_queries, acoustic_depth, acoustic_heads)
        if freeze_encoder:
            self.freeze_trunk()

    # ---- data side --------------------------------------------------------------------------------
    @property
    def preprocessor(self) -> AudioPreprocessor:
        return self._preprocessor

    @torch.no_grad()
    def preprocess(self, audio, sampling_rate: int | None = None) -> AudioBatch:
        """Files / arrays / tensors / (array, sr) pairs, one or a list -> `AudioBatch`."""
        return self._preprocessor(audio, sampling_rate)

    # ---- model side -------------------------------------------------------------------------------
    def encode(self, batch: AudioBatch) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Every encoder hidden state [B, T', C] and the valid-frame mask [B, T']."""
        if not isinstance(batch, AudioBatch):
            raise ValueError(f"AudioAdapter takes an AudioBatch (use adapter.preprocess(audio)), got {type(batch).__name__}.")
        p = next(self.speech_encoder.parameters())
        batch = batch.to(device=p.device, dtype=p.dtype)
        if self.trunk_frozen:
            with torch.no_grad():
                return self.speech_encoder(batch)
        return self.speech_encoder(batch)

    def forward(self, batch: AudioBatch, parts: list[str] | tuple[str, ...] | None = None,
                ctc_decoder=None) -> PrefixEmbeds:
        """[semantic | acoustic] prefix (or the `parts` asked for), valid slots at the end of each row.

        With a `ctc_decoder` (e.g. a `modalities.ctc_decoding.CTCBeamSearch` with an LM; needs
        semantic_pooling="ctc") the semantic slots follow the transcript it decodes: its tokens are force-aligned
        to the CTC head's frames (`modalities.ctc_alignment.ctc_align`) and each aligned token's frames make one
        slot, instead of each run of the head's greedy labels. A clip whose transcript does not fit its frames
        keeps its greedy slots."""
        warps = None if ctc_decoder is None else _warps(ctc_decoder, batch)
        states, mask = self.encode(batch)
        labels = None
        if ctc_decoder is not None:
            with torch.no_grad():
                logits = self._ctc_logits(states)
                ids = self._decode_logits(batch, ctc_decoder, warps, logits, mask)
                labels = align_batch(logits, mask, ids, self.semantic.blank, fallback=logits.argmax(-1))
        return self.prefix(states, mask, parts, labels)

    def prefix(self, states: list[torch.Tensor], mask: torch.Tensor, parts=None,
               labels: torch.Tensor | None = None) -> PrefixEmbeds:
        """The adapters on encoder outputs from `encode` (training reuses them, e.g. for an encoder-side loss);
        `labels`: the semantic slots' frame labels (see `forward`), None for the CTC head's greedy ones."""
        parts = list(self.config.prefix_parts if parts is None else parts)
        dtype = next(self.semantic.parameters()).dtype
        states = [s.to(dtype) for s in states]
        out = [self.semantic(states, mask, labels) if name == "semantic" else getattr(self, name)(states, mask)
               for name in parts]
        return left_align(PrefixEmbeds.cat(out, dim=1))

    @torch.no_grad()
    def ctc_best_path(self, batch: AudioBatch) -> list[list[int]]:
        """The token ids the semantic adapter's CTC head reads in each clip (greedy best path; needs
        semantic_pooling="ctc")."""
        states, mask = self.encode(batch)
        return self.semantic.ctc_best_path(states[-1].to(next(self.semantic.parameters()).dtype), mask)

    @torch.no_grad()
    def ctc_decode(self, batch: AudioBatch, decoder=None) -> list[list[int]]:
        """The token ids of each clip under a CTC decoding rule: greedy (`ctc_best_path`) when `decoder` is None,
        else e.g. a `modalities.ctc_decoding.CTCBeamSearch` (beam search with an n-gram LM). A decoder with
        `warps` (frequency-warp factors) also decodes each clip's features stretched by every factor and keeps,
        per clip, the hypothesis with the highest score (`decode_scored`), unwarped included."""
        if decoder is None:
            return self.ctc_best_path(batch)
        warps = _warps(decoder, batch)
        states, mask = self.encode(batch)
        return self._decode_logits(batch, decoder, warps, self._ctc_logits(states), mask)

    def _ctc_logits(self, states: list[torch.Tensor]) -> torch.Tensor:
        if self.config.semantic_pooling != "ctc":
            raise ValueError("CTC decoding needs semantic_pooling='ctc' (a CTC head); this adapter's pooling is "
                             f"{self.config.semantic_pooling!r}.")
        return self.semantic.ctc_logits(states[-1].to(next(self.semantic.parameters()).dtype))

    @torch.no_grad()
    def _decode_logits(self, batch: AudioBatch, decoder, warps: tuple, logits: torch.Tensor,
                       mask: torch.Tensor) -> list[list[int]]:
        """`ctc_decode` given the CTC logits of `batch` itself and the decoder's checked `warps` (the warped copies
        are encoded here)."""
        if not warps:
            return decoder.decode(logits, mask, self.semantic.blank)
        # maximum-likelihood warp selection (as in VTLN): each clip keeps the hypothesis of its best-scoring warp
        best = decoder.decode_scored(logits, mask, self.semantic.blank)
        for factor in warps:
            warped = AudioBatch(warp_frequencies(batch.values, torch.full((len(batch),), float(factor))), batch.lengths)
            warped_states, warped_mask = self.encode(warped)
            for i, cand in enumerate(decoder.decode_scored(self._ctc_logits(warped_states), warped_mask,
                                                           self.semantic.blank)):
                if cand[1] > best[i][1]:
                    best[i] = cand
        return [ids for ids, _ in best]

    def num_prefix_slots(self, lengths: torch.Tensor) -> torch.Tensor:
        """Valid prefix slots of clips with `lengths` valid feature frames (an upper bound with CTC pooling)."""
        lengths = torch.as_tensor(lengths)
        n = torch.zeros_like(lengths)
        frames = self.speech_encoder.output_lengths(lengths)
        for name in self.config.prefix_parts:
            if name == "semantic" and self.config.semantic_pooling == "ctc":
                n = n + frames  # at most one slot per frame (the actual count depends on the audio)
            elif name == "semantic":
                k = self.config.semantic_downsample
                n = n + (frames + k - 1) // k
            else:
                n = n + self.config.acoustic_queries
        return n

    @property
    def num_prefix_tokens(self) -> int:
        """Prefix slots of a clip of `max_seconds` (the longest prefix)."""
        pre = self._preprocessor
        return int(self.num_prefix_slots(torch.tensor([pre.num_frames(pre.max_samples)]))[0])

    # ---- stages -----------------------------------------------------------------------------------
    def set_token_embeddings(self, weight: torch.Tensor) -> AudioAdapter:
        """Give the semantic slots the backbone's input embeddings (`weight`, e.g. `model.embed.weight`), turning
        `semantic_token_embeddings` on if it was off (see `SemanticAdapter.set_token_embeddings`)."""
        self.semantic.set_token_embeddings(weight)
        self.register_to_config(semantic_token_embeddings=True)
        return self

    def set_prefix_parts(self, parts) -> AudioAdapter:
        parts = list(parts)
        if not parts or any(p not in PARTS for p in parts):
            raise ValueError(f"prefix_parts must list some of {PARTS}, got {parts}.")
        self.register_to_config(prefix_parts=parts)
        return self

    def load_parts(self, semantic: str | os.PathLike | None = None, acoustic: str | os.PathLike | None = None):
        """Load weights of a `SemanticAdapter` / `AcousticAdapter` saved on its own into this adapter."""
        for name, path in (("semantic", semantic), ("acoustic", acoustic)):
            if path is None:
                continue
            cls = SemanticAdapter if name == "semantic" else AcousticAdapter
            part = cls.from_pretrained(os.fspath(path))
            own = getattr(self, name)
            if dict(part.config) != dict(own.config):
                diff = {k: (part.config.get(k), own.config.get(k)) for k in set(part.config) | set(own.config)
                        if part.config.get(k) != own.config.get(k) and not k.startswith("_")}
                if diff:
                    raise ValueError(f"the {name} adapter in {os.fspath(path)!r} does not fit this one: {diff}.")
            own.load_state_dict(part.state_dict())
        return self
