"""``capret ablate`` on tiny models: every variant kind runs, tables and chart are written, reruns skip."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tiny_text import build_tiny_bert, write_synthetic_df2  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

_OFF = {"data.captions": None, "data.val_captions": None, "loss.itc_weight": 0.0, "loss.box_weight": 0.0}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ablate")
    stores = write_synthetic_df2(root / "data", identities={"train": 8, "validation": 4}, user_views=2)
    bert = build_tiny_bert(root / "bert")
    config = {
        "task": "dualstream",
        "data": {"root": str(root / "data"), "captions": str(stores["train"]),
                 "val_captions": str(stores["validation"]), "p": 4, "k": 3},
        "model": {
            "visual": {"kind": "timm", "source": "test_resnet", "image_size": 32},
            "text": {"kind": "hf_text", "source": str(bert), "pretrained": True, "max_length": 16},
            "width": 32, "depth": 1, "heads": 2, "embed_dim": 32, "itc_dim": 16, "mode": "full",
        },
        "trainer": {"max_steps": 2, "lr": 3e-3, "warmup_steps": 1, "amp": "off", "progress": False,
                    "tensorboard": False},
        "eval": {"ks": [1, 2, 4], "batch_size": 8, "no_captions": False},
    }  # fmt: skip
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    variants = {
        "variants": [
            {"name": "image_only", "overrides": _OFF},
            {"name": "image_only_category_filtered", "overrides": _OFF, "category_filter": True},
            {"name": "+captions+itc+box", "overrides": {}},
            {"name": "gem", "baseline": {"name": "gem", "source": "test_resnet", "image_size": 32,
                                         "whiten_dim": 8}},
            {"name": "late_fusion", "baseline": {"name": "late_fusion", "text": str(bert), "holdout": 0.25,
                                                 "alphas": [0.0, 0.5, 1.0],
                                                 "image": {"name": "gem_plus", "source": "test_resnet",
                                                           "image_size": 32}}},
        ]
    }  # fmt: skip
    (root / "variants.yaml").write_text(yaml.safe_dump(variants, sort_keys=False))
    return {"root": root, "config": root / "config.yaml", "variants": root / "variants.yaml"}


def test_ablate_writes_tables_and_resumes(setup: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    from capret.cli.main import main

    out = setup["root"] / "out"
    argv = ["ablate", "--config", str(setup["config"]), "--variants", str(setup["variants"])]
    argv += ["--seeds", "2", "--out", str(out)]
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["skipped_finished_runs"] == 0
    table = first["table"]
    assert list(table) == [
        "image_only",
        "image_only_category_filtered",
        "+captions+itc+box",
        "gem",
        "late_fusion",
    ]
    for name, row in table.items():
        assert row["seeds"] == 2
        for metric in ("map", "recall@1", "official_top1"):
            assert 0.0 <= row[metric]["mean"] <= 1.0 and row[metric]["std"] >= 0.0, (name, metric)
            assert len(row[metric]["values"]) == 2
    assert "box_miou" in table["+captions+itc+box"] and "box_miou" not in table["image_only"]
    # the category filter can only help on this data (one category per identity)
    assert table["image_only_category_filtered"]["map"]["mean"] >= table["image_only"]["map"]["mean"] - 1e-9
    run = json.loads((out / "runs" / "late_fusion" / "seed0" / "result.json").read_text())
    assert run["alpha"] in (0.0, 0.5, 1.0) and set(run["alpha_tuning_map"]) == {"0", "0.5", "1"}
    filtered = json.loads(
        (out / "runs" / "image_only_category_filtered" / "seed1" / "result.json").read_text()
    )
    assert filtered["category_filter"] == "annotation (oracle)" and filtered["eval_captions"] == "none"
    plain = json.loads((out / "runs" / "image_only" / "seed1" / "result.json").read_text())
    assert plain["training"] == filtered["training"]  # same training config: trained once per seed
    assert len(list((out / "train").iterdir())) == 2
    md = (out / "ablation.md").read_text()
    assert "| image_only |" in md and "±" in md
    assert (out / "ablation.png").stat().st_size > 1000
    # resume: every finished run is skipped and the table is identical; a deleted run is redone
    (out / "runs" / "gem" / "seed1" / "result.json").unlink()
    assert main(argv) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["skipped_finished_runs"] == 9
    assert second["table"]["image_only"] == table["image_only"]
    # a changed config (here one more override) is a different run: the finished result is not reused
    key = plain["config_key"]
    assert (
        main(
            [
                *argv[:-4],
                "--seeds",
                "1",
                "--out",
                str(out),
                "--only",
                "image_only",
                "--",
                "trainer.max_steps=1",
            ]
        )
        == 0
    )
    third = json.loads(capsys.readouterr().out)
    assert third["skipped_finished_runs"] == 0
    rerun = json.loads((out / "runs" / "image_only" / "seed0" / "result.json").read_text())
    assert rerun["config_key"] != key and rerun["train_steps"] <= 1


def test_ablate_rejects_bad_variants(setup: dict[str, Path], tmp_path: Path) -> None:
    from capret.config import ConfigError
    from capret.tasks.ablation import load_variants, run_ablation

    bad = tmp_path / "v.yaml"
    bad.write_text("variants:\n  - name: a\n    overides: {}\n")
    with pytest.raises(ConfigError, match="unknown keys"):
        load_variants(bad)
    bad.write_text("variants:\n  - name: a\n  - name: a\n")
    with pytest.raises(ConfigError, match="twice"):
        load_variants(bad)
    bad.write_text("variants:\n  - name: oracle\n    overrides: {data.captions: /no/such/store.jsonl}\n")
    with pytest.raises(ConfigError, match="oracle: data.captions /no/such/store.jsonl does not exist"):
        run_ablation(config=setup["config"], variants=bad, seeds=1, out_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()
    bad.write_text("variants:\n  - name: a\n    overrides: {model.widht: 3}\n")
    with pytest.raises(ConfigError, match="widht"):
        run_ablation(config=setup["config"], variants=bad, seeds=1, out_dir=tmp_path / "o")
