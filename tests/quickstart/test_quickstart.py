"""``capret quickstart`` end to end through the CLI: report.json gets one entry per stage, written atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from capret.cli.main import main


def test_unknown_task_world_or_stage_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["quickstart", "--out", str(tmp_path / "qs"), "--task", "cir", "--stages", "baseline"]) == 2
    assert "unknown quickstart stage 'baseline' for --task cir" in capsys.readouterr().err
    assert main(["quickstart", "--out", str(tmp_path / "qs"), "--world", "demo", "--stages", "clip"]) == 2
    assert not (tmp_path / "qs").exists()  # refused before anything is written


def test_quickstart_stages_write_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "qs"
    assert main(["quickstart", "--out", str(out), "--world", "demo", "--stages", "captions", "baseline"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["stages"]) == {"data", "captions", "baseline"}
    assert report["data"]["world"] == "demo"
    assert report["data"]["identities_train"] + report["data"]["identities_validation"] >= 100
    assert report["captions"]["failed"] == 0 and report["captions"]["captioned"] > 0
    assert report["captions"]["caption_source"] == "pixels"
    assert 0.0 <= report["captions"]["category_model"]["heldout_accuracy"] <= 1.0
    baseline = report["baseline"]
    assert 0.0 < baseline["map"] <= 1.0
    # With ground-truth boxes the official top-k must equal R@k (the stage itself raises otherwise).
    assert baseline["official_top1"] == baseline["recall@1"]
    assert baseline["official_top10"] == baseline["recall@10"]
    assert Path(baseline["grid_png"]).is_file()
    printed = capsys.readouterr()
    assert "[baseline] map=" in printed.out and "report written to" in printed.out
    assert "quickstart: 3/3 stages" in printed.err  # the stage bar, on stderr
    assert not list(out.glob("*.tmp"))
    assert (
        main(["quickstart", "--out", str(out), "--world", "demo", "--stages", "data", "--no-progress"]) == 0
    )
    printed = capsys.readouterr()
    assert "[data]" in printed.out and "quickstart:" not in printed.err


@pytest.mark.slow
def test_full_quickstart(tmp_path: Path) -> None:
    out = tmp_path / "qs"
    assert (
        main(["quickstart", "--out", str(out)]) == 0
    )  # the default 2 x 100 s budget: shorter runs are noisy
    report = json.loads((out / "report.json").read_text())
    assert {"data", "clip", "captions", "baseline", "dual_stream", "detector", "rerank", "pipeline"} <= set(
        report
    )
    assert report["data"]["world"] == "garments"
    clip = report["clip"]
    # what the tiny CLIP learns within the budget: retrieval and colour, not silhouettes (its zero-shot category
    # accuracy is reported and stays near chance: docs/garments.md, "How far the category model can get")
    assert 0.0 <= clip["zero_shot_category_accuracy"] <= 1.0
    assert clip["heldout_i2t_recall@1"] > 3 * clip["heldout_chance_recall@1"]
    captioner = report["captions"]["clip_captioner"]
    assert captioner["attribute_accuracy"]["colour"] > captioner["attribute_majority"]["colour"]
    # the pixel-cnn names the category far above chance (1/13)
    assert report["captions"]["category_accuracy"] > 3 / 13
    dual = report["dual_stream"]
    assert dual["map_after"] > dual["map_before"]
    assert dual["map_image_only_trained"] > dual["map_before_no_captions"]
    assert 0.0 < dual["map_category_filtered_baseline"] <= 1.0
    assert dual["caption_source"] == "pixels" and dual["oracle_captions"] is False
    assert report["captions"]["caption_source"] == "pixels"
    assert report["rerank"]["geometric"]["map"] > report["rerank"]["none"]["map"]
    # the pipeline folder the quickstart leaves works with `capret search` right away
    assert report["pipeline"]["top20_given_boxes"] > 0.3 and report["pipeline"]["gallery_items"] > 0
    assert 0.0 <= report["pipeline"]["top1"] <= report["pipeline"]["top20"] <= 1.0
    command = report["pipeline"]["example_command"].split()
    assert main([*command[1:], "--k", "3", "--json"]) == 0
    # ... and `capret serve --pipeline qs/pipeline` serves it: a gallery item as the query finds itself first
    from fastapi.testclient import TestClient

    from capret.serve import ServeBackend, create_app

    assert report["pipeline"]["serve_command"].split()[:3] == ["capret", "serve", "--pipeline"]
    backend = ServeBackend.from_pipeline_dir(report["pipeline"]["serve_command"].split()[3])
    client = TestClient(create_app(backend))
    first = backend.entries[0].id
    found = client.post("/api/search/image", data={"gallery_id": first, "k": "5"}).json()
    assert found["results"][0]["id"] == first and found["items"][0]["caption"]
    composed = client.post("/api/search/composed", data={"reference_id": first, "text": "in red", "k": "5"})
    assert composed.status_code == 200 and len(composed.json()["results"]) == 5


def test_detector_stage_trains_and_saves_a_loadable_detector(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stage on a synthetic DeepFashion2 layout with a smaller recipe (the demo recipe is for real runs)."""
    import copy

    from tiny_text import write_synthetic_df2

    from capret.inference.detectors import load_detector
    from capret.quickstart import QuickstartContext
    from capret.quickstart import detector as stage

    data = tmp_path / "data"
    write_synthetic_df2(data, identities={"train": 4, "validation": 2}, user_views=2, size=64)
    recipe = copy.deepcopy(stage.DEMO_RECIPE)
    recipe["model"].update(backbone_width=4, fpn_channels=8, min_size=64, max_size=64)
    recipe["data"]["batch_size"] = 2
    monkeypatch.setattr(stage, "DEMO_RECIPE", recipe)
    ctx = QuickstartContext(
        out_dir=tmp_path / "qs", data_root=data, world_root=tmp_path / "world", train_seconds=1.0
    )
    ctx.out_dir.mkdir()
    result = stage.run(ctx)
    assert 0.0 <= result["box_ap"] <= 1.0 and result["val_images"] == 6 and result["train_steps"] >= 1
    # the step budget is planned from timed steps, and the time cap still holds
    assert (
        stage.MIN_STEPS <= result["planned_steps"] <= stage.MAX_STEPS
        and result["calibrated_step_seconds"] > 0
    )
    assert result["train_steps"] <= result["planned_steps"]
    assert ctx.state["detector"] == ctx.out_dir / "detector"
    assert load_detector(result["model_dir"]).model.config.arch == "centernet"


def test_a_second_writer_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """One writer per output: a quickstart (or a world build) into a folder another run holds is refused at once."""
    from capret.data.garments import build_world
    from capret.locks import OutputLockedError, exclusive_output

    out = tmp_path / "qs"
    with exclusive_output(out, what="quickstart folder"):
        assert main(["quickstart", "--out", str(out), "--world", "demo", "--stages", "baseline"]) == 2
        message = capsys.readouterr().err
        assert str(out) in message and str(os.getpid()) in message
        assert not out.exists()  # refused before anything was written
    with exclusive_output(tmp_path / "world", what="garment world folder"):
        with pytest.raises(OutputLockedError, match="world"):
            build_world(tmp_path / "world", seed=0, identities=2)
