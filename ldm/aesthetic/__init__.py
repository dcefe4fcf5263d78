"""The LAION aesthetic scorer: an MLP on L2-normalised CLIP image embeddings."""
