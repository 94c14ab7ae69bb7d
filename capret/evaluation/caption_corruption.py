"""Bad captions on purpose: corrupt a share of the captions and see how much retrieval depends on them.

The study's stated risk is that a captioner is wrong at query time (or in the gallery). Three corruptions,
each applied to a chosen ``rate`` of the captioned items (the same items for every mode at a given seed):

* ``shuffle`` - the chosen items trade captions among themselves (a cyclic shift of a random order, so every
  chosen item gets another item's caption): fluent, confident, about the wrong garment;
* ``drop`` - the chosen items lose their caption (the model's no-caption path), the captioner failing;
* ``replace`` - every attribute word of the chosen captions (colour, garment, pattern, sleeve/length words)
  is swapped for a different word of the same kind: the right garment described with wrong attributes.

Pure functions of the captions and a seed; :func:`capret.inference.dualstream.robustness.caption_corruption_sweep`
re-embeds and scores the split for each (mode, rate).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np

from capret.data.deepfashion2 import CATEGORIES
from capret.errors import ConfigError
from captioning.colors import PALETTE

__all__ = ["ATTRIBUTE_WORDS", "CORRUPTIONS", "corrupt_caption_map", "corrupt_captions", "replace_attributes"]

CORRUPTIONS = ("shuffle", "drop", "replace")

#: Groups of interchangeable attribute words; a replaced word is drawn from its own group.
ATTRIBUTE_WORDS: dict[str, tuple[str, ...]] = {
    "colour": tuple(PALETTE),
    "garment": (*CATEGORIES.values(), "dress", "top", "shirt", "t-shirt", "jacket", "coat", "jeans", "skirt"),
    "pattern": ("plain", "striped", "checked", "floral", "dotted", "printed", "textured", "linear", "busy"),
    "length": ("short", "long", "tall", "wide", "narrow", "small", "large"),
}


#: word -> its group (a word listed in two groups keeps the first)
_GROUP_OF: dict[str, str] = {}
for _group, _words in ATTRIBUTE_WORDS.items():
    for _word in _words:
        _GROUP_OF.setdefault(_word.lower(), _group)
#: One alternation, longest first, so "short sleeve top" is one garment word, not a length word + rest.
_ATTRIBUTE = re.compile(
    r"\b(" + "|".join(re.escape(w) for w in sorted(_GROUP_OF, key=len, reverse=True)) + r")\b", re.IGNORECASE
)


def replace_attributes(caption: str, *, rng: np.random.Generator) -> str:
    """``caption`` with every attribute word replaced by a different word of its group (one left-to-right
    pass, longest words first)."""

    def swap(match: re.Match[str]) -> str:
        current = match.group(0).lower()
        choices = [w for w in ATTRIBUTE_WORDS[_GROUP_OF[current]] if w.lower() != current]
        return choices[int(rng.integers(len(choices)))]

    return _ATTRIBUTE.sub(swap, caption)


def corrupt_captions(
    captions: Sequence[str | None], *, mode: str, rate: float, seed: int = 0
) -> list[str | None]:
    """Corrupt ``rate`` of the captioned entries (``None`` entries stay ``None`` and are not counted).

    Which entries are chosen depends only on ``seed`` and the positions of the captioned entries, and the
    chosen set grows with ``rate`` (the entries chosen at 0.25 are among those chosen at 0.5).
    """
    if mode not in CORRUPTIONS:
        raise ConfigError(f"unknown caption corruption {mode!r}; valid: {', '.join(CORRUPTIONS)}")
    if not 0.0 <= rate <= 1.0:
        raise ConfigError(f"corruption rate must be in [0, 1], got {rate}")
    out = list(captions)
    present = np.array([i for i, c in enumerate(captions) if c is not None], dtype=np.int64)
    rng = np.random.default_rng(seed)
    order = present[rng.permutation(len(present))]
    chosen = order[: int(round(rate * len(present)))]
    if mode == "drop":
        for i in chosen:
            out[i] = None
    elif mode == "shuffle":
        if len(chosen) >= 2:
            shifted = np.roll(chosen, 1)  # chosen[j] takes the caption of chosen[j - 1]: nobody keeps its own
            for target, source in zip(chosen, shifted):
                out[target] = captions[source]
    else:
        words = np.random.default_rng([seed, 1])
        for i in sorted(chosen.tolist()):
            out[i] = replace_attributes(str(captions[i]), rng=words)
    return out


def corrupt_caption_map(
    captions: Mapping[str, str], keys: Sequence[str], *, mode: str, rate: float, seed: int = 0
) -> dict[str, str]:
    """:func:`corrupt_captions` over the items ``keys`` of a key -> caption map; dropped keys are left out."""
    values = corrupt_captions([captions.get(k) for k in keys], mode=mode, rate=rate, seed=seed)
    return {k: v for k, v in zip(keys, values) if v is not None}
