"""Builders of tiny models and servers for tests, benchmarks and dry runs (never used by library code).

- :func:`save_random_clip` / :func:`build_random_clip` / :func:`train_tokenizer`: a randomly initialised
  Hugging Face CLIP of a named size preset with a BPE tokenizer trained on the fly, saved in the
  ``from_pretrained`` layout so :func:`capret.models.clip.load_clip` loads it through the real path.
- :func:`save_tiny_open_clip`: a tiny random open_clip model (ViT or ModifiedResNet image tower, open_clip's
  bundled OpenAI BPE tokenizer) in open_clip's ``local-dir:`` layout, so ``load_clip("local-dir:DIR",
  backend="open_clip")`` goes through ``open_clip.create_model_and_transforms`` offline.
- :class:`ChatServer`: a loopback OpenAI-compatible chat-completions server (below).

A loopback OpenAI-compatible chat-completions server, for tests, benchmarks and dry runs.

It speaks ``POST /v1/chat/completions`` with deterministic replies (a VLM-style answer when the request
carries an image, a question or a summary otherwise), adds a fixed latency per request, and injects faults on
demand, so the ``openai`` backend's concurrency, retries and failure records can be exercised against a real
HTTP server without any model: ``429`` (with ``Retry-After: 0``), ``500``/``503``, ``400`` (not retryable),
``timeout:<seconds>`` (reply only after that delay), ``malformed`` (a 200 with a non-JSON body), ``missing``
(a 200 JSON body without ``choices``) and ``drop`` (close the connection without replying).

Faults come from a queue (``faults``: one per request, in arrival order) or from ``fault_fn(payload)``, which
may return a fault name for a given request (e.g. always fail one item).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import torch

from capret.errors import UnknownNameError
from capret.models.clip import CLIP_MEAN, CLIP_STD

if TYPE_CHECKING:
    from capret.models.clip_arch import ClipArchConfig

__all__ = [
    "ChatServer",
    "reply_for",
    "save_tiny_open_clip",
    "synthetic_catalogue_rows",
    "tiny_open_clip_config",
]

_WORDS = ["red", "blue", "white", "black", "green", "striped", "cotton", "denim", "floral", "plain"]
_TOPICS = ["colour", "material", "pattern", "sleeve length", "neckline", "length", "fit", "closure", "logo",
           "background", "collar", "pockets"]  # fmt: skip


def _texts(payload: dict[str, Any]) -> tuple[str, str, bool]:
    """(system text, user text, has image) of a chat payload."""
    system: list[str] = []
    user: list[str] = []
    image = False
    for message in payload.get("messages", []):
        content = message.get("content", "")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        for part in parts:
            if part.get("type") == "image_url":
                image = True
            elif part.get("type") == "text":
                (system if message.get("role") == "system" else user).append(part["text"])
    return "\n".join(system), "\n".join(user), image


def reply_for(payload: dict[str, Any]) -> str:
    """The deterministic reply to a chat payload (same payload, same reply)."""
    system, user, image = _texts(payload)
    if image:
        digest = hashlib.sha1(json.dumps(payload["messages"], sort_keys=True).encode()).digest()
        # A run-on "Question:" as real VLMs produce; the loop must cut it (ChatCaptioner).
        return f"It looks {_WORDS[digest[0] % len(_WORDS)]}. Question: anything else?"
    if "summar" in system.lower():
        answers = [line[len("Answer:") :].strip() for line in user.splitlines() if line.startswith("Answer:")]
        return "Summary: " + " ".join(answers)
    asked = user.count("Question:")
    return f"Question: What is the {_TOPICS[asked % len(_TOPICS)]} of the item? Answer: it is"


class ChatServer:
    """Threaded HTTP server on 127.0.0.1; use as a context manager and point ``base_url`` at it."""

    def __init__(
        self,
        *,
        latency: float = 0.0,
        faults: Sequence[str] = (),
        fault_fn: Callable[[dict[str, Any]], str | None] | None = None,
        responder: Callable[[dict[str, Any]], str] = reply_for,
        port: int = 0,
    ) -> None:
        self.latency = latency
        self.fault_fn = fault_fn
        self.responder = responder
        self._faults = list(faults)
        self._lock = threading.Lock()
        self.requests = 0  # requests received
        self.faults_served: list[str] = []
        self.max_in_flight = 0
        self._in_flight = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real servers
            disable_nagle_algorithm = True  # else header and body writes wait on delayed ACKs (~40 ms)
            wbufsize = 1 << 16  # headers and body leave in one write (flushed after each request)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence the access log
                return

            def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:  # noqa: N802 - http.server naming
                length = int(self.headers.get("Content-Length", "0"))
                raw = self.rfile.read(length)
                try:
                    server._handle(self, raw)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test): nothing to answer

        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def _next_fault(self, payload: dict[str, Any]) -> str | None:
        with self._lock:
            self.requests += 1
            fault = self._faults.pop(0) if self._faults else None
        if fault is None and self.fault_fn is not None:
            fault = self.fault_fn(payload)
        if fault is not None:
            with self._lock:
                self.faults_served.append(fault)
        return fault

    def _handle(self, handler: Any, raw: bytes) -> None:
        if handler.path.rstrip("/") != "/v1/chat/completions":
            handler._send(404, b'{"error": "not found"}')
            return
        try:
            payload = json.loads(raw)
        except json.JSONDecodeError:
            handler._send(400, b'{"error": "request body is not JSON"}')
            return
        fault = self._next_fault(payload)
        with self._lock:
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
        try:
            if self.latency:
                time.sleep(self.latency)
            if fault is not None and fault.startswith("timeout:"):
                time.sleep(float(fault.split(":", 1)[1]))
            elif fault in ("429", "500", "503", "400"):
                headers = {"Retry-After": "0"} if fault == "429" else None
                handler._send(int(fault), json.dumps({"error": f"injected {fault}"}).encode(), headers)
                return
            elif fault == "malformed":
                handler._send(200, b'{"choices": [{"message": ')
                return
            elif fault == "missing":
                handler._send(200, b'{"object": "chat.completion"}')
                return
            elif fault == "drop":
                handler.close_connection = True
                handler.connection.shutdown(2)
                return
            elif fault is not None:
                raise ValueError(f"unknown injected fault {fault!r}")
            text = self.responder(payload)
            system, user, _ = _texts(payload)
            body = {
                "id": f"cmpl-{self.requests}",
                "object": "chat.completion",
                "model": payload.get("model", ""),
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                ],
                "usage": {
                    "prompt_tokens": len((system + " " + user).split()),
                    "completion_tokens": len(text.split()),
                },
            }
            handler._send(200, json.dumps(body).encode())
        finally:
            with self._lock:
                self._in_flight -= 1

    def start(self) -> ChatServer:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.02},
            name="capret-loopback",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> ChatServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    """``python -m capret.testing [PORT] [LATENCY]``: serve until interrupted (for manual dry runs)."""
    import sys

    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8000
    latency = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
    with ChatServer(port=port, latency=latency) as server:
        print(f"serving chat completions at {server.base_url}", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


# ------------------------------------------------------------------------------------------ tiny CLIPs

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
UNK_TOKEN = "<|unk|>"


#: the public sizes by preset name: open_clip's bundled architecture configs (``model_configs/<name>.json``) hold
#: their numbers, so they are read from there instead of restated here
OPEN_CLIP_PRESETS = {"vit-b-32": "ViT-B-32", "vit-l-14": "ViT-L-14"}
#: every preset name :func:`build_random_clip` takes
CLIP_PRESETS: tuple[str, ...] = ("tiny", *OPEN_CLIP_PRESETS)
#: width of one attention head in open_clip's ViTs (``VisionCfg.head_width``), which its configs leave implicit
_OPEN_CLIP_HEAD_WIDTH = 64


def _preset(name: str) -> ClipArchConfig:
    """The architecture of a preset, in the same config that describes the CLIPs capret trains."""
    from capret.models.clip_arch import ClipArchConfig, TextTowerConfig, VisionTowerConfig

    if name == "tiny":  # a few thousand parameters: builds and runs a training step on CPU in milliseconds
        return ClipArchConfig(
            embed_dim=24,
            vision=VisionTowerConfig(image_size=32, width=32, layers=2, head_width=16, patch_size=8),
            text=TextTowerConfig(context_length=32, width=32, heads=2, layers=2),
        )
    if name not in OPEN_CLIP_PRESETS:
        raise UnknownNameError(
            f"unknown CLIP preset {name!r}; valid presets: {', '.join(sorted(CLIP_PRESETS))}"
        )
    import open_clip

    arch = open_clip.get_model_config(OPEN_CLIP_PRESETS[name])
    text = arch["text_cfg"]
    return ClipArchConfig(
        embed_dim=arch["embed_dim"],
        vision=VisionTowerConfig(**{"head_width": _OPEN_CLIP_HEAD_WIDTH, **arch["vision_cfg"]}),
        text=TextTowerConfig(
            context_length=text["context_length"],
            width=text["width"],
            heads=text["heads"],
            layers=text["layers"],
        ),
    )


class _HFTower(TypedDict):
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int


def _hf_tower(*, width: int, layers: int, heads: int) -> _HFTower:
    """A transformer tower's size in ``transformers``' CLIP config names; both towers of CLIP use an MLP four
    times their width."""
    return _HFTower(
        hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers, num_attention_heads=heads
    )


def build_random_clip(
    preset: str = "tiny", *, vocab_size: int = 49408, special_ids: dict[str, int] | None = None, seed: int = 0
) -> Any:
    """A randomly initialised ``CLIPModel`` of a preset size (no download).

    ``special_ids`` gives the ``bos``/``eos``/``pad`` token ids of the tokenizer the model will be used with;
    the text tower pools at the first ``eos`` token, so a wrong id would pool at the wrong position.
    """
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    p = _preset(preset)
    ids = special_ids or {"bos": 49406, "eos": 49407, "pad": 1}
    text = CLIPTextConfig(
        **_hf_tower(width=p.text.width, layers=p.text.layers, heads=p.text.heads),
        vocab_size=vocab_size,
        max_position_embeddings=p.text.context_length,
        projection_dim=p.embed_dim,
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
    )
    vision = CLIPVisionConfig(
        **_hf_tower(
            width=p.vision.width, layers=p.vision.layers, heads=p.vision.width // p.vision.head_width
        ),
        image_size=p.vision.image_size,
        patch_size=p.vision.patch_size,
        projection_dim=p.embed_dim,
    )
    config = CLIPConfig(
        text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=p.embed_dim
    )
    torch.manual_seed(seed)
    return CLIPModel(config).eval()


def train_tokenizer(texts: Iterable[str], *, vocab_size: int = 512, context_length: int = 77) -> Any:
    """A byte-level BPE tokenizer trained on ``texts``, wrapped as ``PreTrainedTokenizerFast``.

    It mimics CLIP's tokenizer where it matters to the model: lower-casing, ``<|startoftext|>`` and
    ``<|endoftext|>`` around every sequence, and a maximum length equal to the text context.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN]
    tok = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    bos, eos = tok.token_to_id(BOS_TOKEN), tok.token_to_id(EOS_TOKEN)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A {EOS_TOKEN}",
        special_tokens=[(BOS_TOKEN, bos), (EOS_TOKEN, eos)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=context_length,
    )


def save_random_clip(
    out_dir: str | Path,
    *,
    preset: str = "tiny",
    texts: Sequence[str] = (),
    vocab_size: int = 512,
    seed: int = 0,
) -> Path:
    """Write a random CLIP, a freshly trained tokenizer and a CLIP image processor to ``out_dir``.

    The folder has the layout of a hub checkpoint, so ``load_clip(out_dir)`` exercises the real loading path.
    """
    from transformers import CLIPImageProcessor

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    p = _preset(preset)
    corpus = list(texts) or ["a photo of a red dress with short sleeves", "a blue shirt", "two dogs on grass"]
    tokenizer = train_tokenizer(corpus, vocab_size=vocab_size, context_length=p.text.context_length)
    special = {
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "pad": tokenizer.pad_token_id,
    }
    model = build_random_clip(preset, vocab_size=len(tokenizer), special_ids=special, seed=seed)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    processor = CLIPImageProcessor(
        size={"shortest_edge": p.vision.image_size},
        crop_size={"height": p.vision.image_size, "width": p.vision.image_size},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    processor.save_pretrained(out)
    return out


# ------------------------------------------------------------------------------------------ tiny open_clip


def tiny_open_clip_config(image_tower: str = "vit") -> dict[str, Any]:
    """An open_clip ``model_cfg`` a few hundred kB large: ``vit`` (ViT) or ``rn`` (ModifiedResNet, the tower
    family of RN50x4). The text tower keeps CLIP's vocabulary (49,408) and context (77) so open_clip's bundled
    tokenizer works unchanged."""
    text = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}
    if image_tower == "vit":
        vision: dict[str, Any] = {
            "image_size": 32,
            "layers": 2,
            "width": 32,
            "head_width": 16,
            "patch_size": 8,
        }
    elif image_tower == "rn":
        vision = {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "head_width": 16, "patch_size": None}
    else:
        raise ValueError(f"image_tower={image_tower!r}; valid: vit, rn")
    return {"embed_dim": 24, "vision_cfg": vision, "text_cfg": text}


def save_tiny_open_clip(out_dir: str | Path, *, image_tower: str = "vit", seed: int = 0) -> Path:
    """Write a random tiny open_clip model as ``open_clip_config.json`` + ``open_clip_model.safetensors``.

    Load it with ``load_clip(f"local-dir:{out_dir}", backend="open_clip")``; weights are seeded, so two calls
    with the same seed give the same model.
    """
    import open_clip
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = tiny_open_clip_config(image_tower)
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(config["embed_dim"], config["vision_cfg"], config["text_cfg"])
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "open_clip_model.safetensors"))
    preprocess = {"size": config["vision_cfg"]["image_size"], "mean": list(CLIP_MEAN), "std": list(CLIP_STD)}
    (out / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": config, "preprocess_cfg": preprocess}, indent=1)
    )
    return out


if __name__ == "__main__":
    main()


def synthetic_catalogue_rows(
    dim: int,
    rows: int,
    *,
    seed: int,
    fingerprint: str,
    start: int = 0,
    clusters: int = 16,
    spread: float = 0.3,
    categories: Sequence[str] = ("dress", "top", "top", "top"),
) -> Any:
    """``rows`` catalogue rows (an Arrow table of :func:`capret.catalogue.schema.row_schema`) without a model.

    Vectors are clustered (``clusters`` random unit centres plus Gaussian noise of ``spread``, re-normalised),
    so an IVF index has structure to find, as real embeddings do; the cluster centres depend on ``seed`` only
    through ``seed // 1000`` so later batches (other seeds in the same thousand) fall into the same clusters.
    Row ``start + i`` gets id ``syn/<start + i>/0`` and category ``categories[(start + i) % len(categories)]``.
    """
    import numpy as np
    import pyarrow as pa

    from capret.catalogue.schema import row_schema

    centres = np.random.default_rng(seed // 1000).standard_normal((clusters, dim)).astype(np.float32)
    rng = np.random.default_rng(seed)
    vectors = centres[rng.integers(0, clusters, rows)]
    vectors = vectors + spread * rng.standard_normal((rows, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    numbers = np.arange(start, start + rows)
    stamps = pa.array(np.full(rows, np.datetime64("2026-01-01T00:00:00", "us")), pa.timestamp("us")).cast(
        pa.timestamp("us", tz="UTC")
    )
    return pa.table(
        {
            "id": [f"syn/{n:07d}/0" for n in numbers],
            "image": [f"syn/{n:07d}.jpg" for n in numbers],
            "image_sha256": [f"{n:064x}" for n in numbers],
            "phash": numbers.astype(np.int64),
            "item": np.zeros(rows, np.int32),
            "box": pa.FixedSizeListArray.from_arrays(
                pa.array(np.tile([0.0, 0.0, 1.0, 1.0], rows), pa.float32()), 4
            ),
            "score": np.ones(rows, np.float32),
            "category": [categories[int(n) % len(categories)] for n in numbers],
            "caption": pa.nulls(rows, pa.string()),
            "caption_source": ["none"] * rows,
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim),
            "model_fingerprint": [fingerprint] * rows,
            "created": stamps,
            "updated": stamps,
        },
        schema=row_schema(dim),
    )
