"""Text latent autoencoders: a Cosmos-style compressor and a LaDiR-style thought VAE (coming with the latent issue)."""
