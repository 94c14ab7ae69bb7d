"""The one CLIP interface every composed-retrieval method uses, whatever library built the model.

:class:`ClipBundle` is a CLIP model *with* its tokenizer and image preprocessing. Two families implement it:
Hugging Face ``CLIPModel`` (:class:`capret.models.clip.HFClipBundle`) and open_clip
(:class:`capret.models.openclip.OpenClipBundle`, the family of the papers' backbones: RN50x4 for CLIP4Cir,
ViT-L/14 for SEARLE/Pic2Word/LinCIR, ViT-bigG/14 for CIReVL). A family supplies six small things (its towers'
raw features, tokenisation, the token-embedding table, which parameters belong to which tower); everything
else — normalised encoders, weight fingerprints for feature caches, freezing a tower, and pseudo-word
injection — is written once here.

Pseudo-word injection (textual inversion: SEARLE, Pic2Word, LinCIR) replaces the *input* embedding of a
placeholder token by a given vector before the text transformer runs. It is done with a forward hook on the
token-embedding layer, so the family's own forward (positional embeddings, causal mask, end-of-text pooling)
runs unchanged and the result is exactly what the model would give if the vector were a row of its vocabulary.
The placeholder is a string chosen by the caller (``$`` in SEARLE, ``*`` in Pic2Word); it must be a single
token of the model's tokenizer, never a hard-coded id.
"""

from __future__ import annotations

import abc
import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from capret.errors import CapretError

__all__ = ["ClipBundle", "PseudoTokenError", "weights_fingerprint"]


class PseudoTokenError(CapretError):
    """A placeholder is not one token of the tokenizer, or a prompt lost its placeholder."""


def _hash_tensors(items: Iterable[tuple[str, torch.Tensor]]) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for key, tensor in sorted(items, key=lambda kv: kv[0]):
        digest.update(key.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def weights_fingerprint(module: nn.Module) -> str:
    """A short hash of every parameter and buffer, used to key feature caches by the exact weights.

    Hashing the bytes makes a cache built from a fine-tuned stage-1 model distinct from one built from the
    pretrained weights even though both carry the same name.
    """
    return _hash_tensors(module.state_dict().items())


class ClipBundle(nn.Module, abc.ABC):
    """A CLIP model with its tokenizer and CIR image preprocessing (target padding, then the model's own).

    ``image_features``/``text_features`` return the *raw* projected embeddings, which is what the CLIP4Cir
    Combiner and its element-wise sum consume (normalisation happens after fusion); ``encode_image`` and
    ``encode_text`` return L2-normalised embeddings as the package's encoder contract requires.
    """

    model: Any  # the wrapped family model (its submodules are read as attributes)

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

    # ------------------------------------------------------------------ what a family provides
    @property
    @abc.abstractmethod
    def feature_dim(self) -> int:
        """Size of the joint embedding (the ``d`` of the Combiner)."""

    @property
    @abc.abstractmethod
    def context_length(self) -> int:
        """Maximum number of tokens of the text tower."""

    @property
    @abc.abstractmethod
    def token_embedding(self) -> nn.Embedding:
        """The input token-embedding table of the text tower (pseudo-words live in its space)."""

    @property
    @abc.abstractmethod
    def tokenizer_id(self) -> str:
        """A string that identifies the tokenizer, part of every text-feature cache key."""

    @abc.abstractmethod
    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """``{"input_ids", "attention_mask"}`` of ``texts``, cut at the context length."""

    @abc.abstractmethod
    def plain_token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` without start/end/padding tokens."""

    @abc.abstractmethod
    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Projected (unnormalised) image embeddings ``[B, d]`` of preprocessed pixels ``[B, 3, H, W]``."""

    @abc.abstractmethod
    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Projected (unnormalised) text embeddings ``[B, d]`` pooled at the end-of-text token."""

    @abc.abstractmethod
    def is_image_parameter(self, name: str) -> bool:
        """Whether the parameter/buffer ``name`` (of ``self.model``) belongs to the image tower."""

    @abc.abstractmethod
    def is_text_parameter(self, name: str) -> bool:
        """Whether the parameter/buffer ``name`` (of ``self.model``) belongs to the text tower."""

    # ------------------------------------------------------------------ shared behaviour
    @property
    def token_width(self) -> int:
        """Width of a token embedding (the output size of every pseudo-word mapper)."""
        return int(self.token_embedding.embedding_dim)

    @property
    def logit_scale(self) -> float:
        """CLIP's learned contrastive temperature as a multiplier (``exp(logit_scale)``, 100 for OpenAI CLIP)."""
        return float(self.model.logit_scale.detach().exp())

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

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

    def _named_tensors(self, keep: Callable[[str], bool]) -> list[tuple[str, torch.Tensor]]:
        return [(k, v) for k, v in self.model.state_dict().items() if keep(k)]

    def image_fingerprint(self) -> str:
        """Hash of the weights image features depend on (image tower + projection), for cache keys."""
        return _hash_tensors(self._named_tensors(self.is_image_parameter))

    def text_fingerprint(self) -> str:
        """Hash of the weights text features depend on (text tower + projection), for cache keys.

        Keying each modality by its own tower means fine-tuning only the text encoder (CLIP4Cir stage 1)
        keeps every cached image feature valid.
        """
        return _hash_tensors(self._named_tensors(self.is_text_parameter))

    def set_trainable(self, *, text: bool, image: bool) -> None:
        """Freeze or unfreeze the two towers (CLIP4Cir stage 1 fine-tunes the text tower, optionally both)."""
        for name, param in self.model.named_parameters():
            param.requires_grad_(
                (text and self.is_text_parameter(name)) or (image and self.is_image_parameter(name))
            )

    # ------------------------------------------------------------------ pseudo-word tokens
    def placeholder_id(self, placeholder: str) -> int:
        """The one token id of ``placeholder``; a string that is several tokens (or none) is an error."""
        ids = self.plain_token_ids(placeholder)
        if len(ids) != 1:
            raise PseudoTokenError(
                f"placeholder {placeholder!r} is {len(ids)} tokens {ids} for the tokenizer of {self.name}; "
                "pseudo-word injection needs a string that is exactly one token (CLIP's BPE: '$' or '*')"
            )
        return ids[0]

    @contextmanager
    def _replaced_token_embeddings(self, replace: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
        def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
            return replace(output)

        handle = self.token_embedding.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    def text_features_with_embeddings(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        positions: torch.Tensor,
        vectors: torch.Tensor,
    ) -> torch.Tensor:
        """Raw text features with the input embedding at ``positions`` replaced by ``vectors``.

        Args:
            input_ids: ``[B, L]`` token ids as returned by :meth:`tokenize`.
            attention_mask: ``[B, L]``.
            positions: boolean ``[B, L]``: which token embeddings to replace.
            vectors: ``[B, W]`` (one vector per text, written at every marked position of its row) in the
                token-embedding space (``W`` = :attr:`token_width`). Gradients flow into ``vectors``.
        """
        if positions.shape != input_ids.shape:
            raise ValueError(
                f"positions {tuple(positions.shape)} must match input_ids {tuple(input_ids.shape)}"
            )
        if vectors.shape != (input_ids.shape[0], self.token_width):
            raise ValueError(
                f"vectors {tuple(vectors.shape)} must be [batch={input_ids.shape[0]}, token_width="
                f"{self.token_width}]"
            )
        mask = positions.to(input_ids.device).unsqueeze(-1)

        def replace(embeddings: torch.Tensor) -> torch.Tensor:
            return torch.where(mask, vectors.to(embeddings.dtype).unsqueeze(1), embeddings)

        with self._replaced_token_embeddings(replace):
            return self.text_features(input_ids, attention_mask)

    def pseudo_token_features(
        self, texts: Sequence[str], vectors: torch.Tensor, *, placeholder: str = "$"
    ) -> torch.Tensor:
        """Raw text features of ``texts`` with every ``placeholder`` token of text ``i`` set to ``vectors[i]``.

        Every text must contain the placeholder as its own token (surrounded by spaces, as in ``"a photo of $
        that ..."``); a text whose placeholder was merged into a neighbouring token or cut off by the context
        length raises :class:`PseudoTokenError` naming the text.
        """
        if len(texts) != vectors.shape[0]:
            raise ValueError(f"{len(texts)} texts but {vectors.shape[0]} pseudo-token vectors")
        pid = self.placeholder_id(placeholder)
        tokens = {k: v.to(self.device) for k, v in self.tokenize(texts).items()}
        positions = tokens["input_ids"] == pid
        missing = (~positions.any(dim=1)).nonzero().flatten().tolist()
        if missing:
            text = texts[missing[0]]
            raise PseudoTokenError(
                f"{len(missing)} text(s) have no {placeholder!r} token (id {pid}) after tokenisation, e.g. "
                f"{text!r}: put spaces around the placeholder, and keep it within the first "
                f"{self.context_length} tokens"
            )
        return self.text_features_with_embeddings(
            tokens["input_ids"], tokens["attention_mask"], positions=positions, vectors=vectors
        )

    def word_embedding(self, word: str) -> torch.Tensor:
        """The input embedding ``[W]`` of a one-token ``word`` (a pseudo-token equal to a real word)."""
        wid = self.placeholder_id(word)
        return self.token_embedding.weight[wid].detach().clone()
