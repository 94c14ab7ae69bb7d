"""Tiny randomly initialised text encoders + tokenizers built on the fly, for tests (no hub access here).

``build_tiny_bert(dir)`` writes a 2-layer BERT config and a WordPiece tokenizer trained on a few fashion
sentences into ``dir`` so the production loading path (``AutoModel``/``AutoTokenizer.from_pretrained(dir)``)
runs unchanged. ``save_tiny_dual_stream(dir)`` saves a tiny random dual-stream model folder on top of it.
"""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "a red short sleeve top with a round neckline",
    "a blue long sleeve dress with a floral pattern",
    "black trousers made of denim with a slim fit",
    "a white shirt with buttons and a collar",
    "a green skirt with pleats and a high waist",
    "grey shorts with pockets and a logo",
    "a yellow vest with stripes, photographed from the front",
    "a sling dress in pink silk, occluded, zoomed in",
    "the item is brown and orange with a checked texture",
    "no caption available for this picture of clothing",
]


def build_tiny_bert(directory: str | Path, *, hidden_size: int = 32, num_layers: int = 2) -> Path:
    """Write a tiny BERT (random weights) and its WordPiece tokenizer to ``directory``; returns the folder."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(CORPUS * 4, trainers.WordPieceTrainer(vocab_size=200, special_tokens=specials))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tok.decoder = decoders.WordPiece()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=128,
    )
    fast.save_pretrained(directory)
    config = BertConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        intermediate_size=hidden_size * 2,
        max_position_embeddings=128,
        pad_token_id=tok.token_to_id("[PAD]"),
    )
    BertModel(config).save_pretrained(directory)
    return directory


COLOURS = {
    "red": (200, 30, 30),
    "green": (30, 160, 40),
    "blue": (30, 50, 200),
    "yellow": (220, 210, 40),
    "purple": (140, 40, 160),
    "orange": (240, 140, 20),
    "white": (235, 235, 235),
    "black": (20, 20, 20),
}


def save_tiny_dual_stream(
    out: str | Path, *, bert: str | Path | None = None, seed: int = 0, **overrides: object
) -> Path:
    """A tiny random dual-stream model (test ResNet at 32 px + tiny BERT, width 32, one fusion layer) saved as a
    model folder at ``out``; ``overrides`` set other :class:`DualStreamModelConfig` fields (``pad``, ``mode``).

    The seed is set before the BERT is built (``bert=None``: a new one beside ``out``), so a folder is the same
    for the same arguments.
    """
    import torch

    from capret.models.dual_stream import DualStreamModel, DualStreamModelConfig, TextConfig, VisualConfig

    out = Path(out)
    torch.manual_seed(seed)
    text_dir = bert if bert is not None else build_tiny_bert(out.parent / "bert")
    config = DualStreamModelConfig(
        visual=VisualConfig(source="test_resnet", image_size=32),
        text=TextConfig(source=str(text_dir), pretrained=True, max_length=16),
        width=32,
        depth=1,
        heads=2,
        embed_dim=24,
        itc_dim=16,
        **overrides,  # type: ignore[arg-type]
    )
    DualStreamModel(config).save_pretrained(out)
    return out


def write_synthetic_df2(
    root: str | Path,
    *,
    identities: dict[str, int] | None = None,
    user_views: int = 2,
    size: int = 64,
    seed: int = 0,
) -> dict[str, Path]:
    """A small dataset in the official DeepFashion2 layout whose identities are learnable.

    Every identity is a two-colour striped patch (colours and stripe period fixed per identity); its shop image
    shows it on a grey background, its user images shifted, rescaled and noisy on a random background. One item
    per image, style 1, a category per identity. Writes one caption store per split (``captions_<split>.jsonl``,
    captions naming the colours) and returns them.
    """
    import json

    import numpy as np
    from PIL import Image

    from capret.data.deepfashion2 import CATEGORIES

    identities = identities or {"train": 8, "validation": 4}
    root = Path(root)
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    stores: dict[str, Path] = {}
    pair_id = 0
    for split, count in identities.items():
        (root / split / "image").mkdir(parents=True, exist_ok=True)
        (root / split / "annos").mkdir(parents=True, exist_ok=True)
        image_id = 0
        lines = []
        for _ in range(count):
            pair_id += 1
            first, second = rng.choice(len(names), size=2, replace=False)
            period = int(rng.integers(2, 6))
            category = (pair_id - 1) % len(CATEGORIES) + 1
            for view in range(1 + user_views):
                image_id += 1
                source = "shop" if view == 0 else "user"
                canvas = np.full((size, size, 3), 128, dtype=np.float64)
                if source == "user":
                    canvas = rng.uniform(0, 255, size=(size, size, 3))
                side = int(size * (0.6 if source == "shop" else rng.uniform(0.4, 0.7)))
                x1 = (size - side) // 2 if source == "shop" else int(rng.integers(0, size - side + 1))
                y1 = (size - side) // 2 if source == "shop" else int(rng.integers(0, size - side + 1))
                rows = (np.arange(side)[:, None] // period) % 2 == 0
                patch = np.where(rows[..., None], COLOURS[names[first]], COLOURS[names[second]])
                patch = np.broadcast_to(patch, (side, side, 3)).astype(np.float64)
                if source == "user":
                    patch = patch + rng.normal(0, 20, size=patch.shape)
                canvas[y1 : y1 + side, x1 : x1 + side] = patch
                Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8)).save(
                    root / split / "image" / f"{image_id:06d}.jpg", quality=95
                )
                box = [x1, y1, x1 + side, y1 + side]
                anno = {
                    "source": source,
                    "pair_id": pair_id,
                    "item1": {
                        "category_id": category,
                        "category_name": CATEGORIES[category],
                        "style": 1,
                        "bounding_box": box,
                        "landmarks": [],
                        "segmentation": [[x1, y1, x1 + side, y1, x1 + side, y1 + side, x1, y1 + side]],
                        "scale": 2,
                        "occlusion": 1,
                        "zoom_in": 1,
                        "viewpoint": 2,
                    },
                }
                (root / split / "annos" / f"{image_id:06d}.json").write_text(json.dumps(anno))
                caption = f"a {CATEGORIES[category]} with {names[first]} and {names[second]} stripes"
                record = {
                    "key": f"deepfashion2/{image_id:06d}/1",
                    "caption": caption,
                    "dialogue": [],
                    "backend": "test",
                    "model": {},
                    "prompt_version": "test",
                    "created": "2024-01-01T00:00:00+00:00",
                }
                lines.append(json.dumps(record))
        stores[split] = root / f"captions_{split}.jsonl"
        stores[split].write_text("\n".join(lines) + "\n")
    return stores
