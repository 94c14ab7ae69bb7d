"""Optimisation-based textual inversion (OTI, SEARLE: Baldrati et al., ICCV 2023, Sec. 4.1).

For every image a pseudo-word token ``v`` (one vector in CLIP's input token-embedding space) is optimised so
that the text feature of a prompt containing ``$`` = ``v`` matches the image feature (cosine loss), while a
regulariser keeps ``v`` near real words: an LLM-written phrase about one of the image's CLIP-nearest concepts,
with the concept replaced by ``$``, must keep the feature of the original phrase. Paper settings (the
defaults): ``v ~ N(0, 0.02)``, AdamW lr 2e-2, weight decay 0.01, 350 steps, loss ``(1*L_cos + 0.5*L_gpt)/1.5``,
and an exponential moving average of ``v`` (decay 0.99), which is what is kept.

**Batched and image-independent.** A batch of images is optimised at once, but the loss is the *sum* of the
per-image losses and AdamW is element-wise, so each image follows exactly the trajectory it would follow alone;
the initial token and the prompt/phrase draws come from a generator seeded by ``(seed, image key)``. Batching
therefore changes speed, not results (``scripts/bench/oti.py`` measures the speed, the tests the equality).

**Resumable store.** Tokens go to a safetensors file (:class:`TokenStore`): tensors ``tokens`` and
``ema_tokens`` ``[N, W]`` and the image keys in the metadata, rewritten atomically after every
``save_every`` batches. A rerun skips every key already stored, so a killed run loses at most the batches
since the last save and never changes finished tokens.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Required, TypedDict, Unpack

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from capret.config import ConfigError, cfg, to_dict
from capret.errors import CheckpointError, DataError, MissingKeyError
from capret.inference.cir.concepts import SEARLE_TEMPLATES, PhraseBank, concept_features, top_concepts
from capret.io import atomic_write
from capret.models.clip_base import ClipBundle

__all__ = [
    "CAPRET_OTI_TEMPLATES",
    "OTI_TEMPLATE_SETS",
    "OTIConfig",
    "OTIReport",
    "OtiOptions",
    "TokenStore",
    "oti_tokens",
    "run_oti",
]

#: our own eight prompts of the image-matching loss (the earlier default): ``templates="capret"``
CAPRET_OTI_TEMPLATES: tuple[str, ...] = (
    "a photo of {}",
    "this is a photo of {}",
    "a picture of {}",
    "an image of {}",
    "a close-up photo of {}",
    "we see {} in this photo",
    "{}",
    "a rendering of {}",
)
#: the prompt sets OTI draws from, by name (``OTIConfig.templates``); SEARLE's 24 are the default
OTI_TEMPLATE_SETS: dict[str, tuple[str, ...]] = {"searle": SEARLE_TEMPLATES, "capret": CAPRET_OTI_TEMPLATES}


@dataclass
class OTIConfig:
    """Settings of OTI (defaults: the SEARLE paper)."""

    steps: int = cfg(350, "optimisation steps per image")
    lr: float = cfg(2e-2, "AdamW learning rate")
    weight_decay: float = cfg(0.01, "AdamW weight decay")
    ema_decay: float = cfg(0.99, "decay of the exponential moving average of the token (the stored result)")
    lambda_cos: float = cfg(1.0, "weight of the image-text cosine loss")
    lambda_gpt: float = cfg(0.5, "weight of the phrase regulariser (0 = off)")
    init_std: float = cfg(0.02, "standard deviation of the token's normal initialisation")
    top_k: int = cfg(15, "concepts per image the regulariser draws phrases from")
    batch_size: int = cfg(32, "images optimised together (results do not depend on it)")
    placeholder: str = cfg("$", "placeholder word replaced by the token (must be one token)")
    templates: str = cfg("searle", "prompts of the image loss: searle (the paper's 24) | capret (our 8)")
    save_every: int = cfg(1, "batches between rewrites of the token store")
    amp: bool = cfg(True, "bfloat16 autocast on CUDA (ignored on CPU)")
    seed: int = cfg(0, "seed of the initial tokens and the prompt/phrase draws (per image key)")


class TokenStore:
    """OTI tokens keyed by image, in one safetensors file (see the module docstring)."""

    def __init__(self, path: str | Path, *, token_width: int, meta: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.token_width = token_width
        self.meta = dict(meta or {})
        self.keys: list[str] = []
        self._tokens: list[torch.Tensor] = []
        self._ema: list[torch.Tensor] = []
        if self.path.is_file():
            keys, tokens, ema, stored_meta = self.read(self.path)
            if tokens.shape[1] != token_width:
                raise CheckpointError(
                    f"token store holds width-{tokens.shape[1]} tokens; this CLIP's tokens are {token_width} wide "
                    "(another backbone wrote it: use a new --out)",
                    path=self.path,
                )
            for name in ("clip",):
                if self.meta.get(name) and stored_meta.get(name) and self.meta[name] != stored_meta[name]:
                    raise CheckpointError(
                        f"token store was written with {name}={stored_meta[name]!r}, not {self.meta[name]!r}",
                        path=self.path,
                    )
            self.keys, self._tokens, self._ema = keys, list(tokens), list(ema)
        self._index = {k: i for i, k in enumerate(self.keys)}

    @staticmethod
    def read(path: str | Path) -> tuple[list[str], torch.Tensor, torch.Tensor, dict[str, Any]]:
        """(keys, tokens ``[N, W]``, EMA tokens ``[N, W]``, metadata) of a store file."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise CheckpointError("token store not found", path=path)
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
            tokens, ema = f.get_tensor("tokens"), f.get_tensor("ema_tokens")
        keys = json.loads(raw.get("keys", "[]"))
        if len(keys) != tokens.shape[0] or tokens.shape != ema.shape:
            raise CheckpointError(
                f"token store is inconsistent: {len(keys)} keys, tokens {tuple(tokens.shape)}, ema {tuple(ema.shape)}",
                path=path,
            )
        return keys, tokens, ema, json.loads(raw.get("meta", "{}"))

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, keys: Sequence[str], tokens: torch.Tensor, ema: torch.Tensor) -> None:
        for key, t, e in zip(keys, tokens.detach().float().cpu(), ema.detach().float().cpu()):
            if key in self._index:
                raise DataError(f"image {key!r} already has a token in {self.path}")
            self._index[key] = len(self.keys)
            self.keys.append(key)
            self._tokens.append(t)
            self._ema.append(e)

    def save(self) -> None:
        from safetensors.torch import save_file

        empty = torch.zeros(0, self.token_width)
        tensors = {
            "tokens": torch.stack(self._tokens) if self._tokens else empty,
            "ema_tokens": torch.stack(self._ema) if self._ema else empty,
        }
        metadata = {"keys": json.dumps(self.keys), "meta": json.dumps(self.meta)}
        atomic_write(self.path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))

    def lookup(self, keys: Sequence[str], *, ema: bool = True) -> torch.Tensor:
        """Tokens ``[len(keys), W]`` (EMA tokens by default, as SEARLE uses them)."""
        missing = [k for k in keys if k not in self._index]
        if missing:
            raise MissingKeyError(
                f"{len(missing)} image(s) have no OTI token in {self.path}, e.g. {missing[0]!r}"
            )
        rows = self._ema if ema else self._tokens
        return torch.stack([rows[self._index[k]] for k in keys])


@dataclass
class OTIReport:
    """What a run did: images inverted and skipped, mean loss at the first and last step, and timings."""

    inverted: int
    skipped: int
    first_loss: float
    last_loss: float
    seconds: float
    store: str


def _key_seed(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest(), "little") >> 1


def _phrase_pairs(bank: PhraseBank, concepts: list[str], indices: list[int]) -> list[tuple[str, str]]:
    return [(concepts[i], p) for i in indices for p in bank.phrases.get(concepts[i], [])]


def run_oti(
    clip: ClipBundle,
    keys: Sequence[str],
    *,
    load_image: Callable[[str], Any],
    store: str | Path,
    config: OTIConfig | None = None,
    phrases: PhraseBank | None = None,
    progress: bool = True,
) -> OTIReport:
    """Invert every image of ``keys`` not yet in the token store ``store`` and save the tokens.

    Args:
        clip: any :class:`ClipBundle` (frozen here; only the tokens are optimised).
        keys: image keys, opened with ``load_image(key)`` (PIL image) and preprocessed with ``clip.transform``.
        store: safetensors token store (created, or resumed).
        config: :class:`OTIConfig` (paper defaults).
        phrases: concept phrases of the regulariser; None (or ``lambda_gpt=0``) trains with the cosine loss only.
        progress: show a tqdm bar.
    """
    import time

    cfg_ = config or OTIConfig()
    if cfg_.templates not in OTI_TEMPLATE_SETS:
        raise ConfigError(f"OTI templates={cfg_.templates!r}; valid: {', '.join(OTI_TEMPLATE_SETS)}")
    templates = OTI_TEMPLATE_SETS[cfg_.templates]
    clip.requires_grad_(False).eval()
    device = clip.device
    token_store = TokenStore(
        store, token_width=clip.token_width, meta={"clip": clip.name, "oti": to_dict(cfg_)}
    )
    todo = [k for k in dict.fromkeys(keys) if k not in token_store]
    use_gpt = phrases is not None and cfg_.lambda_gpt > 0 and bool(phrases.phrases)
    concepts = phrases.concepts if use_gpt and phrases is not None else []
    concept_feats = concept_features(clip, concepts).to(device) if use_gpt else None
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if cfg_.amp and device.type == "cuda" else nullcontext()
    )
    start, first, last, batches = time.perf_counter(), [], [], 0
    bar = tqdm(total=len(todo), desc="OTI", unit="img", disable=not progress)
    for offset in range(0, len(todo), cfg_.batch_size):
        batch_keys = todo[offset : offset + cfg_.batch_size]
        pixels = torch.stack([clip.transform(load_image(k)) for k in batch_keys]).to(device)
        with torch.no_grad(), autocast:
            image_feats = clip.image_features(pixels).float()
        rngs = [random.Random(_key_seed(cfg_.seed, k)) for k in batch_keys]
        init = [
            torch.randn(clip.token_width, generator=torch.Generator().manual_seed(r.getrandbits(62)))
            for r in rngs
        ]
        tokens = torch.nn.Parameter((torch.stack(init) * cfg_.init_std).to(device))
        ema = tokens.detach().clone()
        optimizer = torch.optim.AdamW([tokens], lr=cfg_.lr, weight_decay=cfg_.weight_decay)
        pairs: list[list[tuple[str, str]]] = [[] for _ in batch_keys]
        if use_gpt and phrases is not None and concept_feats is not None:
            nearest = top_concepts(image_feats, concept_feats, k=cfg_.top_k).tolist()
            pairs = [_phrase_pairs(phrases, concepts, row) for row in nearest]
        for step in range(cfg_.steps):
            optimizer.zero_grad(set_to_none=True)
            texts = [r.choice(templates).format(f" {cfg_.placeholder} ").strip() for r in rngs]
            with autocast:
                feats = clip.pseudo_token_features(texts, tokens, placeholder=cfg_.placeholder).float()
                per_image = cfg_.lambda_cos * (1 - F.cosine_similarity(feats, image_feats, dim=-1))
                weight = torch.full_like(per_image, cfg_.lambda_cos)
                with_gpt = [i for i, p in enumerate(pairs) if p]
                if with_gpt:
                    drawn = [rngs[i].choice(pairs[i]) for i in with_gpt]
                    real = [phrase for _, phrase in drawn]
                    swapped = [
                        " ".join(phrase.replace(concept, f" {cfg_.placeholder} ", 1).split())
                        for concept, phrase in drawn
                    ]
                    with torch.no_grad():
                        target = clip.encode_text(real).float()
                    inverted = clip.pseudo_token_features(
                        swapped, tokens[with_gpt], placeholder=cfg_.placeholder
                    ).float()
                    gpt = 1 - F.cosine_similarity(inverted, target, dim=-1)
                    idx = torch.tensor(with_gpt, device=device)
                    per_image = per_image.index_add(0, idx, cfg_.lambda_gpt * gpt)
                    weight = weight.index_add(0, idx, torch.full_like(gpt, cfg_.lambda_gpt))
                per_image = per_image / weight
            # the sum keeps every image's gradient its own (AdamW is element-wise): batching never changes results
            per_image.sum().backward()
            optimizer.step()
            with torch.no_grad():
                ema.mul_(cfg_.ema_decay).add_(tokens.detach(), alpha=1 - cfg_.ema_decay)
            if step == 0:
                first.append(float(per_image.detach().mean()))
        last.append(float(per_image.detach().mean()) if cfg_.steps else float("nan"))
        token_store.add(batch_keys, tokens.detach(), ema)
        batches += 1
        if batches % cfg_.save_every == 0:
            token_store.save()
        bar.update(len(batch_keys))
    bar.close()
    if todo and batches % cfg_.save_every != 0:
        token_store.save()
    if not token_store.path.is_file():
        token_store.save()
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    return OTIReport(
        inverted=len(todo),
        skipped=len(keys) - len(todo),
        first_loss=mean(first),
        last_loss=mean(last),
        seconds=time.perf_counter() - start,
        store=str(token_store.path),
    )


class OtiOptions(TypedDict, total=False):
    """The keyword arguments of :func:`run_oti`, which :func:`oti_tokens` passes on."""

    load_image: Required[Callable[[str], Any]]
    store: Required[str | Path]
    config: OTIConfig | None
    phrases: PhraseBank | None
    progress: bool


def oti_tokens(clip: ClipBundle, keys: Sequence[str], **options: Unpack[OtiOptions]) -> torch.Tensor:
    """EMA OTI tokens ``[len(keys), W]`` of ``keys`` in order, inverting (and storing) only the missing ones.

    What SEARLE-OTI evaluation needs: the reference images of a benchmark are inverted once into ``store``, and
    every later evaluation reads them back without optimising again.
    """
    run_oti(clip, keys, **options)
    return TokenStore(options["store"], token_width=clip.token_width).lookup(list(keys))
