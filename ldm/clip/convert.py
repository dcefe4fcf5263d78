"""An open_clip text tower as a `transformers` CLIPTextModel plus CLIPTokenizer: the text encoder a
StableDiffusionPipeline folder holds.

As SD 2's conversion does (diffusers' convert_open_clip_checkpoint), the model keeps the blocks the UNet was
conditioned on and no more: states after `depth` blocks, then the final LayerNorm, are then its
last_hidden_state, which is what the pipeline feeds the UNet. The tokenizer is built from the BPE vocabulary
that open_clip ships (nothing is downloaded), padding with token 0 ("!") as open_clip and SD 2 do.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from open_clip.model import CLIP

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# open_clip pads with id 0, the BPE token "!". Naming "!" the pad token (SD 2's tokenizer does) makes it a special
# token that transformers splits out of every caption, so "great!" tokenizes differently from open_clip. A token
# of its own that no caption contains, mapped to id 0 too, pads with the same id and leaves "!" alone.
PAD = "<|pad|>"


def text_config(model: CLIP, depth: int, context_length: int) -> dict:
    """The CLIPTextConfig of an open_clip CLIP's text tower cut after `depth` blocks."""
    t = model.transformer
    block = t.resblocks[0]
    quick = type(block.mlp.gelu).__name__ == "QuickGELU"
    return {
        "architectures": ["CLIPTextModel"],
        "vocab_size": int(model.vocab_size),
        "hidden_size": int(t.width),
        "intermediate_size": int(block.mlp.c_fc.out_features),
        "projection_dim": int(model.text_projection.shape[1]),
        "num_hidden_layers": int(depth),
        "num_attention_heads": int(block.attn.num_heads),
        "max_position_embeddings": int(context_length),
        "hidden_act": "quick_gelu" if quick else "gelu",
        "layer_norm_eps": float(model.ln_final.eps),
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 0,
        "torch_dtype": "float32",
    }


def check_convertible(model: CLIP) -> str | None:
    """Why this text tower has no CLIPTextModel equivalent, or None when it has one."""
    block = model.transformer.resblocks[0]
    if not isinstance(block.attn, torch.nn.MultiheadAttention):
        return "its attention is not the standard one (open_clip's custom attention)"
    if not isinstance(getattr(block, "ls_1", torch.nn.Identity()), torch.nn.Identity):
        return "it uses LayerScale"
    if type(block.mlp.gelu).__name__ not in ("GELU", "QuickGELU"):
        return f"its activation {type(block.mlp.gelu).__name__} has no CLIPTextModel name"
    if getattr(model, "text_pool_type", "argmax") != "argmax" or model.attn_mask is None:
        return "it is not a causal, EOT-pooled text tower"
    return None


def text_state_dict(model: CLIP, depth: int, context_length: int) -> dict[str, torch.Tensor]:
    """open_clip text weights under CLIPTextModel's names (the first `depth` blocks)."""
    out = {
        "text_model.embeddings.token_embedding.weight": model.token_embedding.weight,
        "text_model.embeddings.position_embedding.weight": model.positional_embedding[:context_length],
        "text_model.final_layer_norm.weight": model.ln_final.weight,
        "text_model.final_layer_norm.bias": model.ln_final.bias,
    }
    for i, block in enumerate(model.transformer.resblocks[:depth]):
        p = f"text_model.encoder.layers.{i}."
        q, k, v = block.attn.in_proj_weight.chunk(3)
        qb, kb, vb = block.attn.in_proj_bias.chunk(3)
        out |= {
            p + "self_attn.q_proj.weight": q, p + "self_attn.q_proj.bias": qb,
            p + "self_attn.k_proj.weight": k, p + "self_attn.k_proj.bias": kb,
            p + "self_attn.v_proj.weight": v, p + "self_attn.v_proj.bias": vb,
            p + "self_attn.out_proj.weight": block.attn.out_proj.weight,
            p + "self_attn.out_proj.bias": block.attn.out_proj.bias,
            p + "layer_norm1.weight": block.ln_1.weight, p + "layer_norm1.bias": block.ln_1.bias,
            p + "layer_norm2.weight": block.ln_2.weight, p + "layer_norm2.bias": block.ln_2.bias,
            p + "mlp.fc1.weight": block.mlp.c_fc.weight, p + "mlp.fc1.bias": block.mlp.c_fc.bias,
            p + "mlp.fc2.weight": block.mlp.c_proj.weight, p + "mlp.fc2.bias": block.mlp.c_proj.bias,
        }  # fmt: skip
    return {k: v.detach().float().contiguous().clone() for k, v in out.items()}


def to_text_model(model: CLIP, depth: int, context_length: int):
    """A transformers CLIPTextModel whose last_hidden_state is ln_final(states after `depth` blocks)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(**{k: v for k, v in text_config(model, depth, context_length).items()
                               if k not in ("architectures", "torch_dtype")})  # fmt: skip
    text = CLIPTextModel(config).eval()
    state = text_state_dict(model, depth, context_length)
    if not any(k.startswith("text_model.") for k in text.state_dict()):  # transformers 5 dropped the prefix
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    missing, unexpected = text.load_state_dict(state, strict=False)
    # position_ids is a buffer transformers makes itself; every weight must have come from open_clip.
    left = [k for k in missing if not k.endswith("position_ids")]
    if left or unexpected:
        raise ValueError(f"open_clip -> CLIPTextModel: missing {left[:3]}, unexpected {unexpected[:3]}")
    return text


def write_tokenizer(folder: Path, context_length: int) -> None:
    """CLIPTokenizer files (vocab.json, merges.txt, configs) from open_clip's own BPE vocabulary."""
    from open_clip import SimpleTokenizer

    tok = SimpleTokenizer()
    vocab = {BOS if t == "<start_of_text>" else EOS if t == "<end_of_text>" else t: i for t, i in tok.encoder.items()}
    vocab[PAD] = 0
    merges = [" ".join(pair) for pair, _ in sorted(tok.bpe_ranks.items(), key=lambda kv: kv[1])]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": PAD}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": int(context_length), "do_lower_case": True,
              "clean_up_tokenization_spaces": True, **special}  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))


class TransformersText:
    """An export's text_encoder/ and tokenizer/ as the pipeline's text states: `token_states(captions)` gives
    [N, L, D] and the positions the UNet attends to (each caption's tokens, or all L when padding is unmasked)."""

    def __init__(self, root: Path, context_length: int, mask_padding: bool, batch_size: int = 256):
        from transformers import CLIPTextModel, CLIPTokenizer

        self.model = CLIPTextModel.from_pretrained(root / "text_encoder").eval().requires_grad_(False)
        self.tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer")
        self.ctx, self.mask_padding, self.batch_size = context_length, mask_padding, batch_size

    @torch.no_grad()
    def token_states(self, captions) -> tuple[torch.Tensor, torch.Tensor]:
        """Text states of the captions, padded to the context length as the pipeline pads them."""
        device = next(self.model.parameters()).device
        states, lengths = [], []
        for i in range(0, len(captions), self.batch_size):
            ids = self.tokenizer(list(captions[i : i + self.batch_size]), padding="max_length", max_length=self.ctx,
                                 truncation=True, return_tensors="pt").input_ids  # fmt: skip
            states.append(self.model(ids.to(device)).last_hidden_state.float().cpu())
            eot = (ids == self.tokenizer.eos_token_id).int().argmax(dim=1) + 1
            lengths.append(eot if self.mask_padding else torch.full_like(eot, self.ctx))
        return torch.cat(states), torch.cat(lengths).long()
