"""The k-nearest-neighbour graph of one set of descriptors over itself, for the global rerankers.

αQE/DBA and k-reciprocal re-ranking both need every item's top-``k`` neighbours among the pooled queries and
gallery items (``N = Q + G``). That is an ``N x N`` similarity matrix: at DeepFashion2 validation scale (36,562
items) about 4.4x the work of the query-to-gallery search itself. The matrix is symmetric, so here each tile
``(i, j)`` with ``j > i`` is computed once and serves the rows of ``i`` and, transposed, the rows of ``j``: half the
matrix products, bounded memory (one ``block x block`` tile at a time), no Python loop over items.

Order: neighbours by similarity, ties towards the lower position — the order of a stable descending sort of each
row (tested against exactly that in ``tests/retrieval/test_knn.py``). Each (similarity, position) pair is packed
into one int64 key whose order is that order, so ``topk`` on keys is exact even among equal similarities.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["KnnGraph", "self_knn"]

_LOW = (
    1 << 31
) - 1  # positions are stored as _LOW - position in the low 32 bits (lower position, larger key)


@dataclass(frozen=True)
class KnnGraph:
    """Every row's top-``k`` neighbours among all rows (itself included), best first."""

    sims: torch.Tensor  # [N, k] float32 similarities, descending
    positions: torch.Tensor  # [N, k] int64 row positions
    row_min: torch.Tensor  # [N] float32: each row's smallest similarity (its farthest item); [0] if not asked


def _keys(values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """int64 keys ordered like (value descending, position ascending) when sorted descending."""
    bits = (values.float() + 0.0).view(
        torch.int32
    )  # + 0.0 turns -0.0 into 0.0, as float comparison sees them
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)
    return (ordered << 32) + (_LOW - positions)


def _decode(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ordered = (keys >> 32).to(torch.int32)
    values = torch.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered).view(torch.float32)
    return values, _LOW - (keys & 0xFFFFFFFF)


def _tile_keys(tile: torch.Tensor, k: int, offset: int) -> torch.Tensor:
    """Each row's top-``k`` keys of a full tile.

    Keys are built for a few spare candidates per row only; ``torch.topk`` picks an arbitrary member of a tie at
    its boundary, so a row whose k-th value equals its last spare one (identical descriptors, in practice) is
    redone from all its entries.
    """
    width = tile.shape[1]
    kk = min(k, width)
    spare = min(width, kk + 4)
    candidates, cols = tile.topk(spare, dim=1)
    keys = _keys(candidates, cols + offset).topk(kk, dim=1).values
    if spare < width:
        unsafe = (_decode(keys[:, -1])[0] == candidates[:, -1]).nonzero(as_tuple=True)[0]
        if unsafe.numel():
            every = torch.arange(offset, offset + width, device=tile.device).expand(unsafe.numel(), width)
            keys[unsafe] = _keys(tile[unsafe], every).topk(kk, dim=1).values
    return keys


def _merge(best: torch.Tensor, rows: torch.Tensor, keys: torch.Tensor, k: int) -> torch.Tensor:
    """Merge candidate ``keys`` of ``rows`` (grouped by row, ascending) into each row's running top-``k``."""
    num_rows = best.shape[0]
    counts = torch.bincount(rows, minlength=num_rows)
    slot = torch.arange(rows.numel(), device=rows.device) - (torch.cumsum(counts, 0) - counts)[rows]
    padded = torch.full((num_rows, int(counts.max())), torch.iinfo(torch.int64).min, device=best.device)
    padded[rows, slot] = keys
    touched = (counts > 0).nonzero(as_tuple=True)[0]
    out = best.clone()
    out[touched] = torch.cat([best[touched], padded[touched]], 1).topk(k, dim=1).values
    return out


def _threshold(best: torch.Tensor) -> torch.Tensor:
    """The similarity a candidate must reach to enter a row's (full) list: its k-th value."""
    return _decode(best[:, -1])[0]


def self_knn(feats: torch.Tensor, k: int, *, block: int = 4096, with_row_min: bool = False) -> KnnGraph:
    """Top-``k`` neighbours of every row of ``feats`` among all rows by inner product (see the module doc).

    The diagonal tiles are ranked in full first; they give every row a k-th-best value, and in each later tile
    only the entries that reach a row's (or a column's) current k-th value are gathered and merged — a few per
    row per tile — so selection costs one comparison pass instead of a top-k per tile and direction.

    Args:
        feats: ``[N, D]`` descriptors (L2-normalised for cosine similarity).
        k: neighbours per row, itself included; capped at ``N``.
        block: tile side; one tile holds ``block**2`` floats (64 MiB at 4096).
        with_row_min: also compute each row's smallest similarity (k-reciprocal's distance normaliser);
            otherwise ``row_min`` is empty.
    """
    n = feats.shape[0]
    if n == 0:
        raise ValueError("self_knn needs at least one row")
    if k < 1 or block < 1:
        raise ValueError(f"self_knn needs k >= 1 and block >= 1, got k={k}, block={block}")
    k = min(k, n)
    # every tile is at least k wide, so the diagonal pass fills every row's list
    starts = list(range(0, n, max(block, k)))
    while len(starts) > 1 and n - starts[-1] < k:
        starts.pop()
    ends = [*starts[1:], n]
    row_min = torch.full((n if with_row_min else 0,), torch.inf, device=feats.device)
    best: list[torch.Tensor] = []
    for i0, i1 in zip(starts, ends, strict=True):
        rows = feats[i0:i1]
        tile = (rows @ rows.T).float()
        best.append(_tile_keys(tile, k, i0))
        if with_row_min:
            row_min[i0 : i0 + tile.shape[0]] = torch.amin(tile, 1)
    for a, (i0, i1) in enumerate(zip(starts, ends, strict=True)):
        rows = feats[i0:i1]
        for b in range(a + 1, len(starts)):
            j0 = starts[b]
            tile = (rows @ feats[j0 : ends[b]].T).float()
            if with_row_min:
                span_a, span_b = slice(i0, i0 + tile.shape[0]), slice(j0, j0 + tile.shape[1])
                row_min[span_a] = torch.minimum(row_min[span_a], torch.amin(tile, 1))
                row_min[span_b] = torch.minimum(row_min[span_b], torch.amin(tile, 0))
            # entries that reach the k-th value of their row (block a) or of their column (block b); ties are
            # kept, since a lower position wins them
            row_need, col_need = _threshold(best[a])[:, None], _threshold(best[b])[None, :]
            r, c = ((tile >= row_need) | (tile >= col_need)).nonzero(as_tuple=True)
            if r.numel() == 0:
                continue
            values = tile[r, c]
            for_row = values >= row_need[r, 0]
            if for_row.any():
                best[a] = _merge(best[a], r[for_row], _keys(values[for_row], c[for_row] + j0), k)
            for_col = values >= col_need[0, c]
            if for_col.any():
                cc, rr, vv = c[for_col], r[for_col], values[for_col]
                order = cc.argsort(stable=True)
                best[b] = _merge(best[b], cc[order], _keys(vv[order], rr[order] + i0), k)
    sims, positions = _decode(torch.cat(best))
    return KnnGraph(sims=sims, positions=positions, row_min=row_min)
