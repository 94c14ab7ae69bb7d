"""Training-free composed retrieval by caption-then-rewrite (CIReVL: Karthik et al., "Vision-by-Language for
Training-Free Compositional Image Retrieval", ICLR 2024).

The reference image is described by a captioning model (BLIP-2 in the paper; here any caption backend of
:mod:`captioning.backends`: a local transformers VLM, an OpenAI-compatible server, or the model-free
``template``), an LLM rewrites that description as the relative caption asks (the "edited description"), and
the edited description is encoded by the CLIP *text* tower and matched against CLIP image features of the
gallery. No parameter is trained, and no annotation field reaches any prompt: the captioner sees the pixels and
one generic question, the LLM sees the description and the query's relative caption.

Both model steps are cached in one exactly-once caption store (:class:`captioning.store.CaptionStore`), so a
rerun (another CLIP, a reranker, a metric) makes no model call at all:

* ``cirevl/<dataset>/<reference>`` — the description of a reference image;
* ``cirevl-rewrite/<dataset>/<digest>`` — the edited description, where ``digest`` hashes the reference, its
  description and the relative caption (a re-captioned reference gets new rewrites, never stale ones).

Our rewrite prompt asks for one line starting with ``Edited Description:`` (the marker CIReVL's prompt also
ends on). ``prompt_file`` replaces it with the paper's per-dataset prompts (supplied by the user): the prompt text
is sent as one user message followed by ``Image Content: <description>`` and ``Instruction: <relative caption>``
lines, as CIReVL's ``src/utils.py`` builds it. A reply without the marker, or with nothing after it, is *not*
retried: the query uses its relative caption (CIReVL does the same), the record keeps ``"parsed": false`` with the
raw reply, and the count is reported — so the unparsed rate of an LLM is visible and reproducible.

A reference image without a description (an empty reply, or a failed request) is an *error*, not a silent
text-only query: the run stops after storing everything it finished, with a :class:`CirevlIncompleteError` that
counts the missing descriptions and failed rewrites and names the failures file (a rerun retries exactly those).
``on_missing="text-only"`` opts into scoring such queries with their relative caption alone; they are then
counted as ``fallbacks`` in the report. The paper's generation settings are options: greedy decoding
(temperature 0, the backends' default) and ``max_edit_tokens`` (CIReVL: 700).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from PIL import Image
from tqdm.auto import tqdm

from capret.errors import CapretError, CaptionStoreMismatchError, ConfigError
from captioning.backends.base import CaptionBackend
from captioning.loop import trim_answer
from captioning.store import CaptionStore, read_records, utc_now
from captioning.types import QA, ChatRequest, ItemContext, VisualQuery

__all__ = [
    "DESCRIBE_QUESTION",
    "CirevlIncompleteError",
    "CirevlOptions",
    "CirevlReport",
    "RewritePrompts",
    "caption_key",
    "edit_messages",
    "edited_descriptions",
    "parse_edited_description",
    "rewrite_key",
]

DESCRIBE_VERSION = "capret-cirevl-describe-v1"
EDIT_VERSION = "capret-cirevl-edit-v1"

#: the one question the captioner answers per reference image (no category or other annotation in it)
DESCRIBE_QUESTION = "Describe this image in one detailed sentence."
_DESCRIBE_SYSTEM = (
    "You see one photo. Answer in one sentence that names the main objects, their colours, materials, count "
    "and setting, using only what is visible."
)
_EDIT_SYSTEM = (
    "You edit image descriptions. You get the description of an image and a requested change. Write the "
    "description of the image that would result from applying the change: keep what the change does not "
    "touch, replace what it changes, and add what it adds. Reply with exactly one line that starts with "
    "'Edited Description:' followed by the new description, and nothing else."
)
_EDIT_USER = "Image description: {description}\nRequested change: {modification}\n"
_MARKER = re.compile(r"edited\s+description\s*:\s*", re.IGNORECASE)


@dataclass
class CirevlOptions:
    """How the two model steps run (the backend itself is built by the caller's factory)."""

    store: Path  # the caption store (JSONL) holding descriptions and rewrites; resumed if it exists
    batch_size: int = 16  # requests per backend call (one batched generate / concurrent server requests)
    max_caption_tokens: int = 77  # token limit of a description
    max_edit_tokens: int = 96  # token limit of a rewrite (CIReVL: 700)
    progress: bool = True
    prompt_file: Path | None = (
        None  # per-dataset rewrite prompts (the paper's; see RewritePrompts); None = ours
    )
    on_missing: str = "error"  # a reference without a description: error | text-only (its relative caption)


@dataclass
class CirevlReport:
    """Counts of one run: what came from the store, what was asked, and how many queries fell back."""

    references: int = 0  # unique reference images
    captions_cached: int = 0
    captions_new: int = 0
    caption_failures: int = 0  # failed description requests (logged; retried by the next run)
    queries: int = 0
    rewrites_cached: int = 0
    rewrites_new: int = 0
    rewrite_failures: int = 0  # failed rewrite requests (logged; retried by the next run)
    empty_descriptions: int = 0  # description replies with no text (stored as failures; retried next run)
    unparsed: int = 0  # replies without an "Edited Description:" line (stored; the query uses its caption)
    missing: int = 0  # queries without a description or rewrite (an error unless on_missing=text-only)
    fallbacks: int = 0  # queries answered with their relative caption (unparsed + missing under text-only)
    model_calls: int = 0  # requests sent to the backend in this run (0 on a fully cached rerun)
    backend: str = ""
    store: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class CirevlIncompleteError(CapretError):
    """Some queries have no description or rewrite; carries the run's :class:`CirevlReport`."""

    def __init__(self, message: str, *, report: CirevlReport) -> None:
        super().__init__(message)
        self.report = report


class RewritePrompts:
    """Rewrite prompts read from a file: one prompt for every dataset (a text file) or one per dataset (a JSON
    object ``{"cirr": "...", "circo": "...", "fashioniq": "...", "default": "..."}``).

    A dataset name such as ``fashioniq/dress`` is looked up whole, then by its part before ``/``, then as
    ``default``. Each prompt's version string hashes its text, so rewrites made with another prompt are never
    read back from the store as if they were this one's.
    """

    def __init__(self, path: Path) -> None:
        import json

        self.path = Path(path)
        if not self.path.is_file():
            raise ConfigError(f"rewrite prompt file {self.path} does not exist")
        text = self.path.read_text(encoding="utf-8")
        prompts: dict[str, str]
        if self.path.suffix == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{self.path}: not valid JSON ({exc})") from None
            if not isinstance(data, dict) or not all(isinstance(v, str) and v.strip() for v in data.values()):
                raise ConfigError(
                    f"{self.path}: expected a JSON object of dataset name -> non-empty prompt text"
                )
            prompts = {str(k): v for k, v in data.items()}
        else:
            if not text.strip():
                raise ConfigError(f"{self.path}: the rewrite prompt is empty")
            prompts = {"default": text}
        self.prompts = prompts

    def prompt(self, dataset: str) -> str:
        for name in (dataset, dataset.split("/", 1)[0], "default"):
            if name in self.prompts:
                return self.prompts[name].rstrip()
        raise ConfigError(
            f"{self.path} has no rewrite prompt for dataset {dataset!r} (keys: {', '.join(sorted(self.prompts))}; "
            "add the dataset or a 'default')"
        )

    def version(self, dataset: str) -> str:
        digest = hashlib.sha1(self.prompt(dataset).encode()).hexdigest()[:12]
        return f"cirevl-edit-file-{digest}"

    def messages(self, dataset: str, description: str, modification: str) -> list[dict[str, Any]]:
        """CIReVL's request: the prompt, then ``Image Content:`` and ``Instruction:`` lines, as one user message."""
        text = f"{self.prompt(dataset)}\nImage Content: {description}\nInstruction: {modification}"
        return [{"role": "user", "content": text}]


def caption_key(dataset: str, reference: str) -> str:
    """Store key of a reference image's description."""
    return f"cirevl/{dataset}/{reference}"


def rewrite_key(dataset: str, *, reference: str, description: str, modification: str) -> str:
    """Store key of one rewrite: a digest of everything the LLM read, so a changed input never hits."""
    digest = hashlib.sha1(f"{reference}\0{description}\0{modification}".encode()).hexdigest()[:20]
    return f"cirevl-rewrite/{dataset}/{digest}"


def parse_edited_description(reply: str) -> str | None:
    """The text after the last ``Edited Description:`` marker (first line, quotes stripped), else None.

    The *last* marker wins because chatty models often restate the instruction before answering.
    """
    matches = list(_MARKER.finditer(reply))
    if not matches:
        return None
    rest = reply[matches[-1].end() :].strip()
    line = rest.splitlines()[0].strip() if rest else ""
    line = line.strip("\"'` ").strip()
    return line or None


def edit_messages(description: str, modification: str) -> list[dict[str, Any]]:
    """Chat messages of the rewrite request (our own prompt, see the module docstring)."""
    return [
        {"role": "system", "content": _EDIT_SYSTEM},
        {"role": "user", "content": _EDIT_USER.format(description=description, modification=modification)},
    ]


def _describe_messages() -> list[dict[str, Any]]:
    text = f"Question: {DESCRIBE_QUESTION}\nAnswer:"
    return [
        {"role": "system", "content": [{"type": "text", "text": _DESCRIBE_SYSTEM}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]},
    ]


_T = TypeVar("_T")


def _batches(items: Sequence[_T], size: int) -> list[Sequence[_T]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


class _Session:
    """The store, the lazily built backend and the report of one call of :func:`edited_descriptions`."""

    def __init__(
        self,
        store: CaptionStore,
        *,
        backend_name: str,
        make_backend: Callable[[], CaptionBackend],
        options: CirevlOptions,
        report: CirevlReport,
    ) -> None:
        self.store = store
        self.backend_name = backend_name
        self.make_backend = make_backend
        self.options = options
        self.report = report
        self.records = read_records(store.path) if store.path.is_file() else {}
        self.prompts = RewritePrompts(options.prompt_file) if options.prompt_file is not None else None
        self._backend: CaptionBackend | None = None
        self._model: dict[str, Any] = {}

    def backend(self) -> CaptionBackend:
        """Built on first use, so a fully cached run never loads a model or opens a connection."""
        if self._backend is None:
            self._backend = self.make_backend()
            self._model = self._backend.describe()
        return self._backend

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()

    def cached(self, key: str, version: str) -> dict[str, Any] | None:
        record = self.records.get(key)
        if record is None:
            return None
        if record.get("backend") != self.backend_name or record.get("prompt_version") != version:
            raise CaptionStoreMismatchError(
                f"key {key!r} was made by backend {record.get('backend')!r} with prompts "
                f"{record.get('prompt_version')!r}, but this run uses {self.backend_name!r} with {version!r}; "
                "give this run its own store",
                path=self.store.path,
            )
        return record

    def save(
        self,
        records: list[dict[str, Any]],
        failures: list[dict[str, Any]],
        *,
        stage: Literal["caption", "rewrite"],
    ) -> None:
        """Append a batch's records and failures to the store and count them in the report under ``stage``."""
        if stage == "caption":
            self.report.captions_new += len(records)
            self.report.caption_failures += len(failures)
        else:
            self.report.rewrites_new += len(records)
            self.report.rewrite_failures += len(failures)
        model, now = self._model, utc_now()
        full = [{**r, "backend": self.backend_name, "model": model, "created": now} for r in records]
        self.store.append(full)
        self.store.append_failures([{**f, "backend": self.backend_name, "created": now} for f in failures])
        self.records.update({r["key"]: r for r in full})

    def run(
        self,
        todo: Sequence[_T],
        *,
        stage: Literal["caption", "rewrite"],
        step: Callable[[CaptionBackend, Sequence[_T]], tuple[list[dict[str, Any]], list[dict[str, Any]]]],
    ) -> None:
        """Send ``todo`` to the backend batch by batch (``step`` turns one batch into records and failures),
        saving each batch as soon as it returns so an interrupted run loses at most one batch."""
        bar = tqdm(total=len(todo), desc=f"cirevl {stage}s", disable=not self.options.progress or not todo)
        for batch in _batches(todo, self.options.batch_size):
            records, failures = step(self.backend(), batch)
            self.report.model_calls += len(batch)
            self.save(records, failures, stage=stage)
            bar.update(len(batch))
        bar.close()


def _describe(
    session: _Session, *, dataset: str, references: list[str], load_image: Callable[[str], Image.Image]
) -> dict[str, str]:
    """reference -> description (cached or new); references whose request failed are left out."""
    out: dict[str, str] = {}
    todo = []
    for ref in references:
        record = session.cached(caption_key(dataset, ref), DESCRIBE_VERSION)
        if record is not None:
            out[ref] = str(record["caption"])
        else:
            todo.append(ref)
    session.report.captions_cached = len(out)

    def step(
        backend: CaptionBackend, batch: Sequence[str]
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        queries = [
            VisualQuery(
                image=load_image(ref).convert("RGB"),
                question=DESCRIBE_QUESTION,
                messages=_describe_messages(),
                context=ItemContext(key=caption_key(dataset, ref)),
            )
            for ref in batch
        ]
        replies = backend.answer(queries, max_tokens=session.options.max_caption_tokens)
        records, failures = [], []
        for ref, reply in zip(batch, replies, strict=True):
            key = caption_key(dataset, ref)
            text = trim_answer(reply.text) if reply.ok else ""
            if not text:
                if reply.ok:
                    session.report.empty_descriptions += 1
                failures.append({"key": key, "reason": f"description: {reply.error or 'empty reply'}"})
                continue
            qa = QA(q=DESCRIBE_QUESTION, a=text)
            records.append(
                {"key": key, "caption": text, "dialogue": [qa.to_dict()], "prompt_version": DESCRIBE_VERSION}
            )
            out[ref] = text
        return records, failures

    session.run(todo, stage="caption", step=step)
    return out


def _rewrite(
    session: _Session,
    *,
    dataset: str,
    pairs: list[tuple[str, str, str]],
) -> dict[str, tuple[str, bool]]:
    """rewrite key -> (edited description or the relative caption, parsed) for ``(ref, description, mod)``."""
    prompts = session.prompts
    version = prompts.version(dataset) if prompts is not None else EDIT_VERSION
    out: dict[str, tuple[str, bool]] = {}
    todo: dict[str, tuple[str, str, str, str]] = {}
    for ref, description, modification in pairs:
        key = rewrite_key(dataset, reference=ref, description=description, modification=modification)
        if key in out or key in todo:
            continue
        record = session.cached(key, version)
        if record is not None:
            out[key] = (str(record["caption"]), bool(record.get("parsed", True)))
        else:
            todo[key] = (key, ref, description, modification)
    session.report.rewrites_cached = len(out)

    def step(
        backend: CaptionBackend, batch: Sequence[tuple[str, str, str, str]]
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        requests = [
            ChatRequest(
                messages=prompts.messages(dataset, description, modification)
                if prompts is not None
                else edit_messages(description, modification),
                kind="edit",
                context=ItemContext(key=key),
                dialogue=(QA(q=DESCRIBE_QUESTION, a=description), QA(q="Requested change", a=modification)),
            )
            for key, _, description, modification in batch
        ]
        replies = backend.ask(requests, max_tokens=session.options.max_edit_tokens)
        records, failures = [], []
        for request, (key, ref, description, modification), reply in zip(
            requests, batch, replies, strict=True
        ):
            if not reply.ok:
                failures.append({"key": key, "reason": f"rewrite: {reply.error}", "reference": ref})
                continue
            edited = parse_edited_description(reply.text)
            parsed = edited is not None
            text = edited if edited is not None else modification
            records.append(
                {
                    "key": key,
                    "caption": text,
                    "dialogue": [{"q": request.messages[-1]["content"], "a": reply.text}],
                    "prompt_version": version,
                    "parsed": parsed,
                    "reference": ref,
                    "description": description,
                    "relative_caption": modification,
                }
            )
            out[key] = (text, parsed)
        return records, failures

    session.run(list(todo.values()), stage="rewrite", step=step)
    return out


def edited_descriptions(
    *,
    dataset: str,
    references: Sequence[str],
    modifications: Sequence[str],
    load_image: Callable[[str], Image.Image],
    backend_name: str,
    make_backend: Callable[[], CaptionBackend],
    options: CirevlOptions,
) -> tuple[list[str], CirevlReport]:
    """The edited description of every query ``(reference, modification)``, in order, with the run's counts.

    Args:
        dataset: namespace of the store keys (e.g. ``cirr``, ``fashioniq/dress``).
        references: reference image name per query (``load_image(name)`` opens it).
        modifications: the relative caption per query.
        backend_name: the caption backend's registry name, recorded in and checked against the store.
        make_backend: builds the backend; called only when something is not cached yet.
        options: store path, batch size, token limits.
    """
    if len(references) != len(modifications):
        raise ValueError(f"{len(references)} references but {len(modifications)} relative captions")
    if options.batch_size < 1:
        raise ConfigError(f"CIReVL batch size must be >= 1, got {options.batch_size}")
    if options.on_missing not in ("error", "text-only"):
        raise ConfigError(f"on_missing={options.on_missing!r}; valid: error, text-only")
    report = CirevlReport(
        references=len(set(references)),
        queries=len(references),
        backend=backend_name,
        store=str(options.store),
    )
    with CaptionStore(options.store) as store:
        session = _Session(
            store, backend_name=backend_name, make_backend=make_backend, options=options, report=report
        )
        try:
            descriptions = _describe(
                session, dataset=dataset, references=list(dict.fromkeys(references)), load_image=load_image
            )
            pairs = [(r, descriptions[r], m) for r, m in zip(references, modifications) if r in descriptions]
            rewrites = _rewrite(session, dataset=dataset, pairs=pairs)
        finally:
            session.close()
    out: list[str] = []
    for ref, modification in zip(references, modifications):
        key = (
            rewrite_key(dataset, reference=ref, description=descriptions[ref], modification=modification)
            if ref in descriptions
            else None
        )
        if key is None or key not in rewrites:
            report.missing += 1
            report.fallbacks += 1
            out.append(modification)
            continue
        text, parsed = rewrites[key]
        if not parsed:
            report.unparsed += 1
            report.fallbacks += 1
        out.append(text)
    if report.missing and options.on_missing == "error":
        raise CirevlIncompleteError(
            f"CIReVL on {dataset}: {report.missing} of {report.queries} queries have no edited description — "
            f"{len(set(references)) - len(descriptions)} of {report.references} reference images got no "
            f"description ({report.empty_descriptions} empty replies, {report.caption_failures} failed or empty "
            f"requests this run) and {report.rewrite_failures} rewrite requests failed; they are listed in "
            f"{store.failures_path} and a rerun retries only them. To score them with their relative caption "
            "alone instead, pass --on-missing text-only (counted as fallbacks).",
            report=report,
        )
    return out, report
