"""A catalogue on object storage: ``s3://bucket/path`` against moto's S3 server on loopback works as a folder
does (create, add, search with a category filter, optimize, doctor), through the CLI's ``--storage-option``."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from tiny_pipeline import write_shop_photos
from tiny_text import save_tiny_dual_stream

from capret.catalogue import Catalogue
from capret.cli.main import main

moto_server = pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """A loopback S3 with bucket ``shop``; yields the CLI's ``--storage-option`` flags."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing")):
        monkeypatch.setenv(name, value)
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="shop")
    options = {"aws_endpoint": endpoint, "allow_http": "true", "aws_region": "us-east-1"}
    options |= {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
    yield [flag for k, v in options.items() for flag in ("--storage-option", f"{k}={v}")]
    server.stop()


def test_catalogue_on_loopback_s3(s3: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = save_tiny_dual_stream(tmp_path / "model", pad="squarepad")
    write_shop_photos(tmp_path / "photos" / "tops", count=3)
    write_shop_photos(tmp_path / "photos" / "skirts", count=2, seed=4)
    uri = "s3://shop/catalogues/main"
    argv = ["catalogue", "create", "--model", str(model), "--root", str(tmp_path / "photos"), uri, *s3]
    assert main(argv) == 0
    for category in ("tops", "skirts"):
        argv = ["catalogue", "add", uri, str(tmp_path / "photos" / category), "--category", category, *s3]
        assert main([*argv, "--no-progress"]) == 0
    capsys.readouterr()
    query = str(tmp_path / "photos" / "tops" / "000002.png")
    assert main(["catalogue", "search", uri, "--image", query, "--category", "skirts", *s3]) == 0
    found = json.loads(capsys.readouterr().out)["results"]
    assert [r["category"] for r in found] == ["skirts", "skirts"]
    assert main(["catalogue", "search", uri, "--image", query, "--top", "1", *s3]) == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["id"] == "tops/000002/0"
    assert main(["catalogue", "optimize", uri, *s3]) == 0
    capsys.readouterr()
    assert main(["catalogue", "doctor", uri, *s3]) == 0
    assert json.loads(capsys.readouterr().out)["ok"]
    # the objects are in the bucket, nothing was written to a local folder of that name
    options = dict(pair.split("=", 1) for pair in s3[1::2])
    assert len(Catalogue.open(uri, storage_options=options)) == 5
    assert not Path("s3:").exists()
