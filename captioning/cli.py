"""``capret-caption``: caption a dataset's items with a VLM/LLM dialogue into a resumable JSONL store.

Flags map onto :class:`CaptionConfig` (a ``capret.config`` dataclass); ``--config FILE.yaml`` sets the same
fields from YAML and ``--set key=value`` overrides any of them (``--set loop.view=box``). The command prints a
JSON summary (done, skipped, failed with reasons, tokens, rate) and exits 0, or 1 when some items failed
(they are in ``<out stem>.failures.jsonl`` and are retried by the next run), or 2 on a usage error.

Captions are functions of the pixels and the box by default. The category named in the prompts comes from a
category model (``--category-model DIR``, or ``--train-category-model`` to fit one, of ``--category-kind``
(default ``pixel-cnn``, the quickstart's), on this split's crops and save it to ``<out stem>.category_model/``;
this split's own captions then use cross-fitted, out-of-fold predictions, so they are as often wrong as those of
unseen items), else none. ``--oracle-attributes`` hands the annotation
(category, viewpoint, occlusion, scale, zoom) to the dialogue instead: an explicit oracle, recorded in every
record (``"oracle": true``) and in the summary.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from capret.config import ConfigError, cfg, from_dict, load_config, to_dict
from capret.console import add_debug_flag, print_json, run_guarded
from capret.progress import NO_PROGRESS_HELP, progress_enabled
from captioning.loop import LoopConfig

if TYPE_CHECKING:
    from captioning.category import CategoryModel, CategoryPrediction
    from captioning.prompts import PromptSet
    from captioning.store import CaptionStore

__all__ = [
    "CaptionConfig",
    "ClipOptions",
    "OpenAIOptions",
    "TransformersOptions",
    "build_parser",
    "main",
    "run",
]


@dataclass
class OpenAIOptions:
    """Options of the ``openai`` backend."""

    base_url: list[str] = cfg(
        factory=list, help="server base URLs ending in /v1; several are used round-robin"
    )
    api_key_env: str = cfg(
        "",
        "environment variable holding the API key (default: CAPRET_API_KEY; OPENAI_API_KEY only for the "
        "hosted API over https)",
    )
    concurrency: int = cfg(8, "requests in flight at once, over all servers")
    timeout: float = cfg(60.0, "seconds before a request counts as timed out (and is retried)")
    max_retries: int = cfg(5, "retries on 429/5xx/timeouts/connection errors/malformed bodies")
    temperature: float = cfg(0.0, "sampling temperature sent with every request")
    seed: int | None = cfg(None, "sampling seed sent with every request (servers that support it)")


@dataclass
class TransformersOptions:
    """Options of the ``transformers`` backend."""

    device: str = cfg("cpu", "torch device, e.g. cuda or cuda:1")
    dtype: str = cfg("auto", "model dtype: auto, float32, float16 or bfloat16")
    trust_remote_code: bool = cfg(False, "allow model repositories to run their own code")


@dataclass
class ClipOptions:
    """Options of the ``clip`` backend (its model, an exported CLIP folder, is ``vlm``)."""

    device: str = cfg("cpu", "torch device of the CLIP, e.g. cuda")
    batch_size: int = cfg(64, "crops per CLIP forward pass")


@dataclass
class CaptionConfig:
    """Everything ``capret-caption`` needs."""

    dataset: str = cfg("deepfashion2", "deepfashion2, demo, fashioniq, cirr, circo or images")
    root: Path | None = cfg(None, "dataset root folder")
    split: str | None = cfg(None, "split (default: validation for deepfashion2/demo, val otherwise)")
    category: str | None = cfg(
        None, "fashioniq category subset (default: all); images: a category name, read only by the oracle"
    )
    out: Path | None = cfg(None, "the JSONL caption store to write (resumed if it exists)")
    backend: str = cfg("template", "caption backend: template, transformers, openai or clip")
    vlm: str = cfg(
        "",
        "VLM: hub id or local folder (transformers) / served model name (openai) / exported CLIP folder (clip)",
    )
    llm: str = cfg("", "question/summary LLM (default: the VLM itself)")
    batch_size: int = cfg(8, "items per batch: one backend call per round serves the whole batch")
    overwrite: bool = cfg(False, "re-caption keys already in the store (later line wins, explicitly marked)")
    shard: str = cfg("0/1", "i/n: caption only shard i of n (stable hash of the key)")
    limit: int | None = cfg(None, "caption only the first N keys (after sharding, in key order)")
    prompt_version: str = cfg("capret-chat-v1", "built-in prompt set")
    prompt_file: Path | None = cfg(None, "YAML prompt set (overrides prompt_version)")
    progress: bool = cfg(True, "show a progress bar")
    engine: str = cfg("local", "local: this process; ray: Ray Data actors (the store is still written here)")
    ray_address: str | None = cfg(None, "Ray cluster address for --engine ray (default: a local Ray)")
    ray_actors: int = cfg(2, "caption actors (each builds the backend once) for --engine ray")
    ray_num_cpus: int | None = cfg(None, "CPUs of the local Ray (default: all)")
    on_bad_image: str = cfg(
        "error",
        "error: an unreadable image stops the run naming the file; skip: it is logged to the failures file and "
        "counted in the summary (bad_images)",
    )
    oracle_attributes: bool = cfg(
        False, "ORACLE: give the dialogue the annotated category, viewpoint, occlusion, scale and zoom"
    )
    category_model: Path | None = cfg(None, "category-model folder predicting the category named in prompts")
    train_category_model: bool = cfg(
        False, "fit a category model on this split's crops first (saved to <out stem>.category_model/)"
    )
    category_seconds: float = cfg(30.0, "time budget of --train-category-model (features + fitting)")
    category_kind: str = cfg(
        "pixel-cnn",
        "registered category model --train-category-model fits (pixel-cnn, as the quickstart; pixel-mlp)",
    )
    loop: LoopConfig = cfg(factory=LoopConfig, help="dialogue options")
    openai: OpenAIOptions = cfg(factory=OpenAIOptions, help="openai backend options")
    transformers: TransformersOptions = cfg(factory=TransformersOptions, help="transformers backend options")
    clip: ClipOptions = cfg(factory=ClipOptions, help="clip backend options")


# (flag, config key, argparse options)
_FLAGS: list[tuple[str, str, dict[str, Any]]] = [
    ("--dataset", "dataset", {"help": "what to caption"}),
    ("--root", "root", {"help": "dataset root folder"}),
    ("--split", "split", {"help": "split (default: validation for deepfashion2/demo, val otherwise)"}),
    ("--category", "category", {"help": "fashioniq category (default: all three)"}),
    ("--out", "out", {"help": "caption store (JSONL); an existing one is resumed"}),
    ("--backend", "backend", {"help": "caption backend"}),
    ("--vlm", "vlm", {"help": "VLM hub id / local folder (transformers) or served model name (openai)"}),
    ("--llm", "llm", {"help": "LLM for questions and summary (default: the VLM)"}),
    ("--batch-size", "batch_size", {"type": int, "help": "items per batch (default 8)"}),
    ("--shard", "shard", {"help": "i/n: this process captions shard i of n"}),
    ("--limit", "limit", {"type": int, "help": "caption only the first N keys"}),
    ("--rounds", "loop.rounds", {"type": int, "help": "question rounds after the description (default 8)"}),
    ("--view", "loop.view", {"choices": ["crop", "box"], "help": "crop with margin, or full image with box"}),
    ("--context-margin", "loop.context_margin", {"type": float, "help": "crop margin as box fraction"}),
    ("--max-question-tokens", "loop.max_question_tokens", {"type": int, "help": "token limit per question"}),
    ("--max-answer-tokens", "loop.max_answer_tokens", {"type": int, "help": "token limit per answer"}),
    ("--max-summary-tokens", "loop.max_summary_tokens", {"type": int, "help": "token limit of the caption"}),
    ("--category-model", "category_model", {"help": "category-model folder (predicts the prompt category)"}),
    ("--category-seconds", "category_seconds", {"type": float, "help": "budget of --train-category-model"}),
    ("--category-kind", "category_kind", {"help": "category model --train-category-model fits"}),
    ("--prompt-version", "prompt_version", {"help": "built-in prompt set (default capret-chat-v1)"}),
    ("--prompt-file", "prompt_file", {"help": "YAML prompt set"}),
    ("--base-url", "openai.base_url", {"action": "append", "help": "server base URL (repeat for several)"}),
    ("--api-key-env", "openai.api_key_env", {"help": "env var with the API key"}),
    ("--concurrency", "openai.concurrency", {"type": int, "help": "requests in flight (default 8)"}),
    ("--timeout", "openai.timeout", {"type": float, "help": "request timeout in seconds (default 60)"}),
    ("--max-retries", "openai.max_retries", {"type": int, "help": "retries per request (default 5)"}),
    ("--temperature", "openai.temperature", {"type": float, "help": "sampling temperature (default 0)"}),
    ("--device", "transformers.device", {"help": "torch device (default cpu)"}),
    (
        "--dtype",
        "transformers.dtype",
        {"choices": ["auto", "float32", "float16", "bfloat16"], "help": "dtype"},
    ),
    ("--engine", "engine", {"choices": ["local", "ray"], "help": "local (default) or ray (Ray Data actors)"}),
    ("--ray-address", "ray_address", {"help": "Ray cluster address (default: start a local Ray)"}),
    ("--ray-actors", "ray_actors", {"type": int, "help": "caption actors with --engine ray (default 2)"}),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="capret-caption",
        description="Caption dataset items with a VLM/LLM dialogue (ChatCaptioner-style) into a resumable "
        "JSONL store. Re-running the same command resumes: finished keys are skipped, failed ones retried.",
    )
    from captioning.backends import list_backends
    from captioning.category import list_category_models
    from captioning.sources import list_sources

    # the valid names come from the registries; they are checked by the library, whose error is one line
    registered = {
        "dataset": list_sources(),
        "backend": list_backends(),
        "category_kind": list_category_models(),
    }
    for flag, key, options in _FLAGS:
        if key in registered:
            options = {**options, "help": f"{options['help']}: {' | '.join(registered[key])}"}
        metavar = None if "choices" in options else flag[2:].upper().replace("-", "_")
        parser.add_argument(flag, dest=key, default=None, metavar=metavar, **options)
    parser.add_argument(
        "--overwrite",
        dest="overwrite",
        action="store_true",
        default=None,
        help="re-caption keys already in the store (the new line is marked and wins)",
    )
    parser.add_argument(
        "--oracle-attributes",
        dest="oracle_attributes",
        action="store_true",
        default=None,
        help="ORACLE: captions may read the annotation (category, viewpoint, ...); records say oracle: true",
    )
    parser.add_argument(
        "--train-category-model",
        dest="train_category_model",
        action="store_true",
        default=None,
        help="fit a category model on this split's crops, save it beside --out, and caption with it",
    )
    parser.add_argument(
        "--trust-remote-code",
        dest="transformers.trust_remote_code",
        action="store_true",
        default=None,
        help="let model repositories run their own code (transformers)",
    )
    parser.add_argument(
        "--no-progress", dest="progress", action="store_false", default=None, help=NO_PROGRESS_HELP
    )
    parser.add_argument(
        "--on-bad-image",
        dest="on_bad_image",
        choices=["error", "skip"],
        default=None,
        help="an unreadable image: stop naming it (error, default) or log it and go on (skip)",
    )
    parser.add_argument(
        "--repair",
        action="store_true",
        default=False,
        help="rewrite the store at --out so every key is unique (first line of each key wins) and exit",
    )
    parser.add_argument("--config", type=Path, default=None, help="YAML file of CaptionConfig fields")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config field, e.g. --set loop.max_reasks=3",
    )
    add_debug_flag(parser)
    return parser  # fmt: skip


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        out[key] = (
            _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


def config_from_args(args: argparse.Namespace) -> CaptionConfig:
    """Defaults <- --config YAML <- --set overrides <- explicit flags."""
    config = load_config(CaptionConfig, args.config, args.overrides)
    flags = {
        k: v
        for k, v in vars(args).items()
        if v is not None and k not in ("config", "overrides", "debug", "repair")
    }
    config = from_dict(CaptionConfig, _merge(to_dict(config), _nest(flags)))
    if config.root is None and not getattr(args, "repair", False):
        raise ConfigError("--root is required (the dataset folder)")
    if config.out is None:
        raise ConfigError("--out is required (the JSONL caption store)")
    return config


def _backend_options(config: CaptionConfig) -> dict[str, Any]:
    """Each backend's own keyword options (explicit per backend: no kwargs tunnel)."""
    if config.backend == "template":
        return {}
    if config.backend == "transformers":
        t = config.transformers
        return {"vlm": config.vlm, "llm": config.llm or None, "device": t.device, "dtype": t.dtype,
                "trust_remote_code": t.trust_remote_code}  # fmt: skip
    if config.backend == "openai":
        o = config.openai
        return {"base_urls": o.base_url, "vlm": config.vlm, "llm": config.llm or None,
                "api_key_env": o.api_key_env or None, "concurrency": o.concurrency, "timeout": o.timeout,
                "max_retries": o.max_retries, "temperature": o.temperature, "seed": o.seed}  # fmt: skip
    if config.backend == "clip":
        if not config.vlm:
            raise ConfigError("--backend clip needs --vlm FOLDER: a CLIP exported by capret-train task clip")
        return {"model": config.vlm, "device": config.clip.device, "batch_size": config.clip.batch_size}
    from captioning.backends import list_backends

    raise ConfigError(f"unknown backend {config.backend!r}; valid backends: {', '.join(list_backends())}")


def check_ranges(config: CaptionConfig) -> None:
    """Refuse numeric settings outside their range, naming the option and the value (``--concurrency -1``
    or ``--timeout nan`` would otherwise stall, spin or retry forever instead of failing at once)."""
    import math

    def need(flag: str, value: Any, ok: bool, valid: str) -> None:
        if not ok:
            raise ConfigError(f"{flag} must be {valid}, got {value!r}")

    def finite(value: Any) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)

    need("--batch-size", config.batch_size, finite(config.batch_size) and config.batch_size >= 1, ">= 1")
    need("--concurrency", config.openai.concurrency,
         finite(config.openai.concurrency) and config.openai.concurrency >= 1, ">= 1")  # fmt: skip
    need("--timeout", config.openai.timeout, finite(config.openai.timeout) and config.openai.timeout > 0,
         "a finite number of seconds > 0")  # fmt: skip
    need("--max-retries", config.openai.max_retries,
         finite(config.openai.max_retries) and config.openai.max_retries >= 0, ">= 0")  # fmt: skip
    need("--temperature", config.openai.temperature,
         finite(config.openai.temperature) and config.openai.temperature >= 0, "a finite number >= 0")  # fmt: skip
    need("clip.batch_size", config.clip.batch_size, finite(config.clip.batch_size) and config.clip.batch_size >= 1,
         ">= 1")  # fmt: skip
    if config.category_seconds is not None:
        need("--category-seconds", config.category_seconds,
             finite(config.category_seconds) and config.category_seconds > 0, "a finite number > 0")  # fmt: skip


def run(config: CaptionConfig) -> dict[str, Any]:
    """Caption ``config.dataset`` into ``config.out``; returns the run summary as a dict."""
    from captioning.category import category_model_dir, fit_category_model_on_targets, load_category_model
    from captioning.prompts import get_prompt_set, load_prompt_set
    from captioning.sources import create_source, parse_shard, select_shard, store_binding
    from captioning.store import CaptionStore

    assert config.root is not None and config.out is not None
    check_ranges(config)  # before the store is opened: a refused run leaves nothing behind
    prompts = (
        load_prompt_set(config.prompt_file) if config.prompt_file else get_prompt_set(config.prompt_version)
    )
    shard_index, shard_count = parse_shard(config.shard)
    if config.limit is not None and config.limit < 0:
        raise ConfigError(f"--limit must be >= 0, got {config.limit}")
    options = _backend_options(config)
    from capret.data.imagefile import check_bad_image_policy

    check_bad_image_policy(config.on_bad_image)
    progress = progress_enabled(config.progress)
    targets = create_source(
        config.dataset, root=config.root, split=config.split, category=config.category, progress=progress
    )
    # the store is bound to the whole split (computed before sharding, so every shard carries the same value)
    binding = store_binding(config.dataset, config.split, targets)
    targets = select_shard(targets, shard_index, shard_count)
    if config.limit is not None:
        targets = targets[: config.limit]
    if config.oracle_attributes and (config.category_model or config.train_category_model):
        raise ConfigError(
            "--oracle-attributes uses the annotated category; drop --category-model/--train-category-model"
        )
    if config.category_model and config.train_category_model:
        raise ConfigError("--category-model and --train-category-model exclude each other")
    # The store holds the one-writer lock: open it before anything beside --out (the category model) is written.
    with CaptionStore(config.out, overwrite=config.overwrite, binding=binding) as store:
        if store.truncated_tail:
            print(
                f"warning: {config.out} ended in a partial line of {len(store.truncated_tail)} bytes (a killed "
                "run); it was removed and its item will be captioned again",
                file=sys.stderr,
            )
        category_model = None
        cross_fitted = None
        category_report: dict[str, Any] = {}
        if config.train_category_model:
            folder = category_model_dir(config.out)
            category_model, cross_fitted = fit_category_model_on_targets(
                targets,
                out_dir=folder,
                kind=config.category_kind,
                max_seconds=config.category_seconds,
                progress=progress,
            )
            category_report = {
                "category_model": str(folder),
                "category_model_metrics": category_model.metrics,
            }
        elif config.category_model:
            category_model = load_category_model(config.category_model)
            category_report = {"category_model": str(config.category_model)}
        work = _Work(
            store=store,
            prompts=prompts,
            config=config.loop,
            batch_size=config.batch_size,
            on_bad_image=config.on_bad_image,
            category_model=category_model,
            cross_fitted=cross_fitted,
            oracle=config.oracle_attributes,
        )
        if config.engine == "ray":
            from captioning.ray_engine import caption_targets_ray

            if config.ray_actors < 1:
                raise ConfigError(f"--ray-actors must be >= 1, got {config.ray_actors}")
            summary = caption_targets_ray(
                targets,
                backend=config.backend,
                options=options,
                actors=config.ray_actors,
                address=config.ray_address,
                num_cpus=config.ray_num_cpus,
                **work,
            )
        elif config.engine != "local":
            raise ConfigError(f"unknown engine {config.engine!r}; valid: local, ray")
        elif config.ray_address:
            raise ConfigError("--ray-address needs --engine ray")
        else:
            summary = _caption_local(config, targets, options=options, work=work)
    result = {
        "out": str(config.out),
        "failures_file": str(store.failures_path),
        **summary.to_dict(),
        "oracle": config.oracle_attributes,
        **category_report,
    }
    return result


class _Work(TypedDict):
    """What the local and the Ray engine both take: where captions go, how the dialogue runs, and how items are
    read and named (so a flag reaches both engines alike)."""

    store: CaptionStore
    prompts: PromptSet
    config: LoopConfig
    batch_size: int
    on_bad_image: str
    category_model: CategoryModel | None
    cross_fitted: Mapping[str, CategoryPrediction] | None
    oracle: bool


def _caption_local(config: CaptionConfig, targets: Any, *, options: dict[str, Any], work: _Work) -> Any:
    """The local engine: the backend and the runner in this process."""
    from captioning.backends import create_backend
    from captioning.runner import caption_targets

    with create_backend(config.backend, **options) as backend:
        summary = caption_targets(
            targets, backend=backend, progress=progress_enabled(config.progress), **work
        )
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        if args.repair:
            from captioning.store import repair_store

            out = getattr(args, "out", None)
            if out is None:
                raise ConfigError("--repair needs --out (the caption store to rewrite)")
            print_json({"out": str(out), **repair_store(out)})
            return 0
        summary = run(config_from_args(args))
        print_json(summary)
        return 1 if summary["failed"] else 0

    return run_guarded(body, debug=args.debug or None)


if __name__ == "__main__":
    raise SystemExit(main())
