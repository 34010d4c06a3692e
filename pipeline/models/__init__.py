"""Networks: the VQ-VAE first stage, the CLIP text encoder and the conditioned latent UNet."""
