"""SEARLE's phrase generation (``src/gpt_phrases_generation.py``) beside ours: continuations of
"a photo of {concept} that" sampled from a causal LM, here a tiny random Llama built offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_vlm import build_tiny_llama

from capret.inference.cir.concepts import CONTINUATION_VERSION, PhraseBank, generate_continuations


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("llm") / "llama")


def test_continuations_are_the_papers_form_and_resume(llama: Path, tmp_path: Path) -> None:
    cache = tmp_path / "phrases.json"
    bank, stats = generate_continuations(
        llama, ["shirt", "dress", "shirt"], cache=cache, samples=5, temperature=0.5, max_length=14, seed=3
    )
    assert stats == {"requested": 2, "cached": 0, "phrases": sum(len(v) for v in bank.phrases.values())}
    for concept, phrases in bank.phrases.items():
        assert 1 <= len(phrases) <= 5
        assert all(p.startswith(f"a photo of {concept} that") and "\n" not in p for p in phrases)
    saved = json.loads(cache.read_text())
    assert PhraseBank.load(cache).phrases == bank.phrases
    assert CONTINUATION_VERSION in json.dumps(saved) and '"samples": 5' in json.dumps(saved)
    # a resumed run samples only the new concept, and the old ones are what they were
    again, stats2 = generate_continuations(llama, ["shirt", "dress", "skirt"], cache=cache, samples=5,
                                           temperature=0.5, max_length=14, seed=3)  # fmt: skip
    assert stats2["requested"] == 1 and stats2["cached"] == 2
    assert {k: again.phrases[k] for k in ("shirt", "dress")} == bank.phrases
    fresh, _ = generate_continuations(llama, ["shirt", "dress", "skirt"], cache=tmp_path / "fresh.json",
                                      samples=5, temperature=0.5, max_length=14, seed=3)  # fmt: skip
    assert fresh.phrases == again.phrases  # per-concept seeds: resumed == uninterrupted
