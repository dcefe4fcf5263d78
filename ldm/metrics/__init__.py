"""Evaluation metrics: Frechet distance on streamed features, CLIP score, feature extractors, the exact judge."""
