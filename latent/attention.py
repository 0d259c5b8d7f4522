"""One attention function, three backends.

`attention(q, k, v, mask)` takes q [B, H, Q, d], k/v [B, Hkv, K, d] (grouped-query: H % Hkv == 0) and
an optional boolean mask [B, 1|H, Q, K] (True = may attend). It returns [B, H, Q, d].

- ``xformers``: `memory_efficient_attention`, used on CUDA in fp16/bf16 when xformers imports (it is
  imported then, on first use, never on a CPU run).
- ``sdpa``: `torch.nn.functional.scaled_dot_product_attention`, used everywhere else.
- ``eager``: the plain softmax(QK^T / sqrt(d)) V that the others are tested against.
"""

from __future__ import annotations

import functools
import math
import warnings

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "eager", "sdpa", "xformers")


@functools.cache
def _xformers_ops():
    # Imported on first use on a CUDA machine only: the import is slow, and a build that does not match
    # the installed torch prints a warning, which a CPU run has no reason to show.
    if not torch.cuda.is_available():
        return None
    try:
        import xformers.ops as xops  # noqa: PLC0415 - optional
    except Exception:  # broken or missing install: the dispatcher falls back to SDPA
        return None
    try:  # an import is not enough: a C++ extension built for another torch leaves no kernel for a mask bias
        q = torch.zeros(1, 1, 1, 8, device="cuda", dtype=torch.bfloat16)
        xops.memory_efficient_attention(q, q, q, attn_bias=torch.zeros(1, 1, 1, 8, device="cuda", dtype=q.dtype)[..., :1])
    except Exception as err:  # noqa: BLE001 - any failure means: use SDPA
        warnings.warn(f"xformers imports but cannot run a masked attention here ({type(err).__name__}: "
                      f"{str(err).splitlines()[0] if str(err) else ''}); attention runs on SDPA. Install the xformers "
                      "build that matches this torch to use it.", stacklevel=2)
        return None
    return xops


def xformers_available() -> bool:
    """Whether xformers' kernels can run here (CUDA and an importable xformers); imports it on first call."""
    return _xformers_ops() is not None


def resolve_backend(backend: str, q: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"attention_backend={backend!r} is unknown; choose one of {BACKENDS}.")
    if backend == "auto":
        on_gpu_half = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
        return "xformers" if on_gpu_half and xformers_available() else "sdpa"
    if backend == "xformers" and not (q.is_cuda and xformers_available()):
        # Explicitly asked for but unusable here (CPU or not installed): SDPA computes the same thing.
        return "sdpa"
    return backend


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def eager_attention(q, k, v, mask=None):
    groups = q.shape[1] // k.shape[1]
    k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v.float()).to(q.dtype)


def sdpa_attention(q, k, v, mask=None):
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def xformers_attention(q, k, v, mask=None):
    xops = _xformers_ops()
    groups = q.shape[1] // k.shape[1]
    k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
    bias = None
    if mask is not None:
        b, h, nq, nk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
        # xformers wants a bias whose last dim is 8-aligned in memory: allocate padded, then slice.
        padded = (nk + 7) // 8 * 8
        bias = torch.zeros(b, h, nq, padded, dtype=q.dtype, device=q.device)[..., :nk]
        bias.masked_fill_(~mask.expand(b, h, nq, nk), float("-inf"))
    out = xops.memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias
    )
    return out.transpose(1, 2)


_IMPLEMENTATIONS = {"eager": eager_attention, "sdpa": sdpa_attention, "xformers": xformers_attention}


def attention(q, k, v, mask: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    return _IMPLEMENTATIONS[resolve_backend(backend, q)](q, k, v, mask)
