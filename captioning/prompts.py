"""Versioned prompt sets of the captioning dialogue (written for capret).

The dialogue follows ChatCaptioner (Zhu et al., 2023): the VLM first describes the item ("Describe this
image in detail." in the original), an LLM that cannot see the image asks one new question per round, the VLM
answers while reading the previous turns, and the LLM finally summarises. Our prompts specialise this to one
clothing item of a known category, steer questions towards attributes that identify a product (colour,
material, pattern, sleeves, neckline, length, fit, details, logo, background) and forbid yes/no questions.

A prompt set is data: its ``version`` is written into every caption record, so captions made with different
prompts are never mixed up. Custom prompt sets are loaded from YAML with :func:`load_prompt_set`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capret.config import load_yaml_file
from capret.errors import ConfigError, MissingFileError, UnknownNameError
from captioning.types import QA

__all__ = ["PROMPT_SETS", "PromptSet", "get_prompt_set", "load_prompt_set"]


@dataclass(frozen=True)
class PromptSet:
    """All texts of one version of the dialogue. ``{category}`` is replaced by the item's category name."""

    version: str
    first_question: str  # round 0, asked to the VLM
    answerer_system: str  # VLM instructions (answer honestly, say when unsure)
    questioner_system: str  # LLM instructions for asking the next question
    questioner_user: str  # "{dialogue}" is replaced by the dialogue so far
    reask_repeat: str  # "{question}" is the repeated question
    reask_yes_no: str  # "{question}" is the yes/no question
    summary_system: str
    summary_user: str  # "{dialogue}" is replaced by the informative turns
    unknown_category: str = "clothing item"  # used when the dataset has no category

    def category(self, name: str) -> str:
        return name or self.unknown_category

    # --- rendering -------------------------------------------------------------------------------------

    @staticmethod
    def render_dialogue(dialogue: Sequence[QA]) -> str:
        return "\n".join(f"Question: {qa.q}\nAnswer: {qa.a}" for qa in dialogue)

    def answer_messages(self, question: str, history: Sequence[QA]) -> list[dict[str, Any]]:
        """Messages for the VLM; the image is a ``{"type": "image"}`` part that each backend fills in."""
        text = self.render_dialogue(history)
        text = f"{text}\nQuestion: {question}\nAnswer:" if text else f"Question: {question}\nAnswer:"
        return [
            {"role": "system", "content": [{"type": "text", "text": self.answerer_system}]},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]},
        ]

    def question_messages(
        self, category: str, dialogue: Sequence[QA], *, reask_notes: Sequence[str] = ()
    ) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = [
            {"role": "system", "content": self.questioner_system.format(category=self.category(category))},
            {"role": "user", "content": self.questioner_user.format(dialogue=self.render_dialogue(dialogue))},
        ]
        for note in reask_notes:
            messages.append({"role": "user", "content": note})
        return messages

    def summary_messages(self, category: str, dialogue: Sequence[QA]) -> list[dict[str, Any]]:
        return [
            {"role": "system", "content": self.summary_system.format(category=self.category(category))},
            {"role": "user", "content": self.summary_user.format(dialogue=self.render_dialogue(dialogue))},
        ]


CHAT_V1 = PromptSet(
    version="capret-chat-v1",
    first_question="Describe this clothing item in detail.",
    answerer_system=(
        "You see a photo of one clothing item. Answer the last question in one short sentence, using only "
        "what is visible in the photo. If you cannot tell, answer 'not sure'. Do not invent details."
    ),
    questioner_system=(
        "You are helping to describe one {category} in a photo that you cannot see, so that the exact same "
        "product can be found in an online shop. An assistant who sees the photo answers your questions. "
        "Ask ONE new, informative question about what the item looks like: colour, material, pattern or "
        "print, sleeve length, neckline or collar, length, fit, details such as buttons, zips or pockets, "
        "printed text or logo, or the background. Do not ask a yes/no question and never repeat a question "
        "that was already asked. Reply with the question only."
    ),
    questioner_user="{dialogue}\n\nNext question:",
    reask_repeat=(
        "'{question}' was already asked. Ask a different question about an attribute that was not covered."
    ),
    reask_yes_no="'{question}' can be answered with yes or no. Ask an open question instead.",
    summary_system=(
        "Summarise what the dialogue says about the {category} into a description of two to four sentences "
        "that would identify it in a shop. Use only facts stated in the answers. Ignore answers that are "
        "unsure or say they do not know, and do not invent anything. Do not mention the dialogue."
    ),
    summary_user="{dialogue}\n\nDescription:",
)

#: Built-in prompt sets by version.
PROMPT_SETS: dict[str, PromptSet] = {CHAT_V1.version: CHAT_V1}


def get_prompt_set(version: str) -> PromptSet:
    """A built-in prompt set; unknown versions fail with the list of valid ones."""
    try:
        return PROMPT_SETS[version]
    except KeyError:
        raise UnknownNameError(
            f"unknown prompt version {version!r}; valid versions: {', '.join(sorted(PROMPT_SETS))} "
            "(or pass a YAML file with --prompt-file)"
        ) from None


def load_prompt_set(path: str | Path) -> PromptSet:
    """Read a prompt set from YAML: every field of :class:`PromptSet` except optional ones is required.

    A custom file must carry its own ``version`` (distinct from the built-in ones) so that its captions stay
    distinguishable in the store.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"prompt file {path} does not exist")
    data = load_yaml_file(path)  # syntax, duplicate keys, python tags: named with the file
    if not isinstance(data, dict):
        raise ConfigError(f"prompt file {path}: top level must be a mapping of PromptSet fields")
    fields = {f.name: f for f in dataclasses.fields(PromptSet)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(
            f"prompt file {path}: unknown field {unknown[0]!r}; valid fields: {', '.join(fields)}"
        )
    missing = [n for n, f in fields.items() if f.default is dataclasses.MISSING and n not in data]
    if missing:
        raise ConfigError(f"prompt file {path}: missing field(s) {missing}")
    bad = [k for k, v in data.items() if not isinstance(v, str) or not v.strip()]
    if bad:
        raise ConfigError(f"prompt file {path}: field {bad[0]!r} must be a non-empty string")
    if data["version"] in PROMPT_SETS and PromptSet(**data) != PROMPT_SETS[data["version"]]:
        raise ConfigError(
            f"prompt file {path}: version {data['version']!r} is a built-in version with different texts; "
            "give your prompt set its own version name"
        )
    return PromptSet(**data)
