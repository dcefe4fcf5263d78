"""The I/O every stage shares: fsspec storage, stage manifests, webdataset shards, the latent-row format."""
