"""A tiny randomly initialised BLIP image-text retrieval checkpoint, saved in the ``from_pretrained`` layout."""

from __future__ import annotations

from pathlib import Path

from tiny_text import build_tiny_bert


def save_tiny_blip(directory: str | Path, *, image_size: int = 32, seed: int = 0) -> Path:
    """Write a 2-layer ViT + 2-layer BERT BLIP (random weights), its tokenizer and image processor."""
    import torch
    from transformers import AutoTokenizer, BlipConfig, BlipForImageTextRetrieval, BlipImageProcessor

    directory = Path(directory)
    bert = build_tiny_bert(directory / "_bert")
    tokenizer = AutoTokenizer.from_pretrained(bert)
    config = BlipConfig(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": image_size, "patch_size": 8},
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 2, "encoder_hidden_size": 32,
                     "max_position_embeddings": 64, "is_decoder": True,
                     "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.cls_token_id,
                     "sep_token_id": tokenizer.sep_token_id},
        image_text_hidden_size=16,
    )  # fmt: skip
    torch.manual_seed(seed)
    BlipForImageTextRetrieval(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    BlipImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(directory)
    return directory
