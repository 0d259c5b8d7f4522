"""mmdlm core: the shared diffusion backbone, attention backends, KV caches, noise schedules, losses,
samplers and diffusers schedulers. Knows nothing of modalities or tasks."""


def _keep_xformers_off_the_cpu() -> None:
    """diffusers imports xformers whenever it is installed (models/attention_processor.py). Without CUDA its
    kernels cannot run, and the import prints a "can't load C++/CUDA extensions" warning and costs seconds
    on every command; so on such a machine diffusers is told it is absent. latent.attention imports
    xformers itself, on CUDA only, where it is used."""
    import torch

    if torch.cuda.is_available():
        return
    try:
        from diffusers.utils import import_utils
    except ImportError:  # pragma: no cover - diffusers is a dependency
        return
    import_utils._xformers_available = False


_keep_xformers_off_the_cpu()

from .backbone import BackboneOutput, DiffusionTransformer  # noqa: E402
from .cache import KVCache  # noqa: E402

__all__ = ["BackboneOutput", "DiffusionTransformer", "KVCache"]
