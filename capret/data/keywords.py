"""Caption corpora and their keyword spans, for LinCIR's language-only training (Gu et al., CVPR 2024).

LinCIR replaces the keyword spans of a caption — runs of determiners, adjectives and nouns found by a
part-of-speech tagger — by the pseudo-word, and trains phi so that the edited caption keeps the caption's text
feature. No tagger is installed here, so :func:`keyword_spans` finds the same kind of spans with a closed-class
word list: a span is a maximal run of words that are not prepositions, conjunctions, pronouns, auxiliaries,
common verbs or ``-ing`` forms, and that holds at least one word that is not a determiner. It needs no model
and is deterministic; captions without any span fall back to replacing one word, then to ``"a photo of $"``,
as in LinCIR.

Caption corpora: our caption stores (JSONL, :mod:`capret.data.caption_records`), a text file with one caption
per line, or a JSON list of strings.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from capret.errors import DataError
from capret.io import read_json

__all__ = ["keyword_spans", "read_caption_corpus", "replace_keywords"]

_DETERMINERS = frozenset("a an the this that these those some any each every two three four five".split())
_BREAK = frozenset(
    """
    of in on at to for with without from by into onto over under above below behind beside between near across
    through around about against along among up down off out than as like per via inside outside
    and or but nor so yet while whereas because if then also
    i you he she it we they me him her us them my your his its our their mine yours who whom whose which what
    is are was were be been being am has have had do does did can could will would shall should may might must
    not no very more less most least too just only
    show shows showing wears wearing holds holding sits sitting stands standing looks looking has having
    """.split()
)
_WORD = re.compile(r"[a-z0-9'-]+|[^\sa-z0-9]")


def keyword_spans(caption: str) -> list[str]:
    """The keyword spans of ``caption`` (lower-cased words joined by single spaces), in order of appearance."""
    words = _WORD.findall(caption.lower())
    spans: list[str] = []
    run: list[str] = []

    def close() -> None:
        if any(w not in _DETERMINERS for w in run):
            spans.append(" ".join(run))
        run.clear()

    for word in words:
        is_break = word in _BREAK or not word[0].isalnum() or (len(word) > 4 and word.endswith("ing"))
        if is_break:
            close()
        else:
            run.append(word)
    close()
    return spans


def replace_keywords(caption: str, *, placeholder: str = "$", rng: random.Random | None = None) -> str:
    """``caption`` (lower-cased, words re-spaced) with every keyword span replaced by `` placeholder ``.

    Without spans one random word is replaced (``rng``); an empty caption becomes ``"a photo of $"``.
    """
    words = _WORD.findall(caption.lower())
    if not words:
        return f"a photo of {placeholder}"
    spans = set(keyword_spans(caption))
    out: list[str] = []
    i = 0
    replaced = False
    while i < len(words):
        # the longest span starting here (spans are maximal runs, so a greedy match is the run itself)
        match = 0
        for j in range(len(words), i, -1):
            if " ".join(words[i:j]) in spans:
                match = j - i
                break
        if match:
            if not out or out[-1] != placeholder:
                out.append(placeholder)
            i += match
            replaced = True
        else:
            out.append(words[i])
            i += 1
    if not replaced:
        pick = (rng or random.Random(0)).randrange(len(words))
        out = [placeholder if k == pick else w for k, w in enumerate(words)]
    return " ".join(out)


def read_caption_corpus(path: str | Path, *, limit: int | None = None) -> list[str]:
    """Captions of a corpus file: ``.jsonl`` caption store, ``.json`` list of strings, or one per line."""
    path = Path(path)
    if not path.is_file():
        raise DataError("caption corpus not found", path=path)
    if path.suffix == ".jsonl":
        from capret.data.caption_records import read_captions

        captions = [str(c) for c in read_captions(path).values()]
    elif path.suffix == ".json":
        data = read_json(path, what="caption corpus")
        if not isinstance(data, list) or not all(isinstance(c, str) for c in data):
            raise DataError("a .json caption corpus must be a list of strings", path=path)
        captions = data
    else:
        captions = path.read_text(encoding="utf-8").splitlines()
    captions = [" ".join(c.split()) for c in captions if c.strip()]
    if not captions:
        raise DataError("the caption corpus is empty", path=path)
    return captions[:limit] if limit else captions
