"""The catalogue end to end on a tiny model: add (duplicates, near duplicates, rerun), search with a category
filter, update, remove, doctor, re-embed, fingerprint refusal, and the IVF-PQ path on synthetic rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from tiny_pipeline import write_shop_photos
from tiny_text import save_tiny_dual_stream

from capret.catalogue import (
    NEAR_DUPLICATE_BITS,
    Catalogue,
    CatalogueError,
    CatalogueSettings,
    dhash,
    doctor,
    hamming,
)
from capret.catalogue.schema import item_id
from capret.cli.main import main
from capret.errors import DataError
from capret.testing import synthetic_catalogue_rows

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, dict]:
    code = main(argv)
    out = capsys.readouterr().out
    return code, (json.loads(out) if out.strip().startswith("{") else {})


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("catalogue_models")
    first = save_tiny_dual_stream(root / "model_a", pad="squarepad", seed=0)
    second = save_tiny_dual_stream(root / "model_b", bert=root / "bert", pad="squarepad", seed=1)
    return {"a": first, "b": second}


@pytest.fixture
def shop(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    write_shop_photos(root / "shop", count=6)
    return root


def _create(tmp_path: Path, models: dict[str, Path], shop: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    folder = tmp_path / "cat"
    code, out = _run(
        ["catalogue", "create", "--model", str(models["a"]), "--root", str(shop), str(folder)], capsys
    )
    assert code == 0 and out["dim"] == 24
    return folder


def test_add_dedup_search_update_remove_doctor(
    tmp_path: Path, models: dict[str, Path], shop: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _create(tmp_path, models, shop, capsys)
    code, out = _run(
        ["catalogue", "add", str(folder), str(shop / "shop"), "--category", "top", "--no-progress"], capsys
    )
    assert code == 0 and out["added_images"] == 6 and out["added_rows"] == 6
    # a second category, a byte copy (duplicate) and a re-encoded copy (near duplicate)
    (shop / "more").mkdir()
    Image.open(shop / "shop" / "000001.png").save(shop / "more" / "copy.png", compress_level=1)
    (shop / "more" / "same.png").write_bytes((shop / "shop" / "000002.png").read_bytes())
    from skimage import data

    astronaut = Image.fromarray(data.astronaut()).resize((96, 96))
    astronaut.save(shop / "more" / "astro.png")
    astronaut.resize((48, 48)).save(shop / "more" / "small.jpg", quality=60)
    write_shop_photos(shop / "trousers", count=2, seed=5)
    code, out = _run(
        ["catalogue", "add", str(folder), str(shop / "trousers"), "--category", "trousers", "--no-progress"],
        capsys,
    )
    assert out["added_rows"] == 2
    code, out = _run(
        ["catalogue", "add", str(folder), str(shop / "more"), str(shop / "shop"), "--no-progress"], capsys
    )
    assert out["present"] == 6  # the rerun of the first add adds nothing
    assert {d["image"] for d in out["duplicates"]} == {"more/same.png"}  # same bytes as shop/000002.png
    near = {d["image"]: d for d in out["near_duplicates"]}
    assert (
        near["more/small.jpg"]["of"] == "more/astro.png"
        and near["more/small.jpg"]["bits"] <= NEAR_DUPLICATE_BITS
    )
    assert near["more/copy.png"] == {
        "image": "more/copy.png",
        "of": "shop/000001.png",
        "bits": 0,
    }  # same pixels
    assert len(near) == 2
    assert out["added_images"] == 3  # copy.png (PNG re-saved: other bytes, same pixels), astro.png, small.jpg

    catalogue = Catalogue.open(folder)
    ids = catalogue.scan(["id"]).column("id").to_pylist()
    assert "shop/000001/0" in ids and all(not i.startswith("/") for i in ids)
    assert all(not Path(p).is_absolute() for p in catalogue.scan(["image"]).column("image").to_pylist())

    # search: the photo itself first; a category filter keeps only that category
    code, out = _run(
        ["catalogue", "search", str(folder), "--image", str(shop / "shop" / "000004.png"), "--top", "3"],
        capsys,
    )
    assert code == 0 and out["results"][0]["id"] == "shop/000004/0"
    code, out = _run(
        [
            "catalogue",
            "search",
            str(folder),
            "--image",
            str(shop / "shop" / "000004.png"),
            "--category",
            "trousers",
            "--top",
            "5",
        ],
        capsys,
    )
    assert [r["category"] for r in out["results"]] == ["trousers", "trousers"]

    code, out = _run(
        ["catalogue", "update", str(folder), "--id", "shop/000002/0", "--caption", "a red silk shirt"], capsys
    )
    assert code == 0
    row = Catalogue.open(folder).rows(["shop/000002/0"])[0]
    assert row["caption"] == "a red silk shirt" and row["caption_source"] == "manual"
    assert row["updated"] > row["created"]

    (shop / "shop" / "000005.png").unlink()
    code, out = _run(["catalogue", "doctor", str(folder)], capsys)
    assert code == 1 and out["missing_sources"] == ["shop/000005.png"]
    code, out = _run(
        ["catalogue", "remove", str(folder), "more/copy/0", "--image", "shop/000005.png"], capsys
    )
    assert out["removed_rows"] == 2  # the missing photo's row and the re-saved copy, by id
    code, out = _run(["catalogue", "optimize", str(folder)], capsys)
    assert code == 0 and out["versions"] == 1
    code, out = _run(["catalogue", "doctor", str(folder)], capsys)
    assert code == 0 and out["ok"], out["problems"]


def test_other_fingerprint_refused_then_reembed(
    tmp_path: Path, models: dict[str, Path], shop: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _create(tmp_path, models, shop, capsys)
    _run(["catalogue", "add", str(folder), str(shop / "shop"), "--no-progress"], capsys)
    catalogue = Catalogue.open(folder)
    foreign = catalogue.items.search().limit(1).to_arrow()
    foreign = foreign.set_column(
        foreign.schema.get_field_index("model_fingerprint"),
        "model_fingerprint",
        pa.array(["0123456789abcdef"]),
    )
    with pytest.raises(CatalogueError, match="0123456789abcdef"):
        catalogue.add_rows(foreign)
    # re-embedding with another model switches the fingerprint of every row
    before = np.asarray(catalogue.rows(["shop/000001/0"])[0]["vector"])
    code, out = _run(["catalogue", "update", str(folder), "--reembed", "--model", str(models["b"])], capsys)
    assert code == 0 and out["reembedded"] == 6
    catalogue = Catalogue.open(folder)
    assert set(catalogue.scan(["model_fingerprint"]).column(0).to_pylist()) == {
        catalogue.settings.fingerprint
    }
    after = np.asarray(catalogue.rows(["shop/000001/0"])[0]["vector"])
    assert not np.allclose(before, after)
    # the catalogue now refuses to add with a model folder whose weights changed under it
    settings = catalogue.settings
    settings.fingerprint = "ffffffffffffffff"
    catalogue.save_settings()
    write_shop_photos(shop / "late", count=1, seed=9)
    code = main(["catalogue", "add", str(folder), str(shop / "late"), "--no-progress"])
    assert code == 2 and "--reembed" in capsys.readouterr().err


def test_photo_outside_root_and_missing_catalogue(
    tmp_path: Path, models: dict[str, Path], shop: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _create(tmp_path, models, shop, capsys)
    outside = write_shop_photos(tmp_path / "elsewhere", count=1)
    catalogue = Catalogue.open(folder)
    from capret.catalogue import add_images

    with pytest.raises(DataError, match="not under the catalogue's root"):
        add_images(catalogue, [outside / "000001.png"])
    with pytest.raises(CatalogueError, match="no catalogue here"):
        Catalogue.open(tmp_path / "nothing")
    code = main(["catalogue", "create", "--model", str(models["a"]), "--root", str(shop), str(folder)])
    assert code == 2 and "already exists" in capsys.readouterr().err


def test_dhash_distance_and_popcount_reference(tmp_path: Path) -> None:
    from skimage import data

    photos = [
        Image.fromarray(data.astronaut()),
        Image.fromarray(data.coffee()),
        Image.fromarray(data.chelsea()),
    ]
    base = photos[0]
    base.save(tmp_path / "q60.jpg", quality=60)
    reencoded = Image.open(tmp_path / "q60.jpg")
    half = base.resize((base.width // 2, base.height // 2))
    hashes = np.asarray([dhash(p) for p in photos], dtype=np.int64)
    assert int(hamming(dhash(reencoded), hashes[:1])[0]) <= 2
    assert int(hamming(dhash(half), hashes[:1])[0]) <= 2
    assert hamming(hashes[0], hashes[1:]).min() > 3 * NEAR_DUPLICATE_BITS // 2
    rng = np.random.default_rng(0)
    values = rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, size=50, dtype=np.int64)
    reference = [bin((int(values[0]) ^ int(v)) & (2**64 - 1)).count("1") for v in values]
    assert hamming(int(values[0]), values).tolist() == reference


def test_item_ids_are_relative_and_safe() -> None:
    assert item_id("shop/000001.jpg", 2) == "shop/000001/2"
    assert item_id("a b/ü's photo.v2.png", 0) == "a_b/ü_s_photo.v2/0"
    assert item_id("../x.png", 0) == "_/x/0"


def _synthetic(dim: int, rows: int, *, seed: int, fingerprint: str, start: int = 0) -> pa.Table:
    return synthetic_catalogue_rows(dim, rows, seed=seed, fingerprint=fingerprint, start=start)


def test_ivf_pq_threshold_recall_filter_and_staleness(tmp_path: Path) -> None:
    dim = 32
    settings = CatalogueSettings(
        model=str(tmp_path / "no-model"),
        fingerprint="f" * 16,
        dim=dim,
        root=str(tmp_path),
        index_threshold=300,
    )
    catalogue = Catalogue.create(tmp_path / "cat", settings=settings)
    with catalogue.writing():
        catalogue.add_rows(_synthetic(dim, 200, seed=0, fingerprint="f" * 16))
    assert catalogue.optimize()["index"]["kind"] == "exact"  # below the threshold
    with catalogue.writing():
        catalogue.add_rows(_synthetic(dim, 1000, seed=1, fingerprint="f" * 16, start=200))
    report = doctor(catalogue)
    assert any("no vector index" in p for p in report["problems"])
    state = catalogue.optimize()["index"]
    assert state["kind"] == "ivf_pq" and state["unindexed_rows"] == 0 and not state["stale"]
    queries = (
        _synthetic(dim, 20, seed=7, fingerprint="f" * 16, start=10_000)
        .column("vector")
        .to_numpy(zero_copy_only=False)
    )
    queries = np.stack(queries)
    for category in (None, "dress"):
        fast = catalogue.search(queries, 10, category=category)
        exact = catalogue.search(queries, 10, category=category, exact=True)
        recall = np.mean([len({h["id"] for h in f} & {h["id"] for h in e}) / 10 for f, e in zip(fast, exact)])
        assert recall >= 0.9, (category, recall)
        if category:
            assert all(h["category"] == "dress" for hits in fast for h in hits)
        # exact search equals a numpy brute force over the stored vectors
    everything = catalogue.scan(["id", "vector"]).to_pydict()
    matrix = np.asarray(everything["vector"], dtype=np.float32)
    top = np.argsort(-(queries[:1] @ matrix.T)[0])[:10]
    assert [everything["id"][i] for i in top] == [
        h["id"] for h in catalogue.search(queries[:1], 10, exact=True)[0]
    ]
    # rows added later are unindexed (searched exactly) until optimize folds them in; 2x growth is stale
    with catalogue.writing():
        catalogue.add_rows(_synthetic(dim, 50, seed=2, fingerprint="f" * 16, start=5000))
    assert catalogue.index_state()["unindexed_rows"] == 50
    assert any("not in the vector index" in p for p in doctor(catalogue)["problems"])
    assert catalogue.optimize()["index"]["unindexed_rows"] == 0
    with catalogue.writing():
        catalogue.add_rows(_synthetic(dim, 1500, seed=3, fingerprint="f" * 16, start=6000))
    assert catalogue.index_state()["stale"]
    catalogue.optimize()
    assert catalogue.settings.index_trained_rows == 2750
    # synthetic rows have no photos: that is the one problem left
    assert [p for p in doctor(catalogue)["problems"] if "source photo(s) missing" not in p] == []
