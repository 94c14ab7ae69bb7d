"""One CLIP interface over Hugging Face and open_clip, and pseudo-word injection into either text tower.

Exactness: writing the input embedding of a real word into the placeholder's position must give the very
feature of the prompt with that word written out, in both families (ViT and ModifiedResNet open_clip towers).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from tiny_zeroshot import tiny_hf_clip, tiny_open_clip

from capret.data.transforms import TargetPad
from capret.models.clip import ClipBundle, ClipConfig, PseudoTokenError, load_clip, load_clip_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ClipBundle]:
    base = tmp_path_factory.mktemp("clips")
    return {
        "hf": load_clip(tiny_hf_clip(base / "hf")),
        "open_clip_vit": load_clip(tiny_open_clip(base / "vit"), backend="open_clip"),
        "open_clip_rn": load_clip_config(
            ClipConfig(backend="open_clip", name=tiny_open_clip(base / "rn", image_tower="rn"))
        ),
    }


FAMILIES = ["hf", "open_clip_vit", "open_clip_rn"]


@pytest.mark.parametrize("family", FAMILIES)
def test_injecting_a_word_embedding_equals_writing_the_word(
    clips: dict[str, ClipBundle], family: str
) -> None:
    clip = clips[family]
    assert len(clip.plain_token_ids("cat")) == 1  # a one-token word of this tokenizer
    # the tiny HF tokenizer is byte-level BPE (a leading space changes the token), so both prompts start with it
    with torch.no_grad():
        injected = clip.pseudo_token_features(["$ sits on the mat"], clip.word_embedding("cat")[None])
        written = clip.text_features(**clip.tokenize(["cat sits on the mat"]))
        other = clip.pseudo_token_features(["$ sits on the mat"], clip.word_embedding("dog")[None])
    torch.testing.assert_close(injected, written, rtol=0, atol=1e-6)
    assert (injected - other).abs().max() > 1e-4


def test_open_clip_injection_mid_sentence_and_repeated(clips: dict[str, ClipBundle]) -> None:
    """CLIP's BPE keeps `$` one token inside a sentence; every occurrence takes the vector (SEARLE's FashionIQ)."""
    clip = clips["open_clip_vit"]
    cat = clip.word_embedding("cat")[None].repeat(2, 1)
    with torch.no_grad():
        injected = clip.pseudo_token_features(["a photo of $ that is red", "a $ and a $"], cat)
        written = clip.text_features(**clip.tokenize(["a photo of cat that is red", "a cat and a cat"]))
    torch.testing.assert_close(injected, written, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_reach_the_pseudo_token_only(clips: dict[str, ClipBundle], family: str) -> None:
    clip = clips[family]
    clip.requires_grad_(False)
    vector = torch.zeros(1, clip.token_width, requires_grad=True)
    clip.pseudo_token_features(["$ on the mat"], vector).sum().backward()
    assert vector.grad is not None and vector.grad.abs().sum() > 0
    assert all(p.grad is None for p in clip.parameters())


def test_placeholder_errors(clips: dict[str, ClipBundle]) -> None:
    clip = clips["open_clip_vit"]
    assert clip.placeholder_id("$") == clip.plain_token_ids("$")[0]  # no hard-coded id
    with pytest.raises(PseudoTokenError, match="exactly one token"):
        clip.placeholder_id("zzqxv placeholder")
    with pytest.raises(PseudoTokenError, match=r"no '\$' token"):
        clip.pseudo_token_features(["a photo of a cat"], torch.zeros(1, clip.token_width))
    with pytest.raises(ValueError, match="vectors"):
        clip.pseudo_token_features(["a $"], torch.zeros(1, clip.token_width + 1))


@pytest.mark.parametrize("family", FAMILIES)
def test_one_interface(clips: dict[str, ClipBundle], family: str) -> None:
    clip = clips[family]
    image = Image.new("RGB", (20, 60), (200, 30, 30))
    pixels = clip.transform(image)[None]
    out = clip(pixels=pixels, **clip.tokenize(["a red dress", "a photo"]))
    assert out["image"].shape == (1, clip.feature_dim) and out["text"].shape == (2, clip.feature_dim)
    assert torch.allclose(clip.encode_image(pixels).norm(dim=-1), torch.ones(1))
    assert clip.encode_text(["a red dress"]).shape == (1, clip.feature_dim)
    assert clip.logit_scale > 1
    image_fp, text_fp = clip.image_fingerprint(), clip.text_fingerprint()
    clip.set_trainable(text=True, image=False)
    trainable = [n for n, p in clip.model.named_parameters() if p.requires_grad]
    assert trainable and all(clip.is_text_parameter(n) for n in trainable)
    with torch.no_grad():
        next(p for n, p in clip.model.named_parameters() if clip.is_text_parameter(n)).add_(1.0)
    assert clip.image_fingerprint() == image_fp and clip.text_fingerprint() != text_fp
    clip.requires_grad_(False)


def test_open_clip_transform_is_targetpad_then_the_models_own(tmp_path: Path) -> None:
    import open_clip

    name = tiny_open_clip(tmp_path / "vit")
    clip = load_clip(name, backend="open_clip", preprocess="targetpad")
    _, _, own = open_clip.create_model_and_transforms(name)
    tall = Image.new("RGB", (20, 80), (10, 200, 30))
    torch.testing.assert_close(clip.transform(tall), own(TargetPad(1.25)(tall)))
    plain = load_clip(name, backend="open_clip", preprocess="none")
    torch.testing.assert_close(plain.transform(tall), own(tall))
    assert clip.preprocess_id != plain.preprocess_id


def test_backend_errors() -> None:
    with pytest.raises(ValueError, match="unknown"):
        load_clip("NoSuchArch-99", backend="open_clip")
    with pytest.raises(ValueError, match="only for backend open_clip"):
        load_clip("openai/clip-vit-base-patch32", pretrained="openai")


@pytest.mark.slow
def test_rn50x4_architecture_has_the_papers_dimensions() -> None:
    """CLIP4Cir's backbone builds through open_clip (random weights here): d = 640, 288 px, 640-wide tokens."""
    clip = load_clip("RN50x4", backend="open_clip", pretrained=None)
    assert (clip.feature_dim, clip.token_width, clip.context_length) == (640, 640, 77)
    pixels = clip.transform(Image.new("RGB", (100, 300)))
    assert pixels.shape == (3, 288, 288)
    assert clip.placeholder_id("$") == 259 and clip.placeholder_id("*") == 265  # CLIP BPE ids, looked up
