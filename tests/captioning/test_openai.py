"""The openai backend against a real HTTP chat-completions server on 127.0.0.1 that injects faults."""

from __future__ import annotations

import base64
import io
import json
import threading
from typing import Any

import pytest
from PIL import Image

from capret.testing import ChatServer
from captioning.backends import create_backend
from captioning.loop import CaptionTask, LoopConfig, caption_batch
from captioning.prompts import get_prompt_set
from captioning.types import ChatRequest, ItemContext

PROMPTS = get_prompt_set("capret-chat-v1")


def _chat(n: int = 1) -> list[ChatRequest]:
    return [
        ChatRequest(
            messages=[{"role": "user", "content": f"Question: hi {i}"}],
            kind="question",
            context=ItemContext(key=f"k{i}"),
        )
        for i in range(n)
    ]


def _backend(server: ChatServer, **options: Any):
    defaults = {
        "vlm": "tiny-vlm",
        "concurrency": 4,
        "timeout": 0.5,
        "max_retries": 3,
        "backoff_base": 0.01,
        "seed": 0,
    }
    defaults.update(options)
    return create_backend("openai", base_urls=[server.base_url], **defaults)


@pytest.mark.parametrize("fault", ["429", "500", "503", "malformed", "missing", "timeout:1.0", "drop"])
def test_transient_faults_are_retried(fault: str) -> None:
    with ChatServer(faults=[fault, fault]) as server, _backend(server) as backend:
        (reply,) = backend.ask(_chat(), max_tokens=8)
    assert reply.ok, reply.error
    assert reply.text.startswith("Question: What is the")
    assert server.requests == 3 and server.faults_served == [fault, fault]
    assert reply.prompt_tokens > 0 and reply.completion_tokens > 0


def test_failure_record_after_the_last_retry() -> None:
    with ChatServer(fault_fn=lambda payload: "500") as server, _backend(server, max_retries=2) as backend:
        (reply,) = backend.ask(_chat(), max_tokens=8)
    assert not reply.ok and reply.text == ""
    assert server.requests == 3
    assert reply.error is not None
    assert "failed after 3 attempts; last error: HTTP 500" in reply.error and server.base_url in reply.error


def test_timeouts_are_reported_as_such() -> None:
    with (
        ChatServer(fault_fn=lambda p: "timeout:0.6") as server,
        _backend(server, max_retries=1, timeout=0.2) as b,
    ):
        (reply,) = b.ask(_chat(), max_tokens=8)
    assert reply.error is not None and "last error: timeout after 0.2s" in reply.error


def test_client_errors_are_not_retried() -> None:
    with ChatServer(faults=["400"]) as server, _backend(server) as backend:
        (reply,) = backend.ask(_chat(), max_tokens=8)
    assert server.requests == 1
    assert reply.error is not None and "HTTP 400" in reply.error and "not retried" in reply.error


def test_concurrency_is_bounded_and_used() -> None:
    with ChatServer(latency=0.05) as server, _backend(server, concurrency=3) as backend:
        replies = backend.ask(_chat(12), max_tokens=8)
    assert all(r.ok for r in replies)
    assert server.max_in_flight == 3


def test_round_robin_over_base_urls() -> None:
    with ChatServer() as one, ChatServer() as two:
        backend = create_backend(
            "openai", base_urls=[one.base_url, two.base_url + "/"], vlm="m", concurrency=2
        )
        with backend:
            assert all(r.ok for r in backend.ask(_chat(10), max_tokens=8))
    assert one.requests == 5 and two.requests == 5


def test_api_key_from_environment_and_image_as_data_url(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[dict[str, Any], str | None]] = []
    lock = threading.Lock()

    class Recording(ChatServer):
        def _handle(self, handler: Any, raw: bytes) -> None:
            with lock:
                seen.append((json.loads(raw), handler.headers.get("Authorization")))
            super()._handle(handler, raw)

    monkeypatch.setenv("CAPRET_API_KEY", "sk-test-123")
    task = CaptionTask(key="k", image=Image.new("RGB", (30, 20), (0, 0, 255)), bbox=None, category="skirt")
    with Recording() as server, _backend(server, llm="tiny-llm") as backend:
        (result,) = caption_batch([task], backend=backend, prompts=PROMPTS, config=LoopConfig(rounds=2))
        assert backend.describe()["llm"] == "tiny-llm" and "sk-test" not in json.dumps(backend.describe())
    assert result.ok and result.caption.startswith("It looks")
    assert all(auth == "Bearer sk-test-123" for _, auth in seen)
    vlm_payloads = [p for p, _ in seen if p["model"] == "tiny-vlm"]
    llm_payloads = [p for p, _ in seen if p["model"] == "tiny-llm"]
    assert len(vlm_payloads) == 3 and len(llm_payloads) == 3  # describe + 2 answers; 2 questions + summary
    part = vlm_payloads[0]["messages"][1]["content"][0]
    assert part["type"] == "image_url" and part["image_url"]["url"].startswith("data:image/jpeg;base64,")
    decoded = Image.open(io.BytesIO(base64.b64decode(part["image_url"]["url"].split(",", 1)[1])))
    assert decoded.size == (30, 20)
    assert isinstance(vlm_payloads[0]["messages"][0]["content"], str)  # system prompt as a plain string
    # the answerer reads the dialogue so far (ChatCaptioner); answers were cut at the run-on "Question:"
    last_text = vlm_payloads[-1]["messages"][1]["content"][1]["text"]
    assert last_text.count("Question:") == 3 and "anything else" not in last_text


def test_one_failing_item_does_not_fail_the_batch() -> None:
    def fault(payload: dict[str, Any]) -> str | None:
        text = json.dumps(payload["messages"])
        return "500" if "bad" in text and "image_url" not in text else None

    tasks = [
        CaptionTask(key="good", image=Image.new("RGB", (16, 16)), category="shirt"),
        CaptionTask(key="bad", image=Image.new("RGB", (16, 16)), category="bad skirt"),
    ]
    with ChatServer(fault_fn=fault) as server, _backend(server, max_retries=1) as backend:
        good, bad = caption_batch(tasks, backend=backend, prompts=PROMPTS, config=LoopConfig(rounds=2))
    assert good.ok and good.caption
    assert (
        bad.error is not None and bad.error.startswith("LLM question (round 1):") and "HTTP 500" in bad.error
    )


def test_option_validation() -> None:
    with pytest.raises(ValueError, match="at least one --base-url"):
        create_backend("openai", base_urls=[], vlm="m")
    with pytest.raises(ValueError, match="must start with http"):
        create_backend("openai", base_urls=["localhost:8000"], vlm="m")
    with pytest.raises(
        ValueError, match="--api-key-env CAPRET_NO_SUCH_KEY: that environment variable is not set"
    ):
        create_backend("openai", base_urls=["http://x"], vlm="m", api_key_env="CAPRET_NO_SUCH_KEY")
    with pytest.raises(ValueError, match="needs --vlm"):
        create_backend("openai", base_urls=["http://x"], vlm="")


def test_api_keys_only_go_where_they_were_meant_to(monkeypatch: pytest.MonkeyPatch) -> None:
    from captioning.backends.openai_backend import resolve_api_key

    monkeypatch.delenv("CAPRET_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-hosted")
    # the hosted API over https gets $OPENAI_API_KEY; nothing else does
    assert resolve_api_key(["https://api.openai.com/v1"]) == "sk-hosted"
    assert resolve_api_key(["http://127.0.0.1:8000/v1"]) is None
    assert resolve_api_key(["https://llm.example.org/v1"]) is None
    assert resolve_api_key(["http://api.openai.com/v1"]) is None  # plain http: not the hosted API
    # other servers take $CAPRET_API_KEY or --api-key-env
    monkeypatch.setenv("MY_KEY", "sk-mine")
    assert resolve_api_key(["https://llm.example.org/v1"], api_key_env="MY_KEY") == "sk-mine"
    monkeypatch.setenv("CAPRET_API_KEY", "sk-capret")
    assert resolve_api_key(["http://localhost:8000/v1", "http://[::1]:9/v1"]) == "sk-capret"
    # plain http beyond loopback never receives a key
    with pytest.raises(ValueError, match="plain http"):
        resolve_api_key(["http://10.0.0.5:8000/v1"])
    with pytest.raises(ValueError, match="plain http"):
        resolve_api_key(["http://gpu-box.lan/v1"], api_key_env="MY_KEY")
    monkeypatch.delenv("CAPRET_API_KEY")
    assert resolve_api_key(["http://10.0.0.5:8000/v1"]) is None  # no key at all: fine
