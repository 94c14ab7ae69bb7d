"""Contact sheet of a garment world: one shop image per category, then consumer photos with their boxes.

    python scripts/garments_sheet.py --world DIR --out docs/garments.png

Renders a small world first when DIR holds none (``--seed``, ``--identities``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image, ImageDraw

from capret.data.garments import build_world, read_world
from capret.data.garments.vocab import CATEGORIES

_TILE = 128
_BOX = (230, 40, 40)  # the listed garment (style 1)
_OTHER = (40, 200, 230)  # an outfit's other garments (style 0)


def _tile(image: Image.Image, *, label: str = "") -> Image.Image:
    image = image.convert("RGB")
    image.thumbnail((_TILE, _TILE))
    tile = Image.new("RGB", (_TILE, _TILE), (255, 255, 255))
    tile.paste(image, ((_TILE - image.width) // 2, (_TILE - image.height) // 2))
    if label:
        ImageDraw.Draw(tile).text((3, _TILE - 12), label, fill=(0, 0, 0))
    return tile


def contact_sheet(world: Path, *, columns: int = 13, consumer_rows: int = 2) -> Image.Image:
    """Row 1: the first shop image of each category (train split); then consumer photos with boxes."""
    split = world / "deepfashion2" / "train"
    shops: dict[int, Image.Image] = {}
    users: list[Path] = []
    for anno_path in sorted((split / "annos").glob("*.json")):
        anno = json.loads(anno_path.read_text())
        if anno["source"] == "shop":
            category = anno["item1"]["category_id"]
            if category not in shops:
                image = Image.open(split / "image" / f"{anno_path.stem}.jpg")
                shops[category] = _tile(image, label=CATEGORIES[category - 1])
        else:
            users.append(anno_path)
    wanted = columns * consumer_rows
    step = max(1, len(users) // wanted)  # spread over the identities, not the first few
    tiles = []
    for anno_path in users[::step][:wanted]:
        anno = json.loads(anno_path.read_text())
        image = Image.open(split / "image" / f"{anno_path.stem}.jpg").convert("RGB")
        draw = ImageDraw.Draw(image)
        for key, item in anno.items():
            if key.startswith("item"):
                draw.rectangle(item["bounding_box"], outline=_BOX if item["style"] else _OTHER, width=2)
        tiles.append(_tile(image))
    sheet = Image.new("RGB", (columns * _TILE, (1 + consumer_rows) * _TILE), (255, 255, 255))
    for column, category in enumerate(sorted(shops)[:columns]):
        sheet.paste(shops[category], (column * _TILE, 0))
    for index, tile in enumerate(tiles):
        sheet.paste(tile, ((index % columns) * _TILE, (1 + index // columns) * _TILE))
    return sheet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=Path, required=True, help="garment world folder (rendered if empty)")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--identities", type=int, default=60)
    args = parser.parse_args()
    if read_world(args.world) is None:
        build_world(args.world, seed=args.seed, identities=args.identities, cir_identities=0,
                    pretrain_identities=0, family_size=1)  # fmt: skip
    sheet = contact_sheet(args.world).quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    sheet.save(args.out, optimize=True)


if __name__ == "__main__":
    main()
