"""Test helpers for the captioning tests: tiny offline models and synthetic DeepFashion2-layout datasets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<image>{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIALS = ["<unk>", "<pad>", "<s>", "</s>", "<image>", "<|system|>", "<|user|>", "<|assistant|>"]


#: the vision tower of the tiny LLaVA and BLIP-2 (CLIP-style ViT sizes)
TINY_VISION = {
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 8,
}


def tiny_llama_config(tokenizer, *, max_position_embeddings: int = 4096):
    """A 1-layer Llama config over ``tokenizer`` (the language model of every tiny VLM/LLM here)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_tokenizer(directory: Path, *, image_token_attribute: bool = True):
    """A byte-level BPE tokenizer trained on the fly on our prompt texts, with a chat template.

    ``image_token_attribute=False`` leaves out the ``tokenizer.image_token`` attribute, like BLIP-2 hub
    tokenizers (Blip2Processor then adds its own ``<image>`` token).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from captioning.prompts import PROMPT_SETS

    corpus = [v for ps in PROMPT_SETS.values() for v in vars(ps).values() if isinstance(v, str)]
    corpus += ["What colour is the shirt? It is blue and white with short sleeves. Not sure."] * 4
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        **({"extra_special_tokens": {"image_token": "<image>"}} if image_token_attribute else {}),
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)
    return fast


def build_tiny_llama(directory: Path) -> Path:
    """A randomly initialised 1-layer Llama chat LLM saved like a hub checkpoint."""
    import torch
    from transformers import LlamaForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(directory)
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(tokenizer, max_position_embeddings=2048)).save_pretrained(directory)
    return directory


def build_tiny_llava(directory: Path) -> Path:
    """A randomly initialised LLaVA (tiny CLIP vision tower + tiny Llama) with its processor."""
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(directory)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, do_center_crop=True
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )
    processor.save_pretrained(directory)
    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**TINY_VISION, projection_dim=16),
        text_config=tiny_llama_config(tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    LlavaForConditionalGeneration(config).save_pretrained(directory)
    return directory


def write_deepfashion2(
    root: Path, split: str, *, images: int, items_per_image: int = 2, size: int = 48
) -> list[str]:
    """A small DeepFashion2-layout split (per-image JSON annos + JPEGs); returns the item keys."""
    rng = np.random.default_rng(0)
    (root / split / "image").mkdir(parents=True, exist_ok=True)
    (root / split / "annos").mkdir(parents=True, exist_ok=True)
    keys = []
    for image_id in range(1, images + 1):
        pixels = rng.integers(0, 255, size=(size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / split / "image" / f"{image_id:06d}.jpg")
        anno = {"source": "user" if image_id % 2 else "shop", "pair_id": (image_id + 1) // 2}
        for index in range(1, items_per_image + 1):
            anno[f"item{index}"] = {
                "category_id": 1 + (image_id + index) % 13,
                "category_name": "x",
                "style": 1,
                "bounding_box": [4, 4, size - 4 - index, size - 4],
                "scale": 2,
                "occlusion": 1,
                "zoom_in": 1,
                "viewpoint": 2,
                "landmarks": [],
                "segmentation": [],
            }
            keys.append(f"deepfashion2/{image_id:06d}/{index}")
        (root / split / "annos" / f"{image_id:06d}.json").write_text(json.dumps(anno))
    return keys


def build_tiny_blip2(directory: Path) -> Path:
    """A randomly initialised BLIP-2 (tiny vision tower, Q-Former and Llama) with a processor and no chat
    template, so the plain "Question: ... Answer:" prompt path is used."""
    import torch
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        BlipImageProcessor,
    )

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(directory, image_token_attribute=False)
    tokenizer.chat_template = None
    processor = Blip2Processor(
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
        num_query_tokens=4,
    )
    processor.save_pretrained(directory)
    torch.manual_seed(0)
    config = Blip2Config(
        vision_config=Blip2VisionConfig(**TINY_VISION),
        qformer_config=Blip2QFormerConfig(
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            encoder_hidden_size=16,
        ),
        text_config=tiny_llama_config(tokenizer),
        num_query_tokens=4,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    Blip2ForConditionalGeneration(config).save_pretrained(directory)
    return directory


def tiny_t5_config(tokenizer):
    """A 1-layer T5 (Flan-T5's family: the encoder-decoder language model of BLIP-2 / InstructBLIP Flan-T5)."""
    from transformers import T5Config

    return T5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=16,
        d_ff=64,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=2,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def _never_stop_early(model, tokenizer) -> None:
    """Zero the output rows of padding and end-of-text: a random model then always writes real tokens (every
    other logit is the maximum of ~400 random values), so a test sees exactly ``max_new_tokens`` of them."""
    import torch

    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head[tokenizer.pad_token_id] = 0
        head[tokenizer.eos_token_id] = 0


def _tiny_qformer(**extra):
    from transformers import Blip2QFormerConfig, InstructBlipQFormerConfig

    cls = InstructBlipQFormerConfig if extra else Blip2QFormerConfig
    return cls(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        encoder_hidden_size=16,
        **extra,
    )


def build_tiny_blip2_t5(directory: Path, *, seed: int = 0) -> Path:
    """A randomly initialised BLIP-2 whose language model is a T5 (like ``Salesforce/blip2-flan-t5-xl``): its
    ``generate`` returns decoder tokens only, not the prompt."""
    import torch
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        Blip2VisionConfig,
        BlipImageProcessor,
    )

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(directory, image_token_attribute=False)
    tokenizer.chat_template = None
    processor = Blip2Processor(
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
        num_query_tokens=4,
    )
    processor.save_pretrained(directory)
    torch.manual_seed(seed)
    config = Blip2Config(
        vision_config=Blip2VisionConfig(**TINY_VISION),
        qformer_config=_tiny_qformer(),
        text_config=tiny_t5_config(tokenizer),
        num_query_tokens=4,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    model = Blip2ForConditionalGeneration(config)
    _never_stop_early(model, tokenizer)
    model.save_pretrained(directory)
    return directory


def build_tiny_instructblip_t5(directory: Path, *, seed: int = 0) -> Path:
    """A randomly initialised InstructBLIP with a T5 language model (``Salesforce/instructblip-flan-t5-xl``'s
    shape); the Q-Former reads the instruction with the same tiny tokenizer."""
    import torch
    from transformers import (
        BlipImageProcessor,
        InstructBlipConfig,
        InstructBlipForConditionalGeneration,
        InstructBlipProcessor,
        InstructBlipVisionConfig,
    )

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(directory, image_token_attribute=False)
    tokenizer.chat_template = None
    processor = InstructBlipProcessor(
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
        qformer_tokenizer=tokenizer,
        num_query_tokens=4,
    )
    processor.save_pretrained(directory)
    torch.manual_seed(seed)
    config = InstructBlipConfig(
        vision_config=InstructBlipVisionConfig(**TINY_VISION),
        qformer_config=_tiny_qformer(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id),
        text_config=tiny_t5_config(tokenizer),
        num_query_tokens=4,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    model = InstructBlipForConditionalGeneration(config)
    _never_stop_early(model, tokenizer)
    model.save_pretrained(directory)
    return directory
