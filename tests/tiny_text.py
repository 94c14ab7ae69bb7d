"""Tiny randomly initialised text encoders + tokenizers built on the fly, for tests (no hub access here).

``build_tiny_bert(dir)`` writes a 2-layer BERT config and a WordPiece tokenizer trained on a few fashion
sentences into ``dir`` so the production loading path (``AutoModel``/``AutoTokenizer.from_pretrained(dir)``)
runs unchanged.
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
