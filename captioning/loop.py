"""The captioning dialogue (ChatCaptioner adapted to one clothing item), run on a batch of items at once.

Round 0 asks the VLM to describe the item. Each of the ``rounds`` following rounds asks the LLM, which knows
only the item's category (a model's prediction by default, see :mod:`captioning.runner`) and the dialogue so far, for one new informative non-yes/no question, and the VLM
answers it while seeing the item (a crop with context margin, or the full image with the box drawn) and the
previous turns. The LLM finally summarises the informative answers into a caption of a few sentences.

Per round there is ONE batched ``ask``/``answer`` call for all still-active items of the batch, so a local
model runs one padded ``generate`` and a server backend sends the batch's requests concurrently. Questions
that repeat an earlier one (or are yes/no questions) are re-asked with a note, at most ``max_reasks`` times;
an item whose questioner keeps repeating itself (or returns nothing) stops asking early. Answers are cut at a
run-on "Question:" as ChatCaptioner does. Any failed request fails only its own item, with a reason naming the
step, and the item is dropped from later calls of the batch.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from PIL import Image, ImageDraw

from capret.config import cfg
from capret.errors import ConfigError
from captioning.backends.base import CaptionBackend
from captioning.prompts import PromptSet
from captioning.text import is_uninformative
from captioning.types import QA, ChatRequest, Generation, ItemContext, VisualQuery

__all__ = [
    "CaptionResult",
    "CaptionTask",
    "LoopConfig",
    "caption_batch",
    "clean_question",
    "is_repeat",
    "is_uninformative",
    "is_yes_no",
    "prepare_view",
    "trim_answer",
]


@dataclass
class LoopConfig:
    """Options of the dialogue."""

    rounds: int = cfg(8, "question/answer rounds after the initial description (ChatCaptioner uses 10)")
    view: Literal["crop", "box"] = cfg("crop", "what the VLM sees: crop with context margin, or box drawn")
    context_margin: float = cfg(0.15, "crop view: margin added around the box, as a fraction of its size")
    max_question_tokens: int = cfg(48, "token limit of each LLM question")
    max_answer_tokens: int = cfg(64, "token limit of each VLM answer")
    max_summary_tokens: int = cfg(160, "token limit of the LLM summary (the caption)")
    max_reasks: int = cfg(2, "re-asks of a repeated or yes/no question before giving up on it")

    def __post_init__(self) -> None:
        if self.rounds < 0:
            raise ConfigError(f"rounds must be >= 0, got {self.rounds}")
        if self.context_margin < 0:
            raise ConfigError(f"context_margin must be >= 0, got {self.context_margin}")
        for name in ("max_question_tokens", "max_answer_tokens", "max_summary_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_reasks < 0:
            raise ConfigError(f"max_reasks must be >= 0, got {self.max_reasks}")


@dataclass
class CaptionTask:
    """One item to caption: its full image, its box in that image, and a category name for the prompts.

    ``category`` is a prediction by default; ``category_id`` and ``attributes`` are set only by the explicit
    oracle (:func:`captioning.runner.make_task`).
    """

    key: str
    image: Image.Image
    bbox: tuple[float, float, float, float] | None = None  # x1, y1, x2, y2 pixels; None = whole image
    category: str = ""
    category_id: int | None = None
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass
class CaptionResult:
    """The outcome for one item: a caption and its dialogue, or an error naming the failed step."""

    key: str
    caption: str = ""
    dialogue: list[QA] = field(default_factory=list)
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None


# --- text rules -----------------------------------------------------------------------------------------

_RUN_ON = re.compile(r"\b(question|q)\s*:", re.IGNORECASE)
_LEADING_LABEL = re.compile(r"^\s*(answer|a|question|q|next question|description|summary)\s*:\s*", re.I)
_YES_NO_START = re.compile(
    r"^(is|are|was|were|does|do|did|has|have|had|can|could|will|would|should|shall|may|might|must)\b", re.I
)


def trim_answer(text: str) -> str:
    """Strip a leading "Answer:" and cut run-on text at the next "Question:" (ChatCaptioner)."""
    text = _LEADING_LABEL.sub("", text.strip())
    match = _RUN_ON.search(text)
    if match:
        text = text[: match.start()]
    return " ".join(text.split())


def clean_question(text: str) -> str:
    """The first question of an LLM reply: label stripped, cut at a run-on "Answer:", one line."""
    text = _LEADING_LABEL.sub("", text.strip())
    cut = re.search(r"\b(answer|a)\s*:", text, re.IGNORECASE)
    if cut:
        text = text[: cut.start()]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return ""
    line = lines[0]
    if "?" in line:
        line = line[: line.index("?") + 1]
    return " ".join(line.split())


def _normalise(question: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9 ]", " ", question.lower()).split())


def is_repeat(question: str, asked: Sequence[str], *, threshold: float = 0.8) -> bool:
    """Whether ``question`` repeats one of ``asked``: same words up to case/punctuation, or word-set Jaccard
    similarity at or above ``threshold`` (catches "What colour is it?" vs "What colour is it then?")."""
    words = set(_normalise(question).split())
    if not words:
        return False
    for other in asked:
        other_words = set(_normalise(other).split())
        if not other_words:
            continue
        if _normalise(question) == _normalise(other):
            return True
        if len(words & other_words) / len(words | other_words) >= threshold:
            return True
    return False


def is_yes_no(question: str) -> bool:
    """Questions opening with an auxiliary verb ("Is it red?") invite yes/no, unless they offer a choice."""
    text = question.strip()
    return bool(_YES_NO_START.match(text)) and " or " not in f" {text.lower()} "


# --- views ----------------------------------------------------------------------------------------------


def prepare_view(
    image: Image.Image,
    bbox: tuple[float, float, float, float] | None,
    *,
    view: str,
    margin: float,
) -> tuple[Image.Image, tuple[float, float, float, float]]:
    """The image the VLM sees and the item's box in its coordinates.

    ``crop`` keeps ``margin`` x box size of context on every side (clipped to the image), because a tight crop
    loses cues such as neckline and how the garment is worn; ``box`` shows the whole scene with the box drawn,
    for VLMs that handle full scenes better than small crops.
    """
    image = image.convert("RGB")
    width, height = image.size
    if bbox is None:
        return image, (0.0, 0.0, float(width), float(height))
    x1, y1, x2, y2 = (float(v) for v in bbox)
    x1, y1 = min(max(x1, 0.0), width - 1.0), min(max(y1, 0.0), height - 1.0)
    x2, y2 = min(max(x2, x1 + 1.0), float(width)), min(max(y2, y1 + 1.0), float(height))
    if view == "crop":
        mx, my = margin * (x2 - x1), margin * (y2 - y1)
        cx1, cy1 = int(max(0.0, x1 - mx)), int(max(0.0, y1 - my))
        cx2, cy2 = int(min(float(width), x2 + mx + 0.999)), int(min(float(height), y2 + my + 0.999))
        return image.crop((cx1, cy1, cx2, cy2)), (x1 - cx1, y1 - cy1, x2 - cx1, y2 - cy1)
    if view == "box":
        drawn = image.copy()
        line = max(2, min(width, height) // 150)
        ImageDraw.Draw(drawn).rectangle((x1, y1, x2, y2), outline=(255, 0, 0), width=line)
        return drawn, (x1, y1, x2, y2)
    raise ConfigError(f"unknown view {view!r}; valid views: crop, box")


# --- the loop -------------------------------------------------------------------------------------------


@dataclass
class _State:
    result: CaptionResult
    view: Image.Image
    context: ItemContext
    asking: bool = True  # False once the questioner has run out of new questions

    def charge(self, generation: Generation) -> None:
        self.result.prompt_tokens += generation.prompt_tokens
        self.result.completion_tokens += generation.completion_tokens

    def fail(self, step: str, generation: Generation) -> None:
        self.result.error = f"{step}: {generation.error}"


def _answer_round(
    states: list[_State],
    questions: list[str],
    *,
    backend: CaptionBackend,
    prompts: PromptSet,
    config: LoopConfig,
) -> None:
    queries = [
        VisualQuery(
            image=s.view,
            question=q,
            messages=prompts.answer_messages(q, s.result.dialogue),
            context=s.context,
            history=tuple(s.result.dialogue),
        )
        for s, q in zip(states, questions)
    ]
    replies = backend.answer(queries, max_tokens=config.max_answer_tokens)
    _check_count("answer", replies, queries)
    for s, q, reply in zip(states, questions, replies):
        s.charge(reply)
        if not reply.ok:
            s.fail(f"VLM answer (round {len(s.result.dialogue)})", reply)
            continue
        s.result.dialogue.append(QA(q=q, a=trim_answer(reply.text)))


def _question_round(
    states: list[_State], *, backend: CaptionBackend, prompts: PromptSet, config: LoopConfig
) -> list[str]:
    """New questions for ``states`` (same order); "" marks an item whose questioner ran out."""
    questions = [""] * len(states)
    notes: list[list[str]] = [[] for _ in states]
    pending = list(range(len(states)))
    for attempt in range(config.max_reasks + 1):
        requests = [
            ChatRequest(
                messages=prompts.question_messages(
                    states[i].context.category, states[i].result.dialogue, reask_notes=notes[i]
                ),
                kind="question",
                context=states[i].context,
                dialogue=tuple(states[i].result.dialogue),
            )
            for i in pending
        ]
        replies = backend.ask(requests, max_tokens=config.max_question_tokens)
        _check_count("ask", replies, requests)
        still = []
        for i, reply in zip(pending, replies):
            s = states[i]
            s.charge(reply)
            if not reply.ok:
                s.fail(f"LLM question (round {len(s.result.dialogue)})", reply)
                continue
            question = clean_question(reply.text)
            asked = [qa.q for qa in s.result.dialogue]
            last_try = attempt == config.max_reasks
            if not question or is_repeat(question, asked):
                if question and not last_try:
                    notes[i].append(prompts.reask_repeat.format(question=question))
                    still.append(i)
                continue  # empty, or still repeating after the re-asks: this item stops asking
            if is_yes_no(question) and not last_try:
                notes[i].append(prompts.reask_yes_no.format(question=question))
                questions[i] = question  # kept if the re-ask fails to improve
                still.append(i)
                continue
            questions[i] = question
        pending = still
        if not pending:
            break
    return questions


def _check_count(call: str, replies: Sequence[Generation], requests: Sequence[Any]) -> None:
    if len(replies) != len(requests):
        raise RuntimeError(f"backend {call}() returned {len(replies)} replies for {len(requests)} requests")


def caption_batch(
    tasks: Sequence[CaptionTask],
    *,
    backend: CaptionBackend,
    prompts: PromptSet,
    config: LoopConfig,
) -> list[CaptionResult]:
    """Run the dialogue for every task of the batch; one result per task, in order."""
    states = []
    for task in tasks:
        view, box = prepare_view(task.image, task.bbox, view=config.view, margin=config.context_margin)
        context = ItemContext(
            key=task.key,
            category=task.category,
            category_id=task.category_id,
            attributes=dict(task.attributes),
            bbox_in_view=box,
            image_size=task.image.size,
            bbox_in_image=task.bbox,
        )
        states.append(_State(result=CaptionResult(key=task.key), view=view, context=context))

    def active() -> list[_State]:
        return [s for s in states if s.result.ok and s.asking]

    batch = active()
    if batch:
        _answer_round(
            batch, [prompts.first_question] * len(batch), backend=backend, prompts=prompts, config=config
        )
    for _ in range(config.rounds):
        batch = active()
        if not batch:
            break
        questions = _question_round(batch, backend=backend, prompts=prompts, config=config)
        for s, q in zip(batch, questions):
            if s.result.ok and not q:
                s.asking = False
        asking = [(s, q) for s, q in zip(batch, questions) if s.result.ok and q]
        if asking:
            _answer_round(
                [s for s, _ in asking],
                [q for _, q in asking],
                backend=backend,
                prompts=prompts,
                config=config,
            )

    finishing = [s for s in states if s.result.ok]
    if finishing:
        requests = []
        for s in finishing:
            informative = tuple(qa for qa in s.result.dialogue if not is_uninformative(qa.a))
            requests.append(
                ChatRequest(
                    messages=prompts.summary_messages(s.context.category, informative),
                    kind="summary",
                    context=s.context,
                    dialogue=informative,
                )
            )
        replies = backend.ask(requests, max_tokens=config.max_summary_tokens)
        _check_count("ask", replies, requests)
        for s, reply in zip(finishing, replies):
            s.charge(reply)
            if not reply.ok:
                s.fail("LLM summary", reply)
                continue
            caption = trim_answer(reply.text)
            if not caption:
                s.result.error = "LLM summary: empty caption"
                continue
            s.result.caption = caption
    return [s.result for s in states]
