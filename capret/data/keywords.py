"""Caption corpora and their keyword spans, for LinCIR's language-only training (Gu et al., CVPR 2024).

LinCIR replaces the keyword spans of a caption — runs of determiners, adjectives, nouns and proper nouns found by
spaCy's part-of-speech tagger (``loader.py``'s ``extract_keywords_spacy``) — by the pseudo-word, and trains phi
so that the edited caption keeps the caption's text feature. Captions are first lower-cased with every literal
``$`` removed (LinCIR's ``clean_caption``), so a dollar sign in a caption never becomes an injection point.

Two span finders:

* ``tagger=spacy_tagger()`` — LinCIR's: spaCy (``pip install 'capret[nlp]'`` and ``python -m spacy download
  en_core_web_sm``; the model is not on PyPI), spans replaced by plain string replacement, every occurrence, as
  LinCIR does; a span that is not found verbatim sends the caption to the random-word fallback.
* no tagger (the default when spaCy or its model is missing) — a closed-class word list: a span is a maximal run
  of words that are not prepositions, conjunctions, pronouns, auxiliaries, common verbs or ``-ing`` forms, and
  that holds at least one word that is not a determiner. It needs no model and is deterministic, but it also
  masks verbs and adverbs outside its list, which a tagger would keep.

Captions without any span get one random word replaced (``rng``: the LinCIR task draws it again every epoch, as
LinCIR's dataset does in ``__getitem__``); an empty caption becomes ``"a photo of $"``.

Caption corpora: our caption stores (JSONL, :mod:`capret.data.caption_records`), a text file with one caption
per line, or a JSON list of strings.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from pathlib import Path

from capret.errors import DataError, MissingDependencyError
from capret.io import read_json

__all__ = [
    "LINCIR_POS",
    "Tagger",
    "clean_caption",
    "keyword_spans",
    "pos_spans",
    "read_caption_corpus",
    "replace_keywords",
    "replace_spans",
    "spacy_tagger",
]

#: a part-of-speech tagger: text -> ``[(token text, universal POS tag)]`` (spaCy's ``token.pos_``)
Tagger = Callable[[str], list[tuple[str, str]]]
#: the tags of LinCIR's keyword spans
LINCIR_POS = frozenset({"NOUN", "PROPN", "ADJ", "DET"})

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


def clean_caption(caption: str) -> str:
    """LinCIR's cleaning: lower-cased, every ``$`` removed (it is the placeholder), whitespace collapsed."""
    return " ".join(caption.lower().replace("$", " ").split())


def pos_spans(tagged: list[tuple[str, str]]) -> list[str]:
    """Maximal runs of tokens tagged :data:`LINCIR_POS`, each joined by single spaces, in order."""
    spans: list[str] = []
    run: list[str] = []
    for text, pos in tagged:
        if pos in LINCIR_POS:
            run.append(text)
        elif run:
            spans.append(" ".join(run))
            run = []
    if run:
        spans.append(" ".join(run))
    return spans


def spacy_tagger(model: str = "en_core_web_sm") -> Tagger:
    """spaCy's tagger as a :data:`Tagger` (LinCIR's choice of model).

    Raises:
        MissingDependencyError: spaCy or the model is not installed (with the commands that install them).
    """
    try:
        import spacy
    except ImportError as exc:
        raise MissingDependencyError(
            "LinCIR's keyword spans need spaCy: pip install 'capret[nlp]' (or set the word-list spans: "
            "data.keywords=wordlist)"
        ) from exc
    try:
        nlp = spacy.load(model)
    except OSError as exc:
        raise MissingDependencyError(
            f"spaCy model {model!r} is not installed (it is not on PyPI): python -m spacy download {model}"
        ) from exc
    return lambda text: [(token.text, token.pos_) for token in nlp(text)]


def keyword_spans(caption: str, *, tagger: Tagger | None = None) -> list[str]:
    """The keyword spans of the cleaned ``caption`` in order of appearance: the tagger's runs of
    :data:`LINCIR_POS` tokens, or without a tagger the word-list runs (lower-cased words joined by spaces)."""
    caption = clean_caption(caption)
    if tagger is not None:
        return pos_spans(tagger(caption))
    words = _WORD.findall(caption)
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


def _replace_tagged(caption: str, spans: list[str], *, placeholder: str, rng: random.Random) -> str:
    """LinCIR's replacement: each span replaced everywhere by plain string replacement; a span not found
    verbatim (or no span at all) replaces one random word instead."""
    out = caption
    for span in spans or [""]:
        if span and span in caption:
            out = out.replace(span, placeholder)
            continue
        words = caption.split(" ")
        out = out.replace(rng.choice(words), placeholder) if words and words != [""] else out
        break
    return out


def replace_keywords(
    caption: str, *, placeholder: str = "$", rng: random.Random | None = None, tagger: Tagger | None = None
) -> str:
    """The cleaned ``caption`` (:func:`clean_caption`) with every keyword span replaced by ``placeholder``.

    Without spans one random word is replaced (``rng``); an empty caption becomes ``"a photo of $"``.
    """
    caption = clean_caption(caption)
    spans = keyword_spans(caption, tagger=tagger)
    return replace_spans(caption, spans, placeholder=placeholder, rng=rng, tagged=tagger is not None)


def replace_spans(
    caption: str,
    spans: list[str],
    *,
    placeholder: str = "$",
    rng: random.Random | None = None,
    tagged: bool = False,
) -> str:
    """:func:`replace_keywords` with the spans already found (``keyword_spans`` of the same cleaned caption):
    the LinCIR task tags every caption once and draws the fallback word again each epoch.

    ``tagged``: the spans come from a tagger, so they are replaced as LinCIR does (plain string replacement);
    word-list spans are matched word by word.
    """
    caption = clean_caption(caption)
    rng = rng or random.Random(0)
    if not caption:
        return f"a photo of {placeholder}"
    if tagged:
        return _replace_tagged(caption, spans, placeholder=placeholder, rng=rng)
    words = _WORD.findall(caption)
    span_set = set(spans)
    out: list[str] = []
    i = 0
    replaced = False
    while i < len(words):
        # the longest span starting here (spans are maximal runs, so a greedy match is the run itself)
        match = 0
        for j in range(len(words), i, -1):
            if " ".join(words[i:j]) in span_set:
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
        pick = rng.randrange(len(words))
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
