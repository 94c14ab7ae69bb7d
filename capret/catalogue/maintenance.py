"""Looking after a catalogue: ``stats`` (what is in it) and ``doctor`` (what is wrong with it, and the fix).

``doctor`` checks, each with the command that fixes it:

- *missing sources*: rows whose source photo is no longer under the root (``remove --image``, or ``--root``);
- *changed sources*: rows whose source photo's SHA-256 is no longer the one stored in the row (edited, replaced
  or corrupted after it was added; ``update --id ID --image PHOTO``); each photo is hashed once, and
  ``verify=False`` (``--no-verify``) skips this check;
- *fingerprint mix*: rows embedded by another model than the catalogue's (an interrupted ``update --reembed``;
  rerun it);
- *duplicate ids*: two rows with one id (never written by capret; a foreign writer);
- *index*: no IVF-PQ although the table is above the threshold, or an IVF-PQ trained on less than half the
  rows (stale), or rows not yet in the vector or scalar indexes (``optimize``);
- *old versions*: table versions kept on disk besides the latest (``optimize``).

The report is a dict (the CLI prints it as JSON); ``problems`` lists one line per failed check, and the CLI exits
non-zero when it is not empty.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from capret.catalogue.table import Catalogue
from capret.io import file_sha256

__all__ = ["doctor", "stats"]


def stats(catalogue: Catalogue) -> dict[str, Any]:
    """Rows, photos, categories, caption sources, fingerprints, index and versions of a catalogue."""
    table = catalogue.scan(["image", "caption_source", "model_fingerprint"]).to_pydict()
    settings = catalogue.settings
    return {
        "location": catalogue.location,
        "rows": len(table["image"]),
        "images": len(set(table["image"])),
        "dim": settings.dim,
        "model": settings.model,
        "fingerprint": settings.fingerprint,
        "root": settings.root,
        "detector": (settings.detector or {}).get("name", "whole_image"),
        "captioner": (settings.captioner or {}).get("backend"),
        "categories": catalogue.categories(),
        "caption_sources": dict(sorted(Counter(table["caption_source"]).items())),
        "fingerprints": dict(sorted(Counter(table["model_fingerprint"]).items())),
        "index": catalogue.index_state(),
        "versions": catalogue.versions(),
    }


def doctor(catalogue: Catalogue, *, sample_missing: int = 5, verify: bool = True) -> dict[str, Any]:
    """Every check of the module docstring; ``problems`` is empty when the catalogue is healthy."""
    table = catalogue.scan(["id", "image", "image_sha256", "model_fingerprint"]).to_pydict()
    problems: list[str] = []

    images = sorted(set(table["image"]))
    missing = [name for name in images if not catalogue.source_path(name).is_file()]
    if missing:
        shown = ", ".join(missing[:sample_missing]) + (" ..." if len(missing) > sample_missing else "")
        problems.append(
            f"{len(missing)} source photo(s) missing under root {catalogue.settings.root}: {shown} "
            "(remove them with `capret catalogue remove DIR --image PATH`, or pass --root)"
        )

    changed = _changed_sources(catalogue, table, skip=set(missing)) if verify else []
    if changed:
        shown = ", ".join(
            f"{c['image']} (row {c['ids'][0]!r}{' ...' if len(c['ids']) > 1 else ''})"
            for c in changed[:sample_missing]
        ) + (" ..." if len(changed) > sample_missing else "")
        rows = sum(len(c["ids"]) for c in changed)
        problems.append(
            f"{len(changed)} source photo(s) of {rows} row(s) changed since they were added (SHA-256 differs "
            f"from the row): {shown} (give each item its photo again with "
            "`capret catalogue update DIR --id ID --image PHOTO`, or remove it)"
        )

    fingerprints = Counter(table["model_fingerprint"])
    other = {fp: n for fp, n in fingerprints.items() if fp != catalogue.settings.fingerprint}
    if other:
        problems.append(
            f"{sum(other.values())} row(s) embedded by other model fingerprint(s) {sorted(other)} than the "
            f"catalogue's {catalogue.settings.fingerprint}: run `capret catalogue update DIR --reembed`"
        )

    ids = Counter(table["id"])
    doubled = sorted(i for i, n in ids.items() if n > 1)
    if doubled:
        problems.append(f"{len(doubled)} id(s) held by more than one row, e.g. {doubled[0]!r}")

    index = catalogue.index_state()
    if index["stale"]:
        if index["kind"] == "exact":
            problems.append(
                f"{index['rows']} rows reach the IVF-PQ threshold {index['threshold']} but there is no vector "
                "index (searches scan every row): run `capret catalogue optimize DIR`"
            )
        else:
            problems.append(
                f"the IVF-PQ was trained on {index['trained_rows']} rows and the table now holds {index['rows']}: "
                "stale partitions; run `capret catalogue optimize DIR`"
            )
    if index["unindexed_rows"]:
        problems.append(
            f"{index['unindexed_rows']} row(s) are not in the vector index yet (searched by a flat scan): run "
            "`capret catalogue optimize DIR`"
        )
    if index["rows"]:
        absent = [c for c, n in index["scalar_unindexed"].items() if n is None]
        behind = {c: n for c, n in index["scalar_unindexed"].items() if n}
        if absent:
            problems.append(f"no scalar index on {', '.join(absent)}: run `capret catalogue optimize DIR`")
        if behind:
            problems.append(
                "rows not yet in the scalar indexes ("
                + ", ".join(f"{c}: {n}" for c, n in behind.items())
                + "): run `capret catalogue optimize DIR`"
            )

    versions = catalogue.versions()
    if versions > 1:
        problems.append(f"{versions - 1} old table version(s) to clean: run `capret catalogue optimize DIR`")

    return {
        "location": catalogue.location,
        "rows": len(table["id"]),
        "images": len(images),
        "missing_sources": missing,
        "changed_sources": changed,
        "sources_verified": verify,
        "fingerprints": dict(fingerprints),
        "index": index,
        "versions": versions,
        "problems": problems,
        "ok": not problems,
    }


def _changed_sources(
    catalogue: Catalogue, table: dict[str, list[Any]], *, skip: set[str]
) -> list[dict[str, Any]]:
    """Photos whose bytes no longer hash to their rows' ``image_sha256``: ``[{image, ids}]``, sorted by photo.

    Each photo is hashed once, however many items it holds; missing photos (``skip``) are reported elsewhere.
    """
    rows_of: dict[str, list[tuple[str, str]]] = {}
    for item, image, sha in zip(table["id"], table["image"], table["image_sha256"]):
        rows_of.setdefault(image, []).append((item, sha))
    changed: list[dict[str, Any]] = []
    for image in sorted(rows_of):
        if image in skip:
            continue
        actual = file_sha256(catalogue.source_path(image))
        ids = sorted(item for item, sha in rows_of[image] if sha != actual)
        if ids:
            changed.append({"image": image, "ids": ids})
    return changed
