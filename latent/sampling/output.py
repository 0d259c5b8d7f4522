"""What a sampling run returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.utils import BaseOutput

from .trajectory import Trajectory


@dataclass
class SamplerOutput(BaseOutput):
    """
    sequences: [B, prompt_len + gen_length] the full canvas, prompt included (like LLaDA).
    nfe: model forward calls (a CFG step is one call on a doubled batch; cache prefills count).
    forward_tokens: token positions fed to the model over the run, summed over calls (cache savings).
    steps: [B] forwards each row took part in.
    num_generated: [B] generated tokens up to and including the first EOS (gen_length if none).
    finished: [B] rows that left early by a stopping rule (e.g. eos_early_stop).
    trajectory: with record_trajectory=True, what each forward did to each generated position.
    """

    sequences: torch.LongTensor
    nfe: int = 0
    forward_tokens: int = 0
    steps: torch.LongTensor | None = None
    num_generated: torch.LongTensor | None = None
    finished: torch.BoolTensor | None = None
    trajectory: Trajectory | None = None
