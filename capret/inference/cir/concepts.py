"""Concept phrases for SEARLE's regulariser: a language model describes each concept, CLIP picks the concepts.

SEARLE (Baldrati et al., ICCV 2023, Sec. 4.1) keeps a pseudo-token in the neighbourhood of real words: for each
image the ``top_k`` (15) concepts of a vocabulary that CLIP finds most similar to it are looked up, a phrase an
LLM wrote about one of them ("a photo of a dog that is running on the beach") is drawn, the concept in it is
replaced by the pseudo-word, and the two phrases' text features are pulled together (cosine). The paper's
phrases come from GPT-Neo 2.7B; here any captioning LLM backend writes them (``captioning.backends``: a local
transformers model or an OpenAI-compatible server), or a phrase file is given.

:class:`PhraseBank` is that concept -> phrases map, cached as JSON (written atomically after every batch of
concepts, so an interrupted generation resumes and a rerun makes no model call). Replies that contain no phrase
with the concept fall back to ``"a photo of {concept}"``; the number of fallbacks is reported.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from capret.errors import DataError
from capret.io import atomic_write_json, read_json, read_text
from capret.models.clip_base import ClipBundle

__all__ = [
    "CAPRET_CONCEPT_TEMPLATES",
    "CONTINUATION_VERSION",
    "CONCEPT_TEMPLATES",
    "SEARLE_TEMPLATES",
    "TEMPLATE_SETS",
    "PHRASE_PROMPT_VERSION",
    "PhraseBank",
    "concept_features",
    "generate_phrases",
    "generate_continuations",
    "load_concepts",
    "top_concepts",
]

#: SEARLE's 24 prompts (``src/utils.py`` ``get_templates``, after PALAVRA): OTI's image-matching loss draws one
#: per image and step, and the concept ensembles average over them
SEARLE_TEMPLATES: tuple[str, ...] = (
    "This is a photo of a {}",
    "This photo contains a {}",
    "A photo of a {}",
    "This is an illustration of a {}",
    "This illustration contains a {}",
    "An illustrations of a {}",
    "This is a sketch of a {}",
    "This sketch contains a {}",
    "A sketch of a {}",
    "This is a diagram of a {}",
    "This diagram contains a {}",
    "A diagram of a {}",
    "A {}",
    "We see a {}",
    "{}",
    "We see a {} in this photo",
    "We see a {} in this image",
    "We see a {} in this illustration",
    "We see a {} photo",
    "We see a {} image",
    "We see a {} illustration",
    "{} photo",
    "{} image",
    "{} illustration",
)
#: our own eight prompts (the earlier default): ``templates="capret"``
CAPRET_CONCEPT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}",
    "a picture of a {}",
    "an image showing a {}",
    "a close-up photo of a {}",
    "a {} in the scene",
    "there is a {} in this photo",
    "a sketch of a {}",
    "a {}",
)
#: the prompt sets by name; the concept ensembles default to SEARLE's
TEMPLATE_SETS: dict[str, tuple[str, ...]] = {"searle": SEARLE_TEMPLATES, "capret": CAPRET_CONCEPT_TEMPLATES}
CONCEPT_TEMPLATES = SEARLE_TEMPLATES

PHRASE_PROMPT_VERSION = "phrases-v1"
_BULLET = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s*")


def load_concepts(path: str | Path) -> list[str]:
    """Concepts of a vocabulary file: one per line (``#`` comments and blank lines skipped) or a JSON list."""
    path = Path(path)
    if not path.is_file():
        raise DataError("concept vocabulary file not found", path=path)
    if path.suffix == ".json":
        items = read_json(path, what="concept vocabulary")  # names the file: encoding, syntax, duplicates
        if not isinstance(items, list) or not all(isinstance(c, str) for c in items):
            raise DataError("a JSON concept file must hold a list of strings", path=path)
    else:
        text = read_text(path, what="concept vocabulary")
        items = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    concepts = list(dict.fromkeys(c.strip() for c in items if c.strip()))
    if not concepts:
        raise DataError("the concept vocabulary is empty", path=path)
    return concepts


def _prompt(concept: str, count: int) -> str:
    return (
        f"Write {count} short and different phrases, each describing a photo of {concept}. Every phrase must "
        f'contain the exact words "{concept}". Write one phrase per line, without numbering or quotes.'
    )


def parse_phrases(reply: str, concept: str, *, limit: int) -> list[str]:
    """The lines of ``reply`` that contain ``concept`` (bullets/numbers/quotes stripped), at most ``limit``."""
    out = []
    for line in reply.splitlines():
        phrase = _BULLET.sub("", line).strip().strip("\"'").strip()
        if concept in phrase and phrase not in out:
            out.append(" ".join(phrase.split()))
    return out[:limit]


@dataclass
class PhraseBank:
    """Concept -> phrases that contain the concept verbatim (so the concept can be replaced by ``$``)."""

    phrases: dict[str, list[str]] = field(default_factory=dict)
    source: dict[str, Any] = field(
        default_factory=dict
    )  # how the phrases were made (backend, prompt version)

    def __post_init__(self) -> None:
        # SEARLE drops concepts whose phrases do not contain them; we drop the phrases instead
        self.phrases = {c: [p for p in ps if c in p] for c, ps in self.phrases.items()}
        self.phrases = {c: ps for c, ps in self.phrases.items() if ps}

    @classmethod
    def load(cls, path: str | Path) -> PhraseBank:
        """A phrase file: ``{"phrases": {concept: [..]}, "source": {...}}`` or a plain ``{concept: [..]}``."""
        path = Path(path)
        if not path.is_file():
            raise DataError("phrase file not found", path=path)
        data = read_json(path, what="phrase file")  # names the file: encoding, syntax, duplicate keys
        phrases = data.get("phrases", data) if isinstance(data, dict) else None
        if not isinstance(phrases, dict) or not all(
            isinstance(v, list) and all(isinstance(p, str) for p in v) for v in phrases.values()
        ):
            raise DataError("a phrase file maps each concept to a list of phrases", path=path)
        return cls(phrases=phrases, source=data.get("source", {}) if "phrases" in data else {})

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, {"source": self.source, "phrases": self.phrases}, indent=1)

    @property
    def concepts(self) -> list[str]:
        return list(self.phrases)


def generate_phrases(
    backend: Any,
    concepts: Sequence[str],
    *,
    cache: str | Path,
    per_concept: int = 8,
    batch_size: int = 16,
    max_tokens: int = 256,
) -> tuple[PhraseBank, dict[str, int]]:
    """Ask an LLM caption backend for phrases about every concept not yet in ``cache``; save after each batch.

    Args:
        backend: a :class:`captioning.backends.base.CaptionBackend` (its ``ask`` side is used).
        concepts: the vocabulary.
        cache: JSON phrase file, read first and rewritten atomically after every batch.
        per_concept: phrases requested per concept.
        batch_size: concepts per ``ask`` call.
        max_tokens: generation budget per reply.

    Returns:
        The bank and counts ``{"requested", "cached", "fallback", "failed"}`` (``fallback``: replies with no usable
        phrase, replaced by ``"a photo of {concept}"``; ``failed``: requests the backend reported as errors).
    """
    from captioning.types import ChatRequest, ItemContext

    cache = Path(cache)
    bank = PhraseBank.load(cache) if cache.is_file() else PhraseBank()
    bank.source = {"backend": getattr(backend, "name", ""), "model": backend.describe(),
                   "prompt_version": PHRASE_PROMPT_VERSION}  # fmt: skip
    todo = [c for c in dict.fromkeys(concepts) if c not in bank.phrases]
    stats = {"requested": len(todo), "cached": len(concepts) - len(todo), "fallback": 0, "failed": 0}
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        requests = [
            ChatRequest(
                messages=[{"role": "user", "content": _prompt(c, per_concept)}],
                kind="summary",
                context=ItemContext(key=f"concept/{c}"),
            )
            for c in chunk
        ]
        for concept, generation in zip(chunk, backend.ask(requests, max_tokens=max_tokens)):
            found = [] if generation.error else parse_phrases(generation.text, concept, limit=per_concept)
            stats["failed"] += generation.error is not None
            if not found:
                stats["fallback"] += 1
                found = [f"a photo of {concept}"]
            bank.phrases[concept] = found
        bank.save(cache)
    return bank, stats


#: version of the paper's phrase generation (recorded in the phrase file's source)
CONTINUATION_VERSION = "searle-continuation-v1"


def _clean_continuation(text: str) -> str:
    """SEARLE's ``process_phrase``: newlines become ". ", runs of dots one dot; whitespace collapsed."""
    text = re.sub(r"(\n)+", ". ", text)
    text = re.sub(r"\.+", ".", text)
    return " ".join(text.split())


@torch.no_grad()
def generate_continuations(
    model: str | Path,
    concepts: Sequence[str],
    *,
    cache: str | Path,
    samples: int = 256,
    temperature: float = 0.5,
    max_length: int = 35,
    no_repeat_ngram_size: int = 2,
    seed: int = 0,
    device: str = "cpu",
) -> tuple[PhraseBank, dict[str, int]]:
    """SEARLE's phrase generation (``src/gpt_phrases_generation.py``): a causal language model (GPT-Neo 2.7B in
    the paper) continues ``"a photo of {concept} that"``, ``samples`` sampled sequences per concept at
    ``temperature``, ``max_length`` tokens in all (prompt included), no repeated bigram; newlines become ". ".

    The concept list is the caller's (SEARLE uses the Open Images V7 class names). Phrases that lost the concept
    are dropped (:class:`PhraseBank`); each concept is sampled with its own seed (``seed`` + its position), so a
    resumed run writes what an uninterrupted one would. The cache is rewritten after every concept.

    Returns:
        The bank and counts ``{"requested", "cached", "phrases"}``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = Path(cache)
    bank = PhraseBank.load(cache) if cache.is_file() else PhraseBank()
    bank.source = {
        "model": str(model),
        "prompt_version": CONTINUATION_VERSION,
        "samples": samples,
        "temperature": temperature,
        "max_length": max_length,
        "no_repeat_ngram_size": no_repeat_ngram_size,
        "seed": seed,
    }
    concepts = list(dict.fromkeys(c.strip() for c in concepts if c.strip()))
    todo = [(i, c) for i, c in enumerate(concepts) if c not in bank.phrases]
    stats = {"requested": len(todo), "cached": len(concepts) - len(todo), "phrases": 0}
    if not todo:
        return bank, stats
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    lm: Any = AutoModelForCausalLM.from_pretrained(str(model))
    lm = lm.to(device).eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for index, concept in todo:
        inputs = tokenizer(f"a photo of {concept} that", return_tensors="pt").to(device)
        torch.manual_seed(seed + index)
        output = lm.generate(
            **inputs,
            do_sample=True,
            max_length=max_length,
            num_return_sequences=samples,
            temperature=temperature,
            no_repeat_ngram_size=no_repeat_ngram_size,
            pad_token_id=pad,
        )
        texts = [_clean_continuation(t) for t in tokenizer.batch_decode(output, skip_special_tokens=True)]
        kept = list(dict.fromkeys(t for t in texts if concept in t))
        bank.phrases[concept] = kept or [f"a photo of {concept}"]
        stats["phrases"] += len(kept)
        bank.save(cache)
    return bank, stats


@torch.no_grad()
def concept_features(
    clip: ClipBundle,
    concepts: Sequence[str],
    *,
    templates: Sequence[str] = CONCEPT_TEMPLATES,
    batch_size: int = 256,
) -> torch.Tensor:
    """Normalised ``[C, d]`` text features: the mean of the normalised template features of each concept."""
    texts = [t.format(c) for c in concepts for t in templates]
    chunks = []
    for start in range(0, len(texts), batch_size):
        chunks.append(clip.encode_text(texts[start : start + batch_size]).float().cpu())
    feats = torch.cat(chunks).view(len(concepts), len(templates), -1).mean(dim=1)
    return F.normalize(feats, dim=-1)


def top_concepts(image_features: torch.Tensor, concept_feats: torch.Tensor, *, k: int) -> torch.Tensor:
    """Indices ``[N, k]`` of the concepts most similar (cosine) to each image, best first."""
    sims = F.normalize(image_features.float(), dim=-1) @ concept_feats.T
    return sims.topk(min(k, concept_feats.shape[0]), dim=1).indices
