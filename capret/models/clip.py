"""Hugging Face CLIP behind one small wrapper, plus randomly initialised CLIPs for tests and benchmarks.

:func:`load_clip` returns a :class:`ClipBundle`: the ``CLIPModel`` *with* its tokenizer and its image
preprocessing (target-pad or square-pad followed by CLIP's resize/crop/normalisation, as in CLIP4Cir,
Baldrati et al. 2022, Sec. 3.3), so no caller rebuilds normalisation. Any CLIP size works because the
architecture is read from the checkpoint's ``config.json``; a hub id or a local folder is accepted.

These machines cannot reach the model hub, so tests and benchmarks use :func:`save_random_clip`, which builds
a CLIP of a named size preset with random weights and a BPE tokenizer trained on the fly, saves it in the
``from_pretrained`` layout, and lets the exact same :func:`load_clip` path load it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CLIP_PRESETS",
    "ClipBundle",
    "ClipPreset",
    "build_random_clip",
    "load_clip",
    "save_random_clip",
    "train_tokenizer",
]

PadMode = Literal["targetpad", "squarepad", "none"]

#: CLIP's own normalisation statistics (openai/CLIP ``_transform``), used when a folder has no image processor.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
UNK_TOKEN = "<|unk|>"


@dataclass(frozen=True)
class ClipPreset:
    """Architecture of a CLIP size (the numbers of the public checkpoints' ``config.json``)."""

    text_width: int  # transformer width of the text tower
    text_layers: int  # number of text transformer blocks
    text_heads: int  # attention heads in the text tower
    context_length: int  # maximum number of tokens (77 for every OpenAI CLIP)
    vision_width: int  # transformer width of the ViT image tower
    vision_layers: int  # number of ViT blocks
    vision_heads: int  # ViT attention heads
    image_size: int  # input resolution in pixels
    patch_size: int  # ViT patch size in pixels
    embed_dim: int  # joint embedding size (the ``d`` of the Combiner)


CLIP_PRESETS: dict[str, ClipPreset] = {
    # a few thousand parameters: builds and runs a training step on CPU in milliseconds
    "tiny": ClipPreset(
        text_width=32,
        text_layers=2,
        text_heads=2,
        context_length=32,
        vision_width=32,
        vision_layers=2,
        vision_heads=2,
        image_size=32,
        patch_size=8,
        embed_dim=24,
    ),
    # openai/clip-vit-base-patch32
    "vit-b-32": ClipPreset(
        text_width=512,
        text_layers=12,
        text_heads=8,
        context_length=77,
        vision_width=768,
        vision_layers=12,
        vision_heads=12,
        image_size=224,
        patch_size=32,
        embed_dim=512,
    ),
    # openai/clip-vit-large-patch14
    "vit-l-14": ClipPreset(
        text_width=768,
        text_layers=12,
        text_heads=12,
        context_length=77,
        vision_width=1024,
        vision_layers=24,
        vision_heads=16,
        image_size=224,
        patch_size=14,
        embed_dim=768,
    ),
}


def _preset(name: str) -> ClipPreset:
    if name not in CLIP_PRESETS:
        raise KeyError(f"unknown CLIP preset {name!r}; valid presets: {', '.join(sorted(CLIP_PRESETS))}")
    return CLIP_PRESETS[name]


def build_random_clip(
    preset: str = "tiny", *, vocab_size: int = 49408, special_ids: dict[str, int] | None = None, seed: int = 0
) -> Any:
    """A randomly initialised ``CLIPModel`` of a preset size (no download).

    ``special_ids`` gives the ``bos``/``eos``/``pad`` token ids of the tokenizer the model will be used with;
    the text tower pools at the first ``eos`` token, so a wrong id would pool at the wrong position.
    """
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    p = _preset(preset)
    ids = special_ids or {"bos": 49406, "eos": 49407, "pad": 1}
    text = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=p.text_width,
        intermediate_size=4 * p.text_width,
        num_hidden_layers=p.text_layers,
        num_attention_heads=p.text_heads,
        max_position_embeddings=p.context_length,
        projection_dim=p.embed_dim,
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
    )
    vision = CLIPVisionConfig(
        hidden_size=p.vision_width,
        intermediate_size=4 * p.vision_width,
        num_hidden_layers=p.vision_layers,
        num_attention_heads=p.vision_heads,
        image_size=p.image_size,
        patch_size=p.patch_size,
        projection_dim=p.embed_dim,
    )
    config = CLIPConfig(
        text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=p.embed_dim
    )
    torch.manual_seed(seed)
    return CLIPModel(config).eval()


def train_tokenizer(texts: Iterable[str], *, vocab_size: int = 512, context_length: int = 77) -> Any:
    """A byte-level BPE tokenizer trained on ``texts``, wrapped as ``PreTrainedTokenizerFast``.

    It mimics CLIP's tokenizer where it matters to the model: lower-casing, ``<|startoftext|>`` and
    ``<|endoftext|>`` around every sequence, and a maximum length equal to the text context.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN]
    tok = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    bos, eos = tok.token_to_id(BOS_TOKEN), tok.token_to_id(EOS_TOKEN)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A {EOS_TOKEN}",
        special_tokens=[(BOS_TOKEN, bos), (EOS_TOKEN, eos)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=context_length,
    )


def save_random_clip(
    out_dir: str | Path,
    *,
    preset: str = "tiny",
    texts: Sequence[str] = (),
    vocab_size: int = 512,
    seed: int = 0,
) -> Path:
    """Write a random CLIP, a freshly trained tokenizer and a CLIP image processor to ``out_dir``.

    The folder has the layout of a hub checkpoint, so ``load_clip(out_dir)`` exercises the real loading path.
    """
    from transformers import CLIPImageProcessor

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    p = _preset(preset)
    corpus = list(texts) or ["a photo of a red dress with short sleeves", "a blue shirt", "two dogs on grass"]
    tokenizer = train_tokenizer(corpus, vocab_size=vocab_size, context_length=p.context_length)
    special = {
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "pad": tokenizer.pad_token_id,
    }
    model = build_random_clip(preset, vocab_size=len(tokenizer), special_ids=special, seed=seed)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    processor = CLIPImageProcessor(
        size={"shortest_edge": p.image_size},
        crop_size={"height": p.image_size, "width": p.image_size},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    processor.save_pretrained(out)
    return out


class ClipBundle(nn.Module):
    """A ``CLIPModel`` with its tokenizer and image preprocessing.

    ``image_features``/``text_features`` return the *raw* projected embeddings, which is what the CLIP4Cir
    Combiner and its element-wise sum consume (normalisation happens after fusion); ``encode_image`` and
    ``encode_text`` return L2-normalised embeddings as the package's encoder contract requires.
    """

    model: Any  # transformers.CLIPModel (typed loosely: its submodules are read as attributes)

    def __init__(
        self,
        model: nn.Module,
        *,
        tokenizer: Any,
        transform: Callable[[Any], torch.Tensor],
        name: str,
        preprocess_id: str,
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.transform = transform
        self.name = name
        #: a string that identifies the preprocessing, part of every feature-cache key
        self.preprocess_id = preprocess_id

    @property
    def feature_dim(self) -> int:
        return int(self.model.config.projection_dim)

    @property
    def context_length(self) -> int:
        return int(self.model.config.text_config.max_position_embeddings)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Token ids and attention mask, padded to the longest text and cut at the context length."""
        enc = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.context_length,
            return_tensors="pt",
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Projected (unnormalised) image embeddings ``[B, d]`` of preprocessed pixels ``[B, 3, H, W]``."""
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output
        return self.model.visual_projection(pooled)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Projected (unnormalised) text embeddings ``[B, d]`` pooled at the end-of-text token."""
        pooled = self.model.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        return self.model.text_projection(pooled)

    def forward(
        self,
        *,
        pixels: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Raw features of whatever is given: ``{"image": [B, d]}`` and/or ``{"text": [B, d]}``.

        Training goes through ``forward`` (one call per step) so that DistributedDataParallel can
        synchronise the gradients of both towers.
        """
        out: dict[str, torch.Tensor] = {}
        if pixels is not None:
            out["image"] = self.image_features(pixels)
        if input_ids is not None:
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            out["text"] = self.text_features(input_ids, attention_mask)
        return out

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_features(pixels), dim=-1)

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = {k: v.to(self.device) for k, v in self.tokenize(texts).items()}
        return F.normalize(self.text_features(**tokens), dim=-1)

    def image_fingerprint(self) -> str:
        """Hash of the weights image features depend on (vision tower + projection), for cache keys."""
        return weights_fingerprint(nn.ModuleList([self.model.vision_model, self.model.visual_projection]))

    def text_fingerprint(self) -> str:
        """Hash of the weights text features depend on (text tower + projection), for cache keys.

        Keying each modality by its own tower means fine-tuning only the text encoder (CLIP4Cir stage 1)
        keeps every cached image feature valid.
        """
        return weights_fingerprint(nn.ModuleList([self.model.text_model, self.model.text_projection]))

    def set_trainable(self, *, text: bool, image: bool) -> None:
        """Freeze or unfreeze the two towers (CLIP4Cir stage 1 fine-tunes the text tower, optionally both)."""
        self.model.requires_grad_(False)
        if text:
            for module in (self.model.text_model, self.model.text_projection):
                module.requires_grad_(True)
        if image:
            for module in (self.model.vision_model, self.model.visual_projection):
                module.requires_grad_(True)


def weights_fingerprint(module: nn.Module) -> str:
    """A short hash of every parameter and buffer, used to key feature caches by the exact weights.

    Hashing the bytes makes a cache built from a fine-tuned stage-1 model distinct from one built from the
    pretrained weights even though both carry the same name.
    """
    digest = hashlib.blake2b(digest_size=16)
    for key, tensor in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _processor_stats(path: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    file = path / "preprocessor_config.json"
    if not file.is_file():
        return CLIP_MEAN, CLIP_STD
    data = json.loads(file.read_text())
    return tuple(data.get("image_mean", CLIP_MEAN)), tuple(data.get("image_std", CLIP_STD))


def load_clip(
    name_or_path: str | Path,
    *,
    preprocess: PadMode = "targetpad",
    target_ratio: float = 1.25,
    device: str | torch.device = "cpu",
) -> ClipBundle:
    """Load a CLIP checkpoint (hub id or local folder) with its tokenizer and CIR preprocessing.

    Args:
        name_or_path: e.g. ``openai/clip-vit-base-patch32`` or a folder written by ``save_pretrained``.
        preprocess: ``targetpad`` (CLIP4Cir's default: pad only images whose aspect ratio exceeds
            ``target_ratio``), ``squarepad`` (always pad to a square) or ``none`` (plain CLIP resize/crop).
        target_ratio: the aspect-ratio threshold of target padding (1.25 in CLIP4Cir).
        device: where the model is placed.
    """
    from transformers import AutoTokenizer, CLIPModel

    from capret.data.transforms import clip_transform

    if preprocess not in ("targetpad", "squarepad", "none"):
        raise ValueError(f"preprocess={preprocess!r}; valid: targetpad, squarepad, none")
    model: Any = CLIPModel.from_pretrained(str(name_or_path))
    model = model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
    size = int(model.config.vision_config.image_size)
    local = Path(name_or_path)
    mean, std = _processor_stats(local) if local.is_dir() else (CLIP_MEAN, CLIP_STD)
    pad = None if preprocess == "none" else preprocess
    transform = clip_transform(size, pad=pad, target_ratio=target_ratio, mean=mean, std=std)
    preprocess_id = f"{preprocess}:{target_ratio}:{size}:{mean}:{std}"
    return ClipBundle(
        model,
        tokenizer=tokenizer,
        transform=transform,
        name=str(name_or_path),
        preprocess_id=preprocess_id,
    )
