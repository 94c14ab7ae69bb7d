"""The ``clip`` caption backend: zero-shot attribute choice against a slow reference, registered lazily in the
caption-backend registry, and a function of pixels and box only (annotation fields and oracle context change
nothing)."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from capret.data.garments.vocab import BOTTOMS, CATEGORIES, COLOURS, DETAILS, PATTERNS, describe
from capret.inference.query.captioner import Captioner, CaptionerSettings
from capret.inference.query.clip_captioner import (
    ATTRIBUTE_ORDER,
    ClipAttributeDescriber,
    ClipCaptionBackend,
    attribute_candidates,
)
from capret.models.clip_arch import (
    ClipArchConfig,
    TextTowerConfig,
    VisionTowerConfig,
    build_open_clip,
    load_clip_folder,
    write_clip_folder,
)
from captioning.backends import create_backend, list_backends
from captioning.loop import CaptionTask, LoopConfig, caption_batch, prepare_view
from captioning.prompts import get_prompt_set
from captioning.runner import caption_targets
from captioning.sources import CaptionTarget, open_rgb
from captioning.store import CaptionStore

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ClipArchConfig(
    embed_dim=16,
    vision=VisionTowerConfig(image_size=32, width=32, layers=1, head_width=16, patch_size=8),
    text=TextTowerConfig(context_length=24, width=32, heads=2, layers=1),
)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("clip") / "model"
    return write_clip_folder(folder, model=build_open_clip(TINY, seed=5), arch=TINY, sidecar={})


def _photos(n: int = 8) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        image = Image.new("RGB", (96, 80), tuple(int(v) for v in rng.integers(0, 255, 3)))
        draw = ImageDraw.Draw(image)
        colour = tuple(int(v) for v in rng.integers(0, 255, 3))
        if i % 2:
            draw.rectangle((20, 10, 70, 70), fill=colour)
        else:
            for y in range(10, 70, 6):
                draw.rectangle((20, y, 70, y + 2), fill=colour)
        out.append(image)
    return out


BOXES = [(15.0, 5.0, 75.0, 75.0)] * 8


def test_candidates_cover_the_vocabulary() -> None:
    top, bottom = "short sleeve top", BOTTOMS[0]
    assert [c["colour"] for c in attribute_candidates("colour", top)] == list(COLOURS)
    patterns = attribute_candidates("pattern", top)
    assert len(patterns) == 1 + (len(PATTERNS) - 1) * len(COLOURS)
    assert attribute_candidates("neckline", bottom) == []
    assert len(attribute_candidates("details", top)) == 2 ** len(DETAILS)
    for attribute in ATTRIBUTE_ORDER:
        for candidate in attribute_candidates(attribute, top):
            assert candidate["category"] == top
            describe(candidate)  # every candidate is a valid attribute dict
    with pytest.raises(ValueError, match="unknown attribute"):
        attribute_candidates("fit", top)


def test_predictions_match_a_slow_reference(clip_folder: Path) -> None:
    """Each choice is the argmax of cosine(image, describe(candidate)), embedding one prompt at a time."""
    describer = ClipAttributeDescriber.from_folder(clip_folder)
    photos = _photos(2)
    got = describer.predict(photos, BOXES[:2])
    clip = load_clip_folder(clip_folder)
    with torch.no_grad():
        for photo, box, predicted in zip(photos, BOXES, got):
            image = clip.encode_image(clip.transform(photo.crop(tuple(int(v) for v in box)))[None])[0]

            def best(options: list[dict], image: torch.Tensor = image) -> dict:
                scores = [float(image @ clip.encode_text([describe(o)])[0]) for o in options]
                return options[int(np.argmax(scores))]

            want = dict(best([{"category": c} for c in CATEGORIES]))
            for attribute in ATTRIBUTE_ORDER:
                options = attribute_candidates(attribute, want["category"])
                if options:
                    want.update(best(options))
            assert predicted == want
    assert describer.caption(photos, BOXES[:2]) == [describe(p) for p in got]


def test_backend_is_registered_lazily_and_describes_its_model(clip_folder: Path) -> None:
    assert "clip" in list_backends()
    backend = create_backend("clip", model=str(clip_folder))
    assert isinstance(backend, ClipCaptionBackend)
    info = backend.describe()
    assert info["model"] == str(clip_folder) and info["attributes"][0] == "category"
    with pytest.raises(KeyError, match="clip"):
        create_backend("clip-typo")


def test_caption_depends_on_pixels_and_box_only(clip_folder: Path) -> None:
    backend = create_backend("clip", model=str(clip_folder))
    prompts, config = get_prompt_set("capret-chat-v1"), LoopConfig(rounds=3)
    photos = _photos()
    plain = [CaptionTask(key=f"k{i}", image=p, bbox=b) for i, (p, b) in enumerate(zip(photos, BOXES))]
    told = [
        CaptionTask(key=f"k{i}", image=p, bbox=b, category=CATEGORIES[i], category_id=i + 1,
                    attributes={"viewpoint": 2, "occlusion": 3, "scale": 1, "zoom_in": 2})
        for i, (p, b) in enumerate(zip(photos, BOXES))
    ]  # fmt: skip
    first = caption_batch(plain, backend=backend, prompts=prompts, config=config)
    second = caption_batch(told, backend=backend, prompts=prompts, config=config)
    assert all(r.ok for r in first + second)
    assert [r.caption for r in first] == [r.caption for r in second]
    assert [r.dialogue for r in first] == [r.dialogue for r in second]
    assert len(first[0].dialogue) == 1  # one round: the description; no follow-up question
    assert len({r.caption for r in first}) > 1  # other pixels, other captions (seeded model: deterministic)
    whole = caption_batch(
        [CaptionTask(key="w", image=photos[0], bbox=None)], backend=backend, prompts=prompts, config=config
    )
    corner = caption_batch(
        [CaptionTask(key="w", image=photos[0], bbox=(0.0, 0.0, 30.0, 30.0))],
        backend=backend, prompts=prompts, config=config,
    )  # fmt: skip
    describer = ClipAttributeDescriber.from_folder(clip_folder)
    assert whole[0].caption == describer.caption([photos[0]], [None])[0]  # the whole photo is the view
    view, box = prepare_view(
        photos[0], (0.0, 0.0, 30.0, 30.0), view=config.view, margin=config.context_margin
    )
    assert corner[0].caption == describer.caption([view], [box])[0]  # the pixels inside the item's box


def test_annotation_edits_change_no_caption_through_the_runner(clip_folder: Path, tmp_path: Path) -> None:
    """The runner hands the annotation to the dialogue only under the oracle; the clip backend ignores it even
    then, so editing every annotation field (and switching the oracle on) leaves every record's caption as is."""
    photos = _photos(4)
    for i, photo in enumerate(photos):
        photo.save(tmp_path / f"{i}.png")

    def targets(edit: bool) -> list[CaptionTarget]:
        return [
            CaptionTarget(
                key=f"deepfashion2/{i:06d}/1", open_image=partial(open_rgb, tmp_path / f"{i}.png"), bbox=BOXES[i],
                annotation={"category_name": CATEGORIES[(i + 5 * edit) % 13], "category_id": (i + 5 * edit) % 13 + 1,
                            "viewpoint": 1 + edit, "occlusion": 1 + 2 * edit, "scale": 2, "zoom_in": 1 + edit},
            )
            for i in range(4)
        ]  # fmt: skip

    backend = create_backend("clip", model=str(clip_folder))
    captions = []
    for run, (edit, oracle) in enumerate(((False, False), (True, False), (True, True))):
        store_path = tmp_path / f"store{run}.jsonl"
        with CaptionStore(store_path) as store:
            caption_targets(targets(edit), store=store, backend=backend, prompts=get_prompt_set("capret-chat-v1"),
                            config=LoopConfig(rounds=2), progress=False, oracle=oracle)  # fmt: skip
        records = [json.loads(line) for line in store_path.read_text().splitlines() if line.strip()]
        captions.append({r["key"]: r["caption"] for r in records})
    assert captions[0] == captions[1] == captions[2]
    assert len(captions[0]) == 4


def test_query_captioner_runs_the_backend_from_settings(clip_folder: Path) -> None:
    settings = CaptionerSettings(backend="clip", options={"model": str(clip_folder)}, cache=None)
    captioner = Captioner.from_settings(settings)
    photos = _photos(2)
    out = captioner.caption(photos, BOXES[:2])
    assert all(isinstance(c, str) and c for c in out)
    assert captioner.caption(photos, BOXES[:2]) == out  # served from the cache the second time


def test_caption_cli_runs_the_clip_backend(
    clip_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from captioning.cli import main

    for i, photo in enumerate(_photos(3)):
        photo.save(tmp_path / f"{i}.png")
    store = tmp_path / "captions.jsonl"
    argv = [
        "--dataset",
        "images",
        "--root",
        str(tmp_path),
        "--out",
        str(store),
        "--backend",
        "clip",
        "--no-progress",
    ]
    assert main([*argv, "--vlm", str(clip_folder)]) == 0
    records = [json.loads(line) for line in store.read_text().splitlines() if line.strip()]
    assert len(records) == 3 and {r["backend"] for r in records} == {"clip"}
    assert all(r["caption"] for r in records) and records[0]["model"]["model"] == str(clip_folder)
    capsys.readouterr()
    assert main([*argv[:5], str(tmp_path / "other.jsonl"), *argv[6:]]) == 2
    assert "--vlm" in capsys.readouterr().err
