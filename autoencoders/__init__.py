"""Text latent autoencoders: a Cosmos-style compressor (frozen MiniLM + learned queries) and a LaDiR-style
thought VAE. Both are diffusers ModelMixins saved as safetensors."""

from .compressor import CompressorOutput, TextCompressor
from .thought_vae import ThoughtVAE, ThoughtVAEOutput

__all__ = ["CompressorOutput", "TextCompressor", "ThoughtVAE", "ThoughtVAEOutput"]
