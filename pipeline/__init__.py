"""Text-conditioned latent diffusion on Ray: shards -> VQ-VAE + CLIP -> latents -> UNet -> samples."""
