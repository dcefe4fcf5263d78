"""CLIP: the tiny open_clip model train-clip makes, prod weights by local path, and the shared ClipEncoder."""

from ldm.clip.encoder import ClipEncoder, load_encoder
from ldm.clip.model import build_model, load_pretrained, tiny_model_config

__all__ = ["ClipEncoder", "build_model", "load_encoder", "load_pretrained", "tiny_model_config"]
