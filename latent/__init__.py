"""mmdlm core: the shared diffusion backbone, attention backends, KV caches, noise schedules, losses,
samplers and diffusers schedulers. Knows nothing of modalities or tasks."""

from .backbone import BackboneOutput, DiffusionTransformer
from .cache import KVCache

__all__ = ["BackboneOutput", "DiffusionTransformer", "KVCache"]
