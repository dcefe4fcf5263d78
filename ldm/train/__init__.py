"""Training of the UNet with Ray Train: the one package that imports ray.train."""
