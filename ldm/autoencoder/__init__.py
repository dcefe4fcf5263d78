"""The KL autoencoder (SD's VAE): build, train, load, and the train-vae stage."""

from ldm.autoencoder.model import build_vae, load_vae
from ldm.autoencoder.train import latent_scale_factor, psnr, reconstruction_grid, train_vae

__all__ = ["build_vae", "latent_scale_factor", "load_vae", "psnr", "reconstruction_grid", "train_vae"]
