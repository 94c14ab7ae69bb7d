"""CIReVL (caption -> LLM rewrite -> CLIP text-to-image) through ``capret-eval --method cirevl``.

End to end on a tiny CLIP and tiny CIRR / FashionIQ layouts, with the model-free ``template`` backend and with a
loopback OpenAI-compatible server whose requests are counted: a rerun must make zero model calls, an
unparseable rewrite must fall back to the relative caption and be counted, and a failed request must be
retried by the next run.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tiny_cir import make_tiny_clip, write_cirr, write_fashioniq  # noqa: E402

from capret.cli import eval as eval_cli  # noqa: E402
from capret.errors import ConfigError  # noqa: E402
from capret.inference.cir.cirevl import (  # noqa: E402
    CirevlIncompleteError,
    CirevlOptions,
    RewritePrompts,
    edited_descriptions,
    parse_edited_description,
    rewrite_key,
)
from capret.testing import ChatServer, reply_for  # noqa: E402
from captioning.store import read_records  # noqa: E402

REFUSE = "longer"  # rewrites of relative captions containing this word get a reply without the marker


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("cirevl")
    return {
        "clip": make_tiny_clip(base / "clip"),
        "cirr": write_cirr(base / "cirr"),
        "fiq": write_fashioniq(base / "fiq", categories=("dress",)),
    }


def _cirr_argv(world: dict[str, Path]) -> list[str]:
    """``capret-eval`` arguments of CIReVL on the tiny CIRR split with the tiny CLIP."""
    return [
        "--dataset",
        "cirr",
        "--method",
        "cirevl",
        "--root",
        str(world["cirr"]),
        "--clip",
        str(world["clip"]),
    ]


def _eval(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    capsys.readouterr()
    code = eval_cli.main([*argv, "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def _editor(payload: dict[str, Any], *, refuse: str | None = REFUSE) -> str:
    """An "LLM" that edits descriptions (and refuses some), else the default loopback replies."""
    system = " ".join(str(m["content"]) for m in payload["messages"] if m["role"] == "system")
    if "edit image descriptions" not in system:
        return reply_for(payload)
    user = payload["messages"][-1]["content"]
    description = re.search(r"Image description: (.*)", user).group(1)  # type: ignore[union-attr]
    change = re.search(r"Requested change: (.*)", user).group(1)  # type: ignore[union-attr]
    if refuse is not None and refuse in change.split():
        return "I am not able to help with that."
    return f'Here is the result.\nEdited Description: "{description.rstrip(".")} that {change}"'


def test_parse_edited_description() -> None:
    assert parse_edited_description("Edited Description: a red dress") == "a red dress"
    assert parse_edited_description("sure\nedited description:  'two dogs'\nthanks") == "two dogs"
    text = "Write a line 'Edited Description: ...'.\nEdited Description: a cat on a sofa"
    assert parse_edited_description(text) == "a cat on a sofa"  # the last marker wins
    assert parse_edited_description("A red dress.") is None
    assert parse_edited_description("Edited Description:   ") is None


def test_template_backend_end_to_end_and_cached_rerun(world, tmp_path, capsys) -> None:
    argv = _cirr_argv(world)
    first = _eval([*argv, "--captioner", "template", "--out", str(tmp_path / "o")], capsys)
    report = first["report"]["total"]
    assert report["queries"] == 10 and report["fallbacks"] == 0 and report["unparsed"] == 0
    assert report["model_calls"] == report["captions_new"] + report["rewrites_new"] > 10
    for name in ("recall@1", "recall@50", "recall_subset@1", "r5_rs1_mean"):
        assert 0.0 <= first["metrics"][name] <= 1.0
    assert set(first["baselines"]) == {"image-only", "text-only", "sum"}
    assert first["gallery"] == {"images": "whole split", "reference_removed": True, "size": 69}
    store = tmp_path / "o" / "cirevl_template.jsonl"
    records = read_records(store)
    rewrites = [r for k, r in records.items() if k.startswith("cirevl-rewrite/cirr/")]
    assert len(rewrites) == report["rewrites_new"] and all(r["parsed"] for r in rewrites)
    assert all(r["caption"].endswith(r["relative_caption"].rstrip(".") + ".") for r in rewrites)

    again = _eval([*argv, "--captioner", "template", "--out", str(tmp_path / "o")], capsys)
    assert again["report"]["total"]["model_calls"] == 0
    assert again["metrics"] == first["metrics"] and again["baselines"] == first["baselines"]
    assert read_records(store) == records  # nothing appended


def test_openai_server_counts_requests_fallbacks_and_rerun(world, tmp_path, capsys) -> None:
    argv = [
        "--dataset",
        "fashioniq",
        "--category",
        "dress",
        "--method",
        "cirevl",
        "--root",
        str(world["fiq"]),
    ]
    argv += [
        "--clip",
        str(world["clip"]),
        "--captioner",
        "openai",
        "--vlm",
        "tiny-vlm",
        "--out",
        str(tmp_path),
    ]
    with ChatServer(responder=_editor) as server:
        first = _eval([*argv, "--base-url", server.base_url], capsys)
        sent = server.requests
        again = _eval([*argv, "--base-url", server.base_url], capsys)
        assert server.requests == sent  # the rerun made no request at all
    total = first["report"]["total"]
    assert sent == total["model_calls"] == total["captions_new"] + total["rewrites_new"]
    triplets = json.loads((world["fiq"] / "captions" / "cap.dress.val.json").read_text())
    assert total["captions_new"] == len({t["candidate"] for t in triplets})
    refused = sum(
        REFUSE in " and ".join(c.strip(".?, ") for c in t["captions"]).lower().split() for t in triplets
    )
    assert total["unparsed"] == total["fallbacks"] == refused == 4
    assert again["report"]["total"] == {**total, "model_calls": 0, "captions_new": 0, "rewrites_new": 0}
    assert again["metrics"] == first["metrics"]
    records = read_records(tmp_path / "cirevl_openai.jsonl")
    descriptions = [r for k, r in records.items() if k.startswith("cirevl/fashioniq/dress/")]
    assert descriptions and all(r["caption"].startswith("It looks") for r in descriptions)  # run-on cut
    unparsed = [r for r in records.values() if r.get("parsed") is False]
    assert len(unparsed) == len({(r["reference"], r["relative_caption"]) for r in unparsed})
    assert all(r["caption"] == r["relative_caption"] for r in unparsed)


def test_failed_requests_are_an_error_then_retried(world, tmp_path) -> None:
    """A query left without an edited description stops the run (nothing silently becomes text-only); the
    finished records are kept, ``on_missing="text-only"`` opts into the fallback, and a rerun retries only it."""
    from dataclasses import replace

    from capret.data.cirr import CIRR
    from captioning.backends import create_backend

    ds = CIRR(world["cirr"], "val")
    refs = [t.reference for t in ds.triplets][:4]
    mods = [t.caption for t in ds.triplets][:4]
    options = CirevlOptions(store=tmp_path / "store.jsonl", batch_size=8, progress=False)
    failing = refs[1]

    with ChatServer(responder=lambda p: _editor(p, refuse=None)) as server:

        def make() -> Any:
            return create_backend("openai", base_urls=[server.base_url], vlm="m", max_retries=0)

        def fault(payload: dict[str, Any]) -> str | None:  # the rewrite of one query is rejected
            system, user = payload["messages"][0]["content"], payload["messages"][-1]["content"]
            edit = isinstance(system, str) and "edit image" in system
            return "400" if edit and f"Requested change: {mods[1]}\n" in user else None

        server.fault_fn = fault
        args = dict(dataset="cirr", references=refs, modifications=mods, load_image=ds.load_image,
                    backend_name="openai", make_backend=make)  # fmt: skip
        with pytest.raises(CirevlIncompleteError, match="1 of 4 queries have no edited description") as err:
            edited_descriptions(**args, options=options)
        assert "1 rewrite requests failed" in str(err.value) and "store.failures.jsonl" in str(err.value)
        assert err.value.report.rewrite_failures == 1 and err.value.report.missing == 1
        failures = (tmp_path / "store.failures.jsonl").read_text().splitlines()
        assert len(failures) == 1 and failing in failures[0]

        before = server.requests
        texts, report = edited_descriptions(**args, options=replace(options, on_missing="text-only"))
        assert server.requests - before == report.model_calls == 1  # only the failed rewrite, failing again
        assert report.missing == report.fallbacks == 1 and report.unparsed == 0
        assert texts[1] == mods[1] and all(texts[i] != mods[i] for i in (0, 2, 3))

        server.fault_fn = None
        before = server.requests
        texts2, report2 = edited_descriptions(**args, options=options)
        assert server.requests - before == report2.model_calls == 1  # only the failed rewrite
        assert report2.fallbacks == 0 and texts2[0] == texts[0] and texts2[1] != mods[1]
    records = read_records(tmp_path / "store.jsonl")
    description = records[f"cirevl/cirr/{refs[1]}"]["caption"]
    key = rewrite_key("cirr", reference=refs[1], description=description, modification=mods[1])
    assert records[key]["caption"] == texts2[1]


def test_an_empty_description_is_an_error_counted_and_shown(world, tmp_path, capsys) -> None:
    """An empty caption (what a BLIP-2 Flan-T5 gave when its tokens were cut) is never a silent text-only query."""

    def blank_descriptions(payload: dict[str, Any]) -> str:
        has_image = any(
            isinstance(m["content"], list) and any(p.get("type") == "image_url" for p in m["content"])
            for m in payload["messages"]
        )
        return "" if has_image else _editor(payload)

    argv = [*_cirr_argv(world), "--captioner", "openai", "--vlm", "m", "--out", str(tmp_path / "o")]
    with ChatServer(responder=blank_descriptions) as server:
        capsys.readouterr()
        code = eval_cli.main([*argv, "--base-url", server.base_url, "--device", "cpu"])
        err = capsys.readouterr().err
        assert code == 2
        assert "10 of 10 queries have no edited description" in err and "empty replies" in err
        assert "--on-missing text-only" in err
        out = _eval([*argv, "--base-url", server.base_url, "--on-missing", "text-only"], capsys)
    total = out["report"]["total"]
    assert total["fallbacks"] == total["queries"] == 10
    assert out["report"]["units"]["cirr"]["empty_descriptions"] > 0


def test_per_dataset_prompt_file_and_generation_settings(world, tmp_path, capsys) -> None:
    """The paper's form: prompt, then "Image Content:" and "Instruction:" lines in one user message."""
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"cirr": "You rewrite CIRR captions.", "default": "Generic prompt."}))
    seen: list[dict[str, Any]] = []

    def paper_editor(payload: dict[str, Any]) -> str:
        seen.append(payload)
        user = payload["messages"][-1]["content"]
        if isinstance(user, str) and "Image Content:" in user:
            content = re.search(r"Image Content: (.*)", user).group(1)  # type: ignore[union-attr]
            return f"Edited Description: {content} but changed"
        return reply_for(payload)

    argv = [*_cirr_argv(world), "--captioner", "openai", "--vlm", "m", "--out", str(tmp_path / "o"),
            "--prompt-file", str(prompts), "--rewrite-max-tokens", "700", "--caption-max-tokens", "40"]  # fmt: skip
    with ChatServer(responder=paper_editor) as server:
        out = _eval([*argv, "--base-url", server.base_url], capsys)
    rewrites = [p for p in seen if "Instruction:" in str(p["messages"][-1]["content"])]
    assert rewrites and all(len(p["messages"]) == 1 and p["messages"][0]["role"] == "user" for p in rewrites)
    assert all(
        str(p["messages"][0]["content"]).startswith("You rewrite CIRR captions.\nImage Content: ")
        for p in rewrites
    )
    assert {p["max_tokens"] for p in rewrites} == {700}
    assert {p["max_tokens"] for p in seen if p not in rewrites} == {40}
    assert out["report"]["total"]["fallbacks"] == 0
    records = read_records(tmp_path / "o" / "cirevl_openai.jsonl")
    versions = {r["prompt_version"] for k, r in records.items() if k.startswith("cirevl-rewrite/")}
    assert len(versions) == 1 and versions.pop().startswith("cirevl-edit-file-")
    assert RewritePrompts(prompts).prompt("fashioniq/dress") == "Generic prompt."
    prompts.write_text(json.dumps({"circo": "x"}))
    with pytest.raises(ConfigError, match="no rewrite prompt for dataset 'cirr'"):
        RewritePrompts(prompts).prompt("cirr")


def test_store_of_another_backend_is_refused(world, tmp_path, capsys) -> None:
    argv = _cirr_argv(world)
    store = tmp_path / "shared.jsonl"
    _eval(
        [*argv, "--captioner", "template", "--caption-store", str(store), "--out", str(tmp_path / "a")],
        capsys,
    )
    with ChatServer() as server:
        code = eval_cli.main(
            [*argv, "--captioner", "openai", "--vlm", "m", "--base-url", server.base_url,
             "--caption-store", str(store), "--out", str(tmp_path / "b"), "--device", "cpu"]
        )  # fmt: skip
        assert server.requests == 0
    assert code == 2
    assert "give this run its own store" in capsys.readouterr().err


@pytest.mark.slow
def test_transformers_backend_local_models(world, tmp_path, capsys, monkeypatch) -> None:
    """Tiny random LLaVA (describes) + Llama (rewrites) through ``--captioner transformers``; the rerun loads
    neither model."""
    from tiny_vlm import build_tiny_llama, build_tiny_llava

    from captioning.backends import transformers_backend

    llava, llama = build_tiny_llava(tmp_path / "llava"), build_tiny_llama(tmp_path / "llama")
    argv = [*_cirr_argv(world),
            "--captioner", "transformers", "--vlm", str(llava), "--llm", str(llama), "--captioner-dtype", "float32",
            "--out", str(tmp_path / "o")]  # fmt: skip
    first = _eval(argv, capsys)
    total = first["report"]["total"]
    assert total["queries"] == 10 and total["model_calls"] > 0
    # random weights rarely write the marker: every unparsed reply is counted as a fallback
    assert total["fallbacks"] >= total["unparsed"]
    loaded = []
    original = transformers_backend.TransformersBackend.__init__

    def spy(self, **kwargs):  # type: ignore[no-untyped-def]
        loaded.append(kwargs)
        original(self, **kwargs)

    monkeypatch.setattr(transformers_backend.TransformersBackend, "__init__", spy)
    again = _eval(argv, capsys)
    assert loaded == [] and again["report"]["total"]["model_calls"] == 0
    assert again["metrics"] == first["metrics"]
