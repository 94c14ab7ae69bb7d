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
    assert main(["quickstart", "--out", str(out)]) == 0  # the default 240 s budget: shorter runs are noisy
    report = json.loads((out / "report.json").read_text())
    assert {"data", "captions", "baseline", "dual_stream", "rerank", "pipeline"} <= set(report)
    assert report["dual_stream"]["map_after"] > report["dual_stream"]["map_before"]
    assert report["rerank"]["geometric"]["map"] > report["rerank"]["none"]["map"]
    # the pipeline folder the quickstart leaves works with `capret search` right away
    assert report["pipeline"]["top20"] > 0.3 and report["pipeline"]["gallery_items"] > 0
    command = report["pipeline"]["example_command"].split()
    assert main([*command[1:], "--k", "3", "--json"]) == 0
