"""The dialogue loop: text rules, views, batching (one call per round), re-asks, failure isolation, template."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
from PIL import Image

from captioning.backends import CaptionBackend, create_backend, list_backends
from captioning.colors import dominant_colours
from captioning.loop import (
    CaptionTask,
    LoopConfig,
    caption_batch,
    clean_question,
    is_repeat,
    is_uninformative,
    is_yes_no,
    prepare_view,
    trim_answer,
)
from captioning.prompts import PROMPT_SETS, get_prompt_set, load_prompt_set
from captioning.types import ChatRequest, Generation, VisualQuery

PROMPTS = get_prompt_set("capret-chat-v1")


def test_trim_answer_cuts_run_on_question() -> None:
    assert trim_answer("Answer: It is red.\nQuestion: what else? Answer: blue") == "It is red."
    assert trim_answer("  blue   cotton  ") == "blue cotton"
    assert trim_answer("It is red. question: more") == "It is red."


def test_clean_question_takes_the_first_question() -> None:
    assert clean_question("Question: What colour is it? Answer: red") == "What colour is it?"
    assert clean_question("\n\nWhat fabric?\nWhat else?") == "What fabric?"
    assert clean_question("Next question: What is the neckline like? And the sleeves?") == (
        "What is the neckline like?"
    )
    assert clean_question("   ") == ""


def test_repeat_and_yes_no_detection() -> None:
    asked = ["What colour is the shirt?", "What is the material?"]
    assert is_repeat("what COLOUR is the shirt", asked)
    assert is_repeat("What is the material made?", ["What is the material made of?"])  # Jaccard 5/6
    assert not is_repeat("What pattern does the shirt have?", asked)
    assert is_yes_no("Is it red?") and is_yes_no("does it have buttons?")
    assert not is_yes_no("Is it red or blue?")
    assert not is_yes_no("What colour is it?")


def test_uninformative_answers() -> None:
    for text in ["Not sure.", "I don't know", "unknown", "", "  ", "N/A", "Cannot tell."]:
        assert is_uninformative(text), text
    for text in ["Red.", "It is not a shirt.", "Nothing printed, plain"]:
        assert not is_uninformative(text), text


def test_prepare_view_crop_and_box() -> None:
    image = Image.new("RGB", (100, 80), (0, 0, 0))
    view, box = prepare_view(image, (20, 10, 60, 50), view="crop", margin=0.25)
    assert view.size == (60, 60)  # 40x40 box + 10 px each side
    assert box == (10.0, 10.0, 50.0, 50.0)
    view, box = prepare_view(image, (90, 70, 130, 120), view="crop", margin=0.5)  # clipped to the image
    assert view.size[0] > 0 and view.size[1] > 0 and box[0] >= 0
    drawn, box = prepare_view(image, (20, 10, 60, 50), view="box", margin=0.0)
    assert drawn.size == image.size and box == (20.0, 10.0, 60.0, 50.0)
    assert drawn.getpixel((20, 30)) == (255, 0, 0) and image.getpixel((20, 30)) == (0, 0, 0)
    with pytest.raises(ValueError, match="valid views: crop, box"):
        prepare_view(image, (0, 0, 5, 5), view="zoom", margin=0.0)


class ScriptedBackend(CaptionBackend):
    """Questions come from a per-key script; records every batched call."""

    name = "scripted"

    def __init__(self, questions: dict[str, list[str]], *, fail: dict[str, str] | None = None) -> None:
        self.questions = {k: list(v) for k, v in questions.items()}
        self.fail = fail or {}
        self.calls: list[tuple[str, int]] = []
        self.summary_dialogues: dict[str, list[tuple[str, str]]] = {}

    def describe(self) -> dict[str, Any]:
        return {"name": "scripted"}

    def ask(self, requests: Sequence[ChatRequest], *, max_tokens: int) -> list[Generation]:
        self.calls.append(("ask", len(requests)))
        out = []
        for r in requests:
            key = r.context.key
            if r.kind == "summary":
                self.summary_dialogues[key] = [(qa.q, qa.a) for qa in r.dialogue]
                out.append(Generation(text=f"Summary: caption of {key}. Question: junk", prompt_tokens=3))
            elif self.fail.get(key) == "ask":
                out.append(Generation(text="", error="HTTP 500 boom"))
            else:
                script = self.questions[key]
                out.append(
                    Generation(text=script.pop(0) if script else "", prompt_tokens=1, completion_tokens=2)
                )
        return out

    def answer(self, queries: Sequence[VisualQuery], *, max_tokens: int) -> list[Generation]:
        self.calls.append(("answer", len(queries)))
        out = []
        for q in queries:
            if self.fail.get(q.context.key) == "answer":
                out.append(Generation(text="", error="timeout"))
            elif "material" in q.question:
                out.append(Generation(text="Not sure."))
            else:
                out.append(
                    Generation(text=f"Answer: reply to {q.question} Question: run-on", completion_tokens=1)
                )
        return out


def _tasks(keys: Sequence[str]) -> list[CaptionTask]:
    return [
        CaptionTask(key=k, image=Image.new("RGB", (40, 30), (200, 0, 0)), bbox=(5, 5, 30, 25)) for k in keys
    ]


def test_one_backend_call_per_round_serves_the_batch() -> None:
    questions = {k: ["What colour?", "What material?", "What pattern?"] for k in "abcd"}
    backend = ScriptedBackend(questions)
    results = caption_batch(_tasks("abcd"), backend=backend, prompts=PROMPTS, config=LoopConfig(rounds=3))
    assert [r.key for r in results] == list("abcd")
    assert all(r.ok for r in results)
    # describe, then 3 x (ask, answer), then summary: every call carries the whole batch of 4
    assert backend.calls == [("answer", 4)] + [("ask", 4), ("answer", 4)] * 3 + [("ask", 4)]
    first = results[0]
    assert [qa.q for qa in first.dialogue] == [
        PROMPTS.first_question,
        "What colour?",
        "What material?",
        "What pattern?",
    ]
    assert first.dialogue[1].a == "reply to What colour?"  # label stripped, run-on cut
    assert first.caption == "caption of a."
    # the "not sure" answer is kept in the dialogue but not shown to the summariser
    assert ("What material?", "Not sure.") not in backend.summary_dialogues["a"]
    assert len(backend.summary_dialogues["a"]) == 3
    assert first.prompt_tokens == 3 * 1 + 3 and first.completion_tokens == 3 * 2 + 3  # "Not sure." costs 0


def test_repeated_and_yes_no_questions_are_reasked() -> None:
    questions = {
        "a": ["What colour?", "what colour", "Is it long?", "How long is it?"],
        "b": ["What fabric?", "What fabric?", "What fabric?", "What fabric?"],
    }
    backend = ScriptedBackend(questions)
    results = caption_batch(
        _tasks("ab"), backend=backend, prompts=PROMPTS, config=LoopConfig(rounds=3, max_reasks=2)
    )
    a, b = results
    assert [qa.q for qa in a.dialogue[1:]] == ["What colour?", "How long is it?"]
    # b asked a new question once, then kept repeating itself through all re-asks: it stops asking
    assert [qa.q for qa in b.dialogue[1:]] == ["What fabric?"]
    assert a.ok and b.ok


def test_a_failed_request_fails_only_its_item() -> None:
    questions = {k: ["What colour?", "What pattern?"] for k in "abc"}
    backend = ScriptedBackend(questions, fail={"b": "answer", "c": "ask"})
    a, b, c = caption_batch(_tasks("abc"), backend=backend, prompts=PROMPTS, config=LoopConfig(rounds=2))
    assert a.ok and a.caption
    assert b.error == "VLM answer (round 0): timeout" and not b.caption
    assert c.error == "LLM question (round 1): HTTP 500 boom"
    assert backend.calls[-1] == ("ask", 1)  # only the surviving item is summarised


def test_loop_config_validation() -> None:
    with pytest.raises(ValueError, match="rounds must be >= 0"):
        LoopConfig(rounds=-1)
    with pytest.raises(ValueError, match="max_answer_tokens"):
        LoopConfig(max_answer_tokens=0)


def test_registry_lists_builtins_and_rejects_unknown() -> None:
    assert {"template", "transformers", "openai"} <= set(list_backends())
    with pytest.raises(KeyError, match="valid names: .*openai.*template"):
        create_backend("nosuch")


def test_dominant_colours_of_solid_and_two_tone_images() -> None:
    assert dominant_colours(Image.new("RGB", (20, 20), (210, 25, 30))) == ["red"]
    two = Image.new("RGB", (20, 20), (250, 250, 250))
    two.paste((30, 40, 200), (0, 0, 20, 8))
    assert dominant_colours(two) == ["white", "blue"]


def test_template_backend_dialogue_from_pixels_and_box() -> None:
    image = Image.new("RGB", (100, 100), (245, 245, 245))
    image.paste((200, 30, 35), (30, 20, 60, 80))  # a plain red item, twice as tall as wide, 18% of the photo
    task = CaptionTask(
        key="deepfashion2/000001/1", image=image, bbox=(30, 20, 60, 80), category="short sleeve top"
    )
    with create_backend("template") as backend:
        (result,) = caption_batch([task], backend=backend, prompts=PROMPTS, config=LoopConfig(rounds=8))
        again = caption_batch([task], backend=backend, prompts=PROMPTS, config=LoopConfig(rounds=8))[0]
    assert result.ok and result.caption == again.caption  # deterministic
    answers = {qa.q: qa.a for qa in result.dialogue}
    assert answers[PROMPTS.first_question] == "A red short sleeve top."
    assert (
        answers["What pattern or print does the short sleeve top have?"]
        == "It looks plain, in a single colour."
    )
    assert answers["What material does the short sleeve top seem to be made of?"] == "Not sure."
    assert (
        answers["What kind of sleeves does the short sleeve top have?"] == "It has short sleeves."
    )  # from the name
    assert answers["What shape and length does the short sleeve top have?"] == (
        "It is long and narrow, much taller than wide."
    )
    assert answers["How large does the short sleeve top appear in the photo?"] == (
        "It takes up a moderate part of the photo."
    )
    assert "mainly white" in answers["What does the background around the short sleeve top look like?"]
    # without oracle attributes the dialogue never asks what only the annotation knows
    assert not any("seen" in q or "hidden" in q for q in answers)
    assert result.caption.startswith("A red short sleeve top.")
    assert "It has short sleeves." in result.caption and "taller than wide" in result.caption
    assert "Not sure" not in result.caption  # unsure answers are ignored by the summary
    # fewer rounds: fewer questions, same first sentence
    short = caption_batch(
        [task], backend=create_backend("template"), prompts=PROMPTS, config=LoopConfig(rounds=2)
    )
    assert len(short[0].dialogue) == 3


def test_template_backend_measures_texture_and_names_no_category_it_was_not_given() -> None:
    stripes = Image.new("RGB", (80, 80), (245, 245, 245))
    for x in range(10, 70, 8):
        stripes.paste((25, 35, 85), (x, 10, x + 4, 70))  # vertical navy stripes on white
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 80, 3), dtype=np.uint8))
    tasks = [CaptionTask(key="a/1/1", image=stripes, bbox=(10, 10, 70, 70)),
             CaptionTask(key="a/2/1", image=noise, bbox=(0, 0, 80, 80))]  # fmt: skip
    striped, noisy = caption_batch(
        tasks, backend=create_backend("template"), prompts=PROMPTS, config=LoopConfig()
    )
    pattern_q = "What pattern or print does the clothing item have?"
    assert dict((qa.q, qa.a) for qa in striped.dialogue)[pattern_q] == "It has a striped or linear pattern."
    assert (
        dict((qa.q, qa.a) for qa in noisy.dialogue)[pattern_q]
        == "It has a busy, fine-grained print or texture."
    )
    for result in (striped, noisy):
        assert "clothing item" in result.caption and "sleeve" not in result.caption
        assert not any("sleeves" in qa.q for qa in result.dialogue)  # no category, no sleeve question


def test_template_backend_oracle_attributes_are_used_only_when_given() -> None:
    image = Image.new("RGB", (100, 100), (245, 245, 245))
    image.paste((200, 30, 35), (30, 30, 70, 70))
    oracle = CaptionTask(
        key="k/1/1",
        image=image,
        bbox=(30, 30, 70, 70),
        category="short sleeve top",
        category_id=1,
        attributes={"viewpoint": 2, "occlusion": 1, "scale": 3, "zoom_in": 2},
    )
    (result,) = caption_batch(
        [oracle], backend=create_backend("template"), prompts=PROMPTS, config=LoopConfig()
    )
    assert "seen from the front" in result.caption and "Almost all of it is visible." in result.caption
    assert "It fills most of the photo. The photo is zoomed in" in result.caption  # the annotated scale/zoom


def test_prompt_sets_are_versioned_and_loadable(tmp_path) -> None:
    assert "capret-chat-v1" in PROMPT_SETS
    with pytest.raises(KeyError, match="valid versions: capret-chat-v1"):
        get_prompt_set("v0")
    fields = {k: v for k, v in vars(PROMPTS).items()}
    fields["version"] = "my-prompts-1"
    fields["first_question"] = "Describe the garment."
    import yaml

    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(fields))
    loaded = load_prompt_set(path)
    assert loaded.version == "my-prompts-1" and loaded.first_question == "Describe the garment."
    fields["version"] = "capret-chat-v1"
    path.write_text(yaml.safe_dump(fields))
    with pytest.raises(ValueError, match="own version name"):
        load_prompt_set(path)
    path.write_text(yaml.safe_dump({"version": "x", "colour": "y"}))
    with pytest.raises(ValueError, match="unknown field 'colour'"):
        load_prompt_set(path)
