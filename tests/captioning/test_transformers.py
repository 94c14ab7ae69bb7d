"""The transformers backend on tiny randomly initialised LLaVA and Llama models, loaded with from_pretrained."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tiny_vlm import (  # noqa: E402
    build_tiny_blip2,
    build_tiny_blip2_t5,
    build_tiny_instructblip_t5,
    build_tiny_llama,
    build_tiny_llava,
)

from captioning.backends import create_backend  # noqa: E402
from captioning.loop import CaptionTask, LoopConfig, caption_batch  # noqa: E402
from captioning.prompts import get_prompt_set  # noqa: E402
from captioning.types import QA, ChatRequest, ItemContext, VisualQuery  # noqa: E402

PROMPTS = get_prompt_set("capret-chat-v1")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("tiny")
    return build_tiny_llava(base / "llava"), build_tiny_llama(base / "llama")


@pytest.fixture(scope="module")
def backend(models: tuple[Path, Path]):
    llava, llama = models
    with create_backend("transformers", vlm=str(llava), llm=str(llama), device="cpu", dtype="float32") as b:
        yield b


def _queries() -> list[VisualQuery]:
    histories = [
        (),
        (QA("What colour is it?", "blue"),),
        (QA("What colour?", "red"), QA("What fabric?", "cotton")),
    ]
    out = []
    for i, history in enumerate(histories):
        image = Image.new("RGB", (40 + 10 * i, 30), (50 * i, 100, 200))
        question = "What pattern does it have?"
        out.append(
            VisualQuery(
                image=image,
                question=question,
                messages=PROMPTS.answer_messages(question, history),
                context=ItemContext(key=f"k{i}"),
                history=history,
            )
        )
    return out


def test_batched_answers_equal_one_by_one_answers(backend) -> None:
    """Left padding must not change greedy outputs: a batch of different-length prompts gives exactly what
    each prompt gives alone (the slow, obviously correct reference)."""
    queries = _queries()
    batched = backend.answer(queries, max_tokens=6)
    single = [backend.answer([q], max_tokens=6)[0] for q in queries]
    assert [g.text for g in batched] == [g.text for g in single]
    assert [g.prompt_tokens for g in batched] == [g.prompt_tokens for g in single]
    assert batched[0].prompt_tokens < batched[2].prompt_tokens  # longer history, longer prompt
    assert all(g.ok and 0 < g.completion_tokens <= 6 for g in batched)


def test_batched_questions_equal_one_by_one(backend) -> None:
    dialogues = [
        (QA("Describe it.", "a skirt"),),
        (QA("Describe it.", "a long red dress with buttons"), QA("a", "b")),
    ]
    requests = [
        ChatRequest(
            messages=PROMPTS.question_messages("skirt", d),
            kind="question",
            context=ItemContext(key=str(i)),
            dialogue=d,
        )
        for i, d in enumerate(dialogues)
    ]
    batched = backend.ask(requests, max_tokens=5)
    single = [backend.ask([r], max_tokens=5)[0] for r in requests]
    assert [g.text for g in batched] == [g.text for g in single]
    assert backend.ask([], max_tokens=5) == [] and backend.answer([], max_tokens=5) == []


def test_full_dialogue_with_local_models(backend, models) -> None:
    tasks = [
        CaptionTask(
            key=f"d/{i}/1",
            image=Image.new("RGB", (64, 48), (200, 20 * i, 20)),
            bbox=(8, 8, 40, 40),
            category="skirt",
        )
        for i in range(3)
    ]
    config = LoopConfig(
        rounds=2, max_question_tokens=6, max_answer_tokens=6, max_summary_tokens=8, max_reasks=0
    )
    results = caption_batch(tasks, backend=backend, prompts=PROMPTS, config=config)
    for result in results:
        # random weights produce gibberish, possibly empty; the loop still runs every step with real models
        assert result.ok or result.error == "LLM summary: empty caption"
        assert result.dialogue[0].q == PROMPTS.first_question
        assert result.prompt_tokens > 0 and result.completion_tokens > 0
    llava, llama = models
    assert backend.describe() == {
        "vlm": str(llava),
        "llm": str(llama),
        "dtype": "float32",
        "do_sample": False,
        "temperature": None,
    }


def test_vlm_asks_its_own_questions_without_llm(models) -> None:
    llava, _ = models
    with create_backend("transformers", vlm=str(llava)) as backend:
        request = ChatRequest(
            messages=PROMPTS.question_messages("skirt", ()), kind="question", context=ItemContext(key="k")
        )
        (reply,) = backend.ask([request], max_tokens=4)
        assert reply.ok and reply.prompt_tokens > 0
        assert backend.describe()["llm"] == str(llava)


def test_bad_options_fail_clearly(models) -> None:
    llava, _ = models
    with pytest.raises(ValueError, match="unknown --dtype 'float8'"):
        create_backend("transformers", vlm=str(llava), dtype="float8")
    with pytest.raises(ValueError, match="needs --vlm"):
        create_backend("transformers", vlm="")


def test_blip2_without_chat_template_uses_plain_prompts(models, tmp_path) -> None:
    """BLIP-2 (no chat template): "Question: ... Answer:" prompts, batched equal to one by one; it cannot ask
    its own questions, so --llm is required."""
    _, llama = models
    blip2 = build_tiny_blip2(tmp_path / "blip2")
    with pytest.raises(ValueError, match="no chat template, so it cannot also ask the questions; pass --llm"):
        create_backend("transformers", vlm=str(blip2))
    with create_backend("transformers", vlm=str(blip2), llm=str(llama)) as backend:
        queries = _queries()
        batched = backend.answer(queries, max_tokens=5)
        assert [g.text for g in batched] == [backend.answer([q], max_tokens=5)[0].text for q in queries]
        assert all(g.ok and g.prompt_tokens > 0 for g in batched)
        task = CaptionTask(key="k", image=Image.new("RGB", (40, 40), (9, 9, 9)), category="skirt")
        config = LoopConfig(
            rounds=1, max_question_tokens=4, max_answer_tokens=4, max_summary_tokens=4, max_reasks=0
        )
        (result,) = caption_batch([task], backend=backend, prompts=PROMPTS, config=config)
        assert result.dialogue and result.completion_tokens > 0


@pytest.mark.parametrize(
    "builder",
    [build_tiny_blip2_t5, build_tiny_instructblip_t5],
    ids=["blip2-flan-t5", "instructblip-flan-t5"],
)
def test_encoder_decoder_vlms_keep_every_generated_token(models, tmp_path, builder) -> None:
    """BLIP-2 / InstructBLIP with a Flan-T5 language model: ``generate`` returns decoder tokens only, so none
    may be cut as if the prompt came first (the prompt is longer than the whole answer here)."""
    import torch

    from captioning.backends.transformers_backend import _plain_prompt

    _, llama = models
    vlm = builder(tmp_path / "vlm")
    with create_backend("transformers", vlm=str(vlm), llm=str(llama)) as backend:
        queries = _queries()
        answers = backend.answer(queries, max_tokens=7)
        inputs = backend.processor(
            images=[q.image for q in queries],
            text=[_plain_prompt(q.messages) for q in queries],
            padding=True,
            return_tensors="pt",
        )
        assert inputs["input_ids"].shape[1] > 8  # cutting the prompt length would have left nothing
        with torch.inference_mode():
            output = backend.vlm.generate(**inputs, max_new_tokens=7, do_sample=False)
        expected = [
            backend.processor.tokenizer.decode(row, skip_special_tokens=True).strip() for row in output
        ]
    assert [a.text for a in answers] == expected
    assert all(a.ok and a.text for a in answers)
    assert [a.completion_tokens for a in answers] == [7] * len(
        queries
    )  # the decoder start token is not counted
