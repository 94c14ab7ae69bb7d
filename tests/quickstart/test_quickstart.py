"""``capret quickstart`` end to end through the CLI: report.json gets one entry per stage, written atomically."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from capret.cli.main import main


def test_quickstart_stages_write_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "qs"
    assert main(["quickstart", "--out", str(out), "--stages", "captions", "baseline"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["stages"]) == {"data", "captions", "baseline"}
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
    printed = capsys.readouterr().out
    assert "[baseline] map=" in printed and "report written to" in printed
    assert not list(out.glob("*.tmp"))


@pytest.mark.slow
def test_full_quickstart(tmp_path: Path) -> None:
    out = tmp_path / "qs"
    assert (
        main(["quickstart", "--out", str(out)]) == 0
    )  # the default 2 x 100 s budget: shorter runs are noisy
    report = json.loads((out / "report.json").read_text())
    assert {"data", "captions", "baseline", "dual_stream", "rerank"} <= set(report)
    dual = report["dual_stream"]
    assert dual["map_after"] > dual["map_before"]
    assert dual["map_image_only_trained"] > dual["map_before_no_captions"]
    assert 0.0 < dual["map_category_filtered_baseline"] <= 1.0
    assert dual["caption_source"] == "pixels" and dual["oracle_captions"] is False
    assert report["captions"]["caption_source"] == "pixels"
    assert report["rerank"]["geometric"]["map"] > report["rerank"]["none"]["map"]
