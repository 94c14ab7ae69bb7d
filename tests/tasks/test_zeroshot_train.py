"""``capret oti`` then ``capret-train`` tasks ``phi``, ``pic2word`` and ``lincir`` on tiny CLIPs of both families,
and the trained mappers loaded back for composed queries."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from repo_paths import CONFIGS
from tiny_zeroshot import (
    tiny_hf_clip,
    tiny_open_clip,
    write_caption_store,
    write_image_folder,
    write_phrase_file,
    write_shards,
)

import capret
from capret.cli import main as capret_cli
from capret.cli import train as train_cli
from capret.config import from_dict
from capret.data.image_sources import open_image_source
from capret.inference.cir.features import encode_images
from capret.inference.cir.inversion import (
    fashioniq_caption_variants,
    load_zeroshot_model,
    searle_oti_query_features,
)
from capret.inference.cir.oti import TokenStore
from capret.io import resolve_model_folder
from capret.models.folder import folder_kind
from capret.models.zeroshot import upgrade_config_dict
from capret.tasks.lincir import LinCIRTaskConfig
from capret.tasks.pic2word import Pic2WordTaskConfig
from capret.tasks.searle_phi import PhiTaskConfig

pytestmark = pytest.mark.usefixtures("one_thread")
QUIET = ["trainer.progress=false", "trainer.tensorboard=false", "trainer.amp=off", "trainer.num_workers=0",
         "trainer.log_every=1", "trainer.epochs=null"]  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("zeroshot")
    return {
        "base": base,
        "hf": tiny_hf_clip(base / "hf"),
        "open_clip": tiny_open_clip(base / "oc"),
        "images": write_image_folder(base / "images", n=6),
        "shards": write_shards(base / "shards", n=6),
        "phrases": write_phrase_file(base / "phrases.json"),
    }


def _json(fn: Any, argv: list[str], capsys: pytest.CaptureFixture) -> dict[str, Any]:
    capsys.readouterr()
    code = fn(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def _flat_task_dict(task: dict[str, Any]) -> dict[str, Any]:
    """The sidecar ``config.task`` as the first, flat-keyed versions of these tasks wrote it (written out by hand,
    not by inverting the upgrade's table)."""
    data, model, loss = dict(task["data"]), dict(task["model"]), dict(task["loss"])
    clip = dict(model.pop("clip"))
    flat: dict[str, Any] = {
        "task": task["task"],
        "clip": {k: clip[k] for k in ("backend", "name", "pretrained")},
        **(
            {}
            if task["task"] == "lincir"
            else {"preprocess": clip["preprocess"], "target_ratio": clip["target_ratio"]}
        ),
        # data.keywords (LinCIR's span finder) came after the flat configs: they used the word lists
        **{k: v for k, v in data.items() if k not in ("encode_batch_size", "keywords")},
        "eval_batch_size": data["encode_batch_size"],
        **model,
        **loss,
        "lr": task["trainer"]["lr"],
        "weight_decay": task["trainer"]["weight_decay"],
        "trainer": {**task["trainer"], "lr": 0.5, "weight_decay": 0.5},  # the old tasks ignored these two
        "zeroshot": task["zeroshot"],
    }
    if task["task"] == "lincir":
        flat["feature_cache"] = None  # carried, unused, by the old lincir config
    return flat


def _assert_flat_sidecar_loads(run: Path, config_cls: type, tmp: Path) -> None:
    """A copy of the run's checkpoint with its sidecar rewritten to the flat form loads to the same model."""
    import shutil

    source = resolve_model_folder(run)
    copy = tmp / f"flat_{run.name}"
    shutil.copytree(source, copy)
    sidecar = json.loads((copy / "checkpoint.json").read_text())
    task = sidecar["config"]["task"]
    flat = _flat_task_dict(task)
    assert "data" not in flat and "model" not in flat and ("images" in flat or "captions" in flat)
    sidecar["config"]["task"] = flat
    (copy / "checkpoint.json").write_text(json.dumps(sidecar))

    upgraded = upgrade_config_dict(flat)
    if "keywords" in task["data"]:  # what the flat configs did is the word-list spans
        upgraded["data"]["keywords"] = task["data"]["keywords"]
    assert from_dict(config_cls, {k: v for k, v in upgraded.items() if k != "zeroshot"}) == from_dict(
        config_cls, {k: v for k, v in task.items() if k != "zeroshot"}
    )

    new, old = load_zeroshot_model(source), load_zeroshot_model(copy)
    assert old.method == new.method and old.placeholder == new.placeholder
    assert old.clip_config == new.clip_config and old.clip.preprocess_id == new.clip.preprocess_id
    features = torch.randn(2, new.clip.feature_dim)
    captions = ["is red", "has stripes"]
    torch.testing.assert_close(
        old.query_features(reference_features=features, captions=captions),
        new.query_features(reference_features=features, captions=captions),
    )
    # the exported model folder (<run>/model, kind = the task) is the last checkpoint's model
    assert folder_kind(run / "model") == task["task"]
    exported = capret.load(run, device="cpu")
    assert exported.method == new.method and exported.clip_config == new.clip_config
    torch.testing.assert_close(
        exported.query_features(reference_features=features, captions=captions),
        new.query_features(reference_features=features, captions=captions),
    )


def test_oti_cli_then_phi(world: dict[str, Any], capsys: pytest.CaptureFixture) -> None:
    tokens = world["base"] / "oti" / "tokens.safetensors"
    oti_argv = ["oti", "--clip-backend", "open_clip", "--clip", world["open_clip"], "--images", str(world["images"]),
                "--out", str(tokens), "--phrases", str(world["phrases"]), "--steps", "4", "--batch-size", "3",
                "--top-k", "2", "--no-progress"]  # fmt: skip
    report = _json(capret_cli.main, oti_argv, capsys)
    assert report["inverted"] == 6 and report["images"] == 6 and Path(report["store"]) == tokens
    assert _json(capret_cli.main, oti_argv, capsys)["inverted"] == 0  # resumed: nothing left

    out = world["base"] / "phi_run"
    summary = _json(
        train_cli.main,
        ["--config", str(CONFIGS / "searle_phi_demo.yaml"), "model.clip.backend=open_clip",
         f"model.clip.name={world['open_clip']}", "model.clip.pretrained=null", f"data.images={world['images']}",
         f"data.tokens={tokens}", f"data.phrases={world['phrases']}", "loss.top_k_concepts=2", "data.batch_size=3", f"trainer.output_dir={out}", "trainer.max_steps=3", *QUIET],
        capsys,
    )  # fmt: skip
    assert summary["steps"] == 3
    rows = (out / "train_log.csv").read_text().splitlines()
    assert "distil" in rows[0] and "gpt" in rows[0] and len(rows) == 4

    model = load_zeroshot_model(out)
    assert model.method == "searle" and model.placeholder == "$"
    source = open_image_source(world["images"])
    feats = encode_images(model.clip, source.keys[:2], load_image=source.load)
    queries = model.query_features(
        reference_features=feats, captions=[fashioniq_caption_variants("is red", "has stripes"), ["is blue"]]
    )
    assert queries.shape == (2, model.clip.feature_dim)
    torch.testing.assert_close(queries.norm(dim=-1), torch.ones(2))
    store = TokenStore(tokens, token_width=model.clip.token_width)
    oti_queries = searle_oti_query_features(
        model.clip, tokens=store.lookup(source.keys[:2]), captions=["a", "b"]
    )
    assert oti_queries.shape == (2, model.clip.feature_dim)
    _assert_flat_sidecar_loads(out, PhiTaskConfig, world["base"])


def test_pic2word_on_shards_with_hf_clip(world: dict[str, Any], capsys: pytest.CaptureFixture) -> None:
    out = world["base"] / "p2w_run"
    _json(
        train_cli.main,
        ["--config", str(CONFIGS / "pic2word_demo.yaml"), "model.clip.backend=hf", f"model.clip.name={world['hf']}",
         "model.clip.pretrained=null", f"data.images={world['shards']}", "data.batch_size=3", "loss.prompt=$ photo",
         "model.placeholder=$",
         f"trainer.output_dir={out}", "trainer.max_steps=3", "trainer.warmup_steps=0", *QUIET],
        capsys,
    )  # fmt: skip
    losses = [float(r.split(",")[2]) for r in (out / "train_log.csv").read_text().splitlines()[1:]]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    model = load_zeroshot_model(out)
    assert model.method == "pic2word"
    queries = model.query_features(
        reference_features=torch.randn(2, model.clip.feature_dim), captions=["x", "y"]
    )
    assert queries.shape == (2, model.clip.feature_dim)
    assert model.clip_config["preprocess"] == "none"
    _assert_flat_sidecar_loads(out, Pic2WordTaskConfig, world["base"])


def test_lincir_on_a_caption_store(world: dict[str, Any], capsys: pytest.CaptureFixture) -> None:
    captions = write_caption_store(
        world["base"] / "captions.jsonl",
        [
            "a red dress with short sleeves",
            "two dogs playing in the snow",
            "a man riding a horse",
            "a blue shirt",
        ],
    )
    out = world["base"] / "lincir_run"
    _json(
        train_cli.main,
        ["--config", str(CONFIGS / "lincir_demo.yaml"), "model.clip.backend=open_clip",
         f"model.clip.name={world['open_clip']}", "model.clip.pretrained=null", f"data.captions={captions}",
         "data.batch_size=2", f"trainer.output_dir={out}",
         "trainer.max_steps=4", "trainer.warmup_steps=0", *QUIET],
        capsys,
    )  # fmt: skip
    assert len((out / "train_log.csv").read_text().splitlines()) == 5
    model = load_zeroshot_model(out)
    assert model.method == "lincir" and model.mapper.hparams["input_dim"] == model.clip.feature_dim
    queries = model.query_features(
        reference_features=torch.randn(3, model.clip.feature_dim), captions=["a", "b", "c"]
    )
    assert queries.shape == (3, model.clip.feature_dim)
    _assert_flat_sidecar_loads(out, LinCIRTaskConfig, world["base"])


def _phrase_reply(payload: dict[str, Any]) -> str:
    """A loopback 'LLM' that writes two phrases about the concept named in the prompt."""
    import re

    prompt = payload["messages"][-1]["content"]
    prompt = prompt if isinstance(prompt, str) else prompt[0]["text"]
    concept = re.search(r"a photo of (.+?)\. Every", prompt).group(1)  # type: ignore[union-attr]
    return f"1. a {concept} on a wooden table\n2. a close view of the {concept}\nno concept here"


def test_oti_phrases_from_an_openai_compatible_server(
    world: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from capret.testing import ChatServer

    concepts = tmp_path / "concepts.txt"
    concepts.write_text("dog\nred dress\n# a comment\ncat\n")
    with ChatServer(responder=_phrase_reply) as server:
        argv = ["oti", "--clip-backend", "open_clip", "--clip", world["open_clip"], "--images", str(world["images"]),
                "--limit", "2", "--concepts", str(concepts), "--phrase-backend", "openai", "--phrase-base-url",
                server.base_url, "--phrase-model", "tiny-llm", "--phrases-out", str(tmp_path / "phrases.json"),
                "--steps", "2", "--top-k", "2", "--no-progress"]  # fmt: skip
        first = _json(capret_cli.main, [*argv, "--out", str(tmp_path / "a.safetensors")], capsys)
        assert server.requests == 3
        assert first["phrase_generation"] == {"requested": 3, "cached": 0, "fallback": 0, "failed": 0}
        second = _json(capret_cli.main, [*argv, "--out", str(tmp_path / "b.safetensors")], capsys)
        assert server.requests == 3 and second["phrase_generation"]["cached"] == 3  # no model call on a rerun
    phrases = json.loads((tmp_path / "phrases.json").read_text())["phrases"]
    assert phrases["red dress"] == ["a red dress on a wooden table", "a close view of the red dress"]


def test_upgrade_leaves_sectioned_and_other_task_dicts_alone() -> None:
    sectioned = {"task": "phi", "data": {"images": "x"}, "model": {}, "trainer": {"lr": 1.0}}
    assert upgrade_config_dict(sectioned) is sectioned
    combiner = {"task": "combiner", "root": "data/fashioniq", "clip": "openai/clip-vit-base-patch32"}
    assert upgrade_config_dict(combiner) is combiner
    # the oldest form: a bare Hugging Face CLIP name instead of a clip section
    old = upgrade_config_dict({"task": "pic2word", "clip": "tiny-clip", "images": "shards/", "lr": 0.3})
    assert old == {
        "task": "pic2word",
        "model": {"clip": {"backend": "hf", "name": "tiny-clip"}},
        "data": {"images": "shards/"},
        "trainer": {"lr": 0.3},
    }
