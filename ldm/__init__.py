"""ldm-pipeline: latent diffusion models, their training and evaluation."""

from ldm import offline

offline.apply()
