"""``transformers`` backend: a local VLM (LLaVA-style or BLIP-2) and a local chat LLM, batched.

Models load with the ecosystem's own calls from a hub id or a local directory:
``AutoProcessor`` + ``AutoModelForImageTextToText`` for the VLM (LLaVA, BLIP-2 and other image-text-to-text
models) and ``AutoTokenizer`` + ``AutoModelForCausalLM`` for the LLM; ``trust_remote_code`` is passed only
when the user asks for it. Without ``llm`` the VLM's own language model asks and summarises (text-only
prompts), which saves memory for chat VLMs such as LLaVA.

Batches are left-padded (decoder-only generation continues from the right end of every row) and decoded
greedily by default. A decoder-only model's output repeats the prompt, which is cut off; an encoder-decoder's
(BLIP-2 / InstructBLIP Flan-T5) holds only generated tokens, all of which are kept. Prompts are rendered with the model's chat template; a processor without one (BLIP-2)
gets the plain "Question: ... Answer:" format that BLIP-2 was tuned with.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from capret.errors import ConfigError
from capret.io import check_weights_folder
from captioning.backends.base import CaptionBackend, register_backend
from captioning.types import ChatRequest, Generation, VisualQuery

__all__ = ["TransformersBackend"]

_DTYPES = ("auto", "float32", "float16", "bfloat16")


def _flatten_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "\n".join(p["text"] for p in content if p.get("type") == "text")


def _plain_prompt(messages: Sequence[dict[str, Any]]) -> str:
    """Chat messages as one plain prompt (for processors/tokenizers without a chat template)."""
    system = [_flatten_text(m["content"]) for m in messages if m["role"] == "system"]
    rest = [_flatten_text(m["content"]) for m in messages if m["role"] != "system"]
    return "\n".join(system + rest).strip()


def _is_encoder_decoder(model: Any) -> bool:
    """Whether ``generate`` returns decoder tokens only (T5 / Flan-T5, also inside BLIP-2 and InstructBLIP,
    whose own config may say False while its ``text_config`` says True) rather than prompt + continuation."""
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        return True
    return bool(getattr(getattr(config, "text_config", None), "is_encoder_decoder", False))


def _decoder_start(model: Any) -> int | None:
    """The token an encoder-decoder's output rows begin with (the composite's or its language model's)."""
    for config in (
        getattr(model, "generation_config", None),
        getattr(model, "config", None),
        getattr(getattr(model, "config", None), "text_config", None),
    ):
        value = getattr(config, "decoder_start_token_id", None)
        if value is not None:
            return int(value)
    return None


def _text_only(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"role": m["role"], "content": _flatten_text(m["content"])} for m in messages]


@register_backend("transformers")
class TransformersBackend(CaptionBackend):
    """Local models through ``transformers``; see the module docstring."""

    name = "transformers"

    def __init__(
        self,
        *,
        vlm: str,
        llm: str | None = None,
        device: str = "cpu",
        dtype: str = "auto",
        trust_remote_code: bool = False,
        do_sample: bool = False,
        temperature: float = 1.0,
    ) -> None:
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if not vlm:
            raise ConfigError("the transformers backend needs --vlm (a hub id or a local model directory)")
        if dtype not in _DTYPES:
            raise ConfigError(f"unknown --dtype {dtype!r}; valid: {', '.join(_DTYPES)}")
        self.vlm_name = vlm
        self.llm_name = llm
        self.device = torch.device(device)
        self.dtype = dtype
        self.do_sample = do_sample
        self.temperature = temperature
        torch_dtype: Any = dtype if dtype == "auto" else getattr(torch, dtype)

        for source in (vlm, llm):  # local folders of pickles or truncated files: refused, named
            if source:
                check_weights_folder(source)
        self.processor = AutoProcessor.from_pretrained(vlm, trust_remote_code=trust_remote_code)
        vlm_model: Any = AutoModelForImageTextToText.from_pretrained(
            vlm, dtype=torch_dtype, trust_remote_code=trust_remote_code
        )
        self.vlm: Any = vlm_model.to(self.device).eval()
        self._vlm_tokenizer = self.processor.tokenizer
        self._vlm_tokenizer.padding_side = "left"
        if self._vlm_tokenizer.pad_token is None:
            self._vlm_tokenizer.pad_token = self._vlm_tokenizer.eos_token
        self._vlm_chat = bool(getattr(self.processor, "chat_template", None))

        if llm:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(llm, trust_remote_code=trust_remote_code)
            llm_model: Any = AutoModelForCausalLM.from_pretrained(
                llm, dtype=torch_dtype, trust_remote_code=trust_remote_code
            )
            self.llm: Any = llm_model.to(self.device).eval()
        else:
            if not self._vlm_chat:
                raise ConfigError(
                    f"VLM {vlm!r} has no chat template, so it cannot also ask the questions; pass --llm"
                )
            self.tokenizer = self._vlm_tokenizer
            self.llm = self.vlm
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def describe(self) -> dict[str, Any]:
        return {
            "vlm": self.vlm_name,
            "llm": self.llm_name or self.vlm_name,
            "dtype": self.dtype,
            "do_sample": self.do_sample,
            "temperature": self.temperature if self.do_sample else None,
        }

    # --- generation ---------------------------------------------------------------------------------------

    def _generate(self, model: Any, tokenizer: Any, inputs: Any, max_tokens: int) -> list[Generation]:
        import torch

        inputs = inputs.to(self.device)
        if "pixel_values" in inputs and model.dtype != torch.float32:
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        options: dict[str, Any] = {"max_new_tokens": max_tokens, "do_sample": self.do_sample}
        if self.do_sample:
            options["temperature"] = self.temperature
        with torch.inference_mode():
            output = model.generate(**inputs, **options, pad_token_id=tokenizer.pad_token_id)
        prompt_counts = inputs["attention_mask"].sum(dim=1).tolist()
        if _is_encoder_decoder(model):
            # an encoder-decoder returns only decoder tokens, led by its decoder start token: nothing of the
            # prompt is in them, so nothing may be cut (cutting the prompt length lost most of a BLIP-2
            # Flan-T5 description, often all of it)
            start = _decoder_start(model)
            rows = [r[1:] if r and start is not None and r[0] == start else r for r in output.tolist()]
        else:
            rows = output[:, inputs["input_ids"].shape[1] :].tolist()
        eos = tokenizer.eos_token_id
        results = []
        for row, prompt_count in zip(rows, prompt_counts):
            if eos is not None and eos in row:
                row = row[: row.index(eos) + 1]  # tokens after EOS are padding
            text = tokenizer.decode(row, skip_special_tokens=True)
            results.append(
                Generation(text=text.strip(), prompt_tokens=int(prompt_count), completion_tokens=len(row))
            )
        return results

    def ask(self, requests: Sequence[ChatRequest], *, max_tokens: int) -> list[Generation]:
        if not requests:
            return []
        templated = bool(getattr(self.tokenizer, "chat_template", None))
        if templated:  # the template already holds BOS and role markers
            texts = [
                self.tokenizer.apply_chat_template(
                    _text_only(r.messages), tokenize=False, add_generation_prompt=True
                )
                for r in requests
            ]
        else:
            texts = [_plain_prompt(r.messages) for r in requests]
        inputs = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not templated)
        return self._generate(self.llm, self.tokenizer, inputs, max_tokens)

    def answer(self, queries: Sequence[VisualQuery], *, max_tokens: int) -> list[Generation]:
        if not queries:
            return []
        if self._vlm_chat:
            texts = [
                self.processor.apply_chat_template(q.messages, tokenize=False, add_generation_prompt=True)
                for q in queries
            ]
        else:  # BLIP-2 style: the processor inserts the query tokens itself
            texts = [_plain_prompt(q.messages) for q in queries]
        inputs = self.processor(
            images=[q.image for q in queries], text=texts, padding=True, return_tensors="pt"
        )
        return self._generate(self.vlm, self._vlm_tokenizer, inputs, max_tokens)
