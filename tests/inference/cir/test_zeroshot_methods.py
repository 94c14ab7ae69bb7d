"""``capret-eval --method searle|searle-oti|pic2word|lincir`` on tiny FashionIQ / CIRR / CIRCO layouts.

Mappers are trained for a few steps on tiny CLIPs of both families (``capret-train`` tasks ``phi``,
``pic2word``, ``lincir``); each method must run through the one entry point with the official metrics, the
shortcut baselines beside it and server files on the test splits. On FashionIQ the queries must average both
caption orders (SEARLE's protocol).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from repo_paths import CONFIGS
from tiny_cir import write_circo, write_cirr, write_fashioniq
from tiny_zeroshot import (
    tiny_hf_clip,
    tiny_open_clip,
    write_caption_store,
    write_image_folder,
    write_phrase_file,
)

from capret.cli import eval as eval_cli
from capret.cli import main as capret_cli
from capret.cli import train as train_cli

pytestmark = pytest.mark.usefixtures("one_thread")
QUIET = ["trainer.progress=false", "trainer.tensorboard=false", "trainer.amp=off", "trainer.num_workers=0",
         "trainer.log_every=1", "trainer.epochs=null", "trainer.max_steps=2", "trainer.warmup_steps=0"]  # fmt: skip


def _json(fn: Any, argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    capsys.readouterr()
    code = fn(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("zs_methods")
    circo, _ = write_circo(base / "circo")
    hf, oc = tiny_hf_clip(base / "hf"), tiny_open_clip(base / "oc")
    images, phrases = write_image_folder(base / "images", n=4), write_phrase_file(base / "phrases.json")
    captions = write_caption_store(
        base / "captions.jsonl", ["a red dress", "two dogs on grass", "a blue shirt"]
    )
    tokens = base / "tokens.safetensors"
    oti = ["oti", "--clip-backend", "open_clip", "--clip", oc, "--images", str(images), "--out", str(tokens),
           "--steps", "2", "--top-k", "2", "--no-progress"]  # fmt: skip
    assert capret_cli.main(oti) == 0
    runs = {
        "searle": ["searle_phi_demo.yaml", "model.clip.backend=open_clip", f"model.clip.name={oc}", f"data.images={images}",
                   f"data.tokens={tokens}", f"data.phrases={phrases}", "loss.top_k_concepts=2", "data.batch_size=2"],
        "pic2word": ["pic2word_demo.yaml", "model.clip.backend=hf", f"model.clip.name={hf}", f"data.images={images}",
                     "data.batch_size=2", "loss.prompt=$ photo", "model.placeholder=$"],
        "lincir": ["lincir_demo.yaml", "model.clip.backend=open_clip", f"model.clip.name={oc}", f"data.captions={captions}",
                   "data.batch_size=2"],
    }  # fmt: skip
    mappers = {}
    for method, (config, *overrides) in runs.items():
        out = base / f"{method}_run"
        argv = [
            "--config",
            str(CONFIGS / config),
            *overrides,
            "model.clip.pretrained=null",
            f"trainer.output_dir={out}",
        ]
        assert train_cli.main([*argv, *QUIET]) == 0
        mappers[method] = out
    return {
        "base": base,
        "hf": hf,
        "open_clip": oc,
        "mappers": mappers,
        "cirr": write_cirr(base / "cirr"),
        "fashioniq": write_fashioniq(base / "fiq", categories=("dress", "shirt", "toptee"), n=4, extra=46),
        "circo": circo,
    }


def _method_argv(world: dict[str, Any], method: str) -> list[str]:
    if method == "searle-oti":
        return ["--clip-backend", "open_clip", "--clip", world["open_clip"], "--oti-steps", "2"]
    return ["--mapper", str(world["mappers"][method])]


@pytest.mark.parametrize("dataset", ["cirr", "fashioniq", "circo"])
@pytest.mark.parametrize("method", ["searle", "searle-oti", "pic2word", "lincir"])
def test_each_zero_shot_method_through_capret_eval(world, method, dataset, capsys) -> None:
    out = world["base"] / "eval" / f"{method}_{dataset}"
    argv = ["--dataset", dataset, "--method", method, "--root", str(world[dataset]), "--out", str(out)]
    result = _json(eval_cli.main, [*argv, *_method_argv(world, method), "--device", "cpu"], capsys)
    assert result["method"] == method and set(result["baselines"]) == {"image-only", "text-only", "sum"}
    metric = {"cirr": "recall_subset@1", "fashioniq": "average", "circo": "map@5"}[dataset]
    assert 0.0 <= result["metrics"][metric] <= 1.0
    assert result["clip"]["backend"] == ("hf" if method == "pic2word" else "open_clip")
    if method == "searle-oti":  # tokens of the references only, resumed on a rerun
        again = _json(eval_cli.main, [*argv, *_method_argv(world, method), "--device", "cpu"], capsys)
        assert all(r["inverted"] == 0 for r in again["report"].values())
        assert again["metrics"] == result["metrics"]
    else:
        assert result["prompt"] in (
            "a photo of $ that {caption}",
            "a photo of * , {caption}".replace("*", "$"),
        )


def test_fashioniq_queries_average_both_caption_orders(world) -> None:
    from capret.data.fashioniq import FashionIQ
    from capret.inference.cir.benchmarks import fashioniq_query_set
    from capret.inference.cir.features import image_features
    from capret.inference.cir.inversion import fashioniq_caption_variants
    from capret.inference.cir.methods import MethodInputs, create_cir_method
    from capret.inference.cir.search import FeatureOptions

    method: Any = create_cir_method("searle", MethodInputs(mapper=world["mappers"]["searle"]))
    ds = FashionIQ(world["fashioniq"], "dress", "val")
    queries = fashioniq_query_set(ds)
    assert queries.caption_orders == [tuple(fashioniq_caption_variants(*t.captions)) for t in ds.triplets]
    images = image_features(method.clip, queries.references, load_image=ds.load_image)
    got = method.query_features(queries, images=images, options=FeatureOptions())
    model = method.model
    refs = images.lookup(queries.references)
    one = [model.query_features(reference_features=refs, captions=[o[i] for o in queries.caption_orders])
           for i in (0, 1)]  # fmt: skip
    torch.testing.assert_close(got, F.normalize(one[0] + one[1], dim=-1), atol=1e-5, rtol=0)
    assert not torch.allclose(got, one[0], atol=1e-4)


def test_cirr_test_split_server_files(world, tmp_path, capsys) -> None:
    argv = ["--dataset", "cirr", "--method", "lincir", "--root", str(world["cirr"]), "--split", "test1",
            "--mapper", str(world["mappers"]["lincir"]), "--out", str(tmp_path), "--device", "cpu"]  # fmt: skip
    result = _json(eval_cli.main, argv, capsys)
    recall = json.loads((tmp_path / "cirr_recall_test1.json").read_text())
    assert recall["version"] == "rc2" and len(result["files"]) == 2 and result["baselines"] == {}


def test_wrong_mapper_for_the_method(world, tmp_path, capsys) -> None:
    argv = ["--dataset", "cirr", "--method", "lincir", "--root", str(world["cirr"]), "--out", str(tmp_path),
            "--mapper", str(world["mappers"]["pic2word"]), "--device", "cpu"]  # fmt: skip
    assert eval_cli.main(argv) == 2
    assert "--method pic2word" in capsys.readouterr().err
    argv[argv.index("--mapper") : argv.index("--mapper") + 2] = []
    assert eval_cli.main(argv) == 2
    assert "--mapper" in capsys.readouterr().err


def test_default_output_folder_beside_the_mapper(world, capsys) -> None:
    argv = ["--dataset", "circo", "--method", "pic2word", "--root", str(world["circo"]),
            "--mapper", str(world["mappers"]["pic2word"]), "--device", "cpu"]  # fmt: skip
    _json(eval_cli.main, argv, capsys)
    written = list(Path(world["mappers"]["pic2word"]).rglob("*_eval_circo_val/metrics.json"))
    assert len(written) == 1
