"""OTI: the loss goes down in both CLIP families, batching never changes a token, and the store resumes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from tiny_zeroshot import tiny_hf_clip, tiny_open_clip, write_image_folder, write_phrase_file

from capret.data.image_sources import open_image_source
from capret.errors import CheckpointError
from capret.inference.cir.concepts import PhraseBank, generate_phrases, parse_phrases
from capret.inference.cir.oti import OTIConfig, TokenStore, oti_tokens, run_oti
from capret.models.clip import ClipBundle, load_clip

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("oti")
    return {
        "base": base,
        "hf": load_clip(tiny_hf_clip(base / "hf")),
        "open_clip": load_clip(tiny_open_clip(base / "oc"), backend="open_clip"),
        "images": open_image_source(write_image_folder(base / "images", n=4)),
        "phrases": PhraseBank.load(write_phrase_file(base / "phrases.json")),
    }


def _oti(world: dict[str, Any], clip: ClipBundle, store: Path, **overrides: Any) -> Any:
    config = OTIConfig(**{"steps": 25, "batch_size": 4, "top_k": 2, **overrides})
    source = world["images"]
    return run_oti(
        clip,
        source.keys,
        load_image=source.load,
        store=store,
        config=config,
        phrases=world["phrases"],
        progress=False,
    )


@pytest.mark.parametrize("family", ["hf", "open_clip"])
def test_oti_loss_decreases(world: dict[str, Any], family: str, tmp_path: Path) -> None:
    report = _oti(world, world[family], tmp_path / "tokens.safetensors")
    assert report.inverted == 4 and report.skipped == 0
    assert report.last_loss < report.first_loss - 0.05
    keys, tokens, ema, meta = TokenStore.read(tmp_path / "tokens.safetensors")
    assert keys == world["images"].keys and tokens.shape == ema.shape == (4, world[family].token_width)
    assert meta["clip"] == world[family].name and meta["oti"]["steps"] == 25


def test_batched_equals_one_image_at_a_time(world: dict[str, Any], tmp_path: Path) -> None:
    _oti(world, world["open_clip"], tmp_path / "batched.safetensors", batch_size=4)
    _oti(world, world["open_clip"], tmp_path / "single.safetensors", batch_size=1)
    _, tok_b, ema_b, _ = TokenStore.read(tmp_path / "batched.safetensors")
    _, tok_s, ema_s, _ = TokenStore.read(tmp_path / "single.safetensors")
    torch.testing.assert_close(ema_b, ema_s, rtol=0, atol=1e-5)
    torch.testing.assert_close(tok_b, tok_s, rtol=0, atol=1e-5)


class _Killed(Exception):
    pass


def test_store_resumes_and_never_touches_finished_images(world: dict[str, Any], tmp_path: Path) -> None:
    clip, source, store = world["open_clip"], world["images"], tmp_path / "tokens.safetensors"
    config = OTIConfig(steps=5, batch_size=2, top_k=2)

    def dies_on_third(key: str) -> Image.Image:
        if key == source.keys[2]:
            raise _Killed(key)  # the process dies while reading the second batch
        return source.load(key)

    with pytest.raises(_Killed):
        run_oti(clip, source.keys, load_image=dies_on_third, store=store, config=config, progress=False)
    keys, tokens, ema, _ = TokenStore.read(store)
    assert keys == source.keys[:2]
    report = run_oti(clip, source.keys, load_image=source.load, store=store, config=config, progress=False)
    assert (report.inverted, report.skipped) == (2, 2)
    keys2, tokens2, ema2, _ = TokenStore.read(store)
    assert keys2 == source.keys
    assert torch.equal(tokens2[:2], tokens) and torch.equal(ema2[:2], ema)
    again = run_oti(clip, source.keys, load_image=source.load, store=store, config=config, progress=False)
    assert again.inverted == 0
    order = [source.keys[3], source.keys[0]]

    def never(key: str) -> Image.Image:
        raise AssertionError(f"{key} was opened although its token is stored")

    assert torch.equal(oti_tokens(clip, order, load_image=never, store=store, config=config), ema2[[3, 0]])
    with pytest.raises(CheckpointError, match="wide"):
        TokenStore(store, token_width=clip.token_width + 1)


class _FakeLLM:
    """A caption backend whose ask side writes numbered phrases (counts its calls)."""

    name = "fake"

    def __init__(self) -> None:
        self.calls = 0

    def describe(self) -> dict[str, str]:
        return {"llm": "fake"}

    def ask(self, requests: list[Any], *, max_tokens: int) -> list[Any]:
        from captioning.types import Generation

        self.calls += len(requests)
        out = []
        for r in requests:
            concept = r.context.key.split("/", 1)[1]
            text = (
                "nothing useful"
                if concept == "zebra"
                else f'1. a {concept} on a table\n- "the {concept} at night"'
            )
            out.append(Generation(text=text))
        return out


def test_phrases_are_generated_once_and_cached(tmp_path: Path) -> None:
    llm = _FakeLLM()
    bank, stats = generate_phrases(llm, ["cup", "zebra", "red car"], cache=tmp_path / "p.json", batch_size=2)
    assert bank.phrases["cup"] == ["a cup on a table", "the cup at night"]
    assert bank.phrases["zebra"] == ["a photo of zebra"] and stats["fallback"] == 1
    assert llm.calls == 3
    again, stats2 = generate_phrases(llm, ["cup", "zebra", "red car"], cache=tmp_path / "p.json")
    assert llm.calls == 3 and stats2["cached"] == 3 and again.phrases == bank.phrases
    assert parse_phrases("a dog\n2) the cat sat\ncat", "cat", limit=5) == ["the cat sat", "cat"]
