"""Scoring baselines and rule variants under the dual-stream model's ground-truth-box protocol.

* :func:`score_items` — mAP / R@k and the official DeepFashion2 top-k of query/gallery features, optionally
  **category-filtered** (gallery items of another category than the query's are ranked after all items of its
  category: the "image model + category filter" baseline that shipping fashion search uses). The filter reads
  the annotated category, so it is an oracle and every result that uses it says so (``category_filter``).
* :func:`encode_baseline_items` — item crops through a registered baseline (:mod:`capret.models.baselines`).
* :func:`evaluate_baseline` — fit (PCA whitening on train items), encode and score a baseline; ``late_fusion``
  scores ``a * image + (1 - a) * caption`` similarities (an image baseline and a sentence encoder over the
  captions), with ``a`` picked on held-out *train* identities, never on the reported split.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from capret.data.captions import join_captions
from capret.data.deepfashion2 import Item, gt_box_protocol, load_items
from capret.data.items import ItemDataset, ItemTransform
from capret.errors import ConfigError
from capret.evaluation.deepfashion2 import evaluate_gt_boxes
from capret.io import default_device
from capret.models.baselines import Baseline, create_baseline

__all__ = ["encode_baseline_items", "evaluate_baseline", "late_fusion_scores", "score_items"]

_CATEGORY_WEIGHT = 3.0  # one-hot scale: +9 on same-category similarities, beyond any cosine gap (<= 2)


def score_items(
    query_features: np.ndarray,
    gallery_features: np.ndarray,
    query_items: Sequence[Item],
    gallery_items: Sequence[Item],
    *,
    ks: Sequence[int],
    category_filter: bool = False,
) -> dict[str, Any]:
    """Ground-truth-box metrics of a ranking by inner product; see the module docstring for the filter."""
    q, g = np.asarray(query_features, np.float32), np.asarray(gallery_features, np.float32)
    if category_filter:
        # Appending scaled one-hot categories adds 9 to every same-category score: the ranking is "same
        # category first, by similarity", which the shared evaluator then scores unchanged.
        cats = sorted({it.category_id for it in [*query_items, *gallery_items]})
        col = {c: i for i, c in enumerate(cats)}

        def onehot(items: Sequence[Item]) -> np.ndarray:
            out = np.zeros((len(items), len(cats)), np.float32)
            out[np.arange(len(items)), [col[it.category_id] for it in items]] = _CATEGORY_WEIGHT
            return out

        q, g = np.hstack([q, onehot(query_items)]), np.hstack([g, onehot(gallery_items)])
    ks = sorted({k for k in ks if k <= len(gallery_items)})
    metrics = evaluate_gt_boxes(q, g, list(query_items), list(gallery_items), ks=ks)
    metrics["category_filter"] = "annotation (oracle)" if category_filter else "none"
    return metrics


def encode_baseline_items(
    model: Baseline,
    *,
    root: str | Path,
    split: str,
    items: Sequence[Item],
    crop_margin: float = 0.1,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    whitened: bool = True,
) -> np.ndarray:
    """Descriptors of item crops (``whitened=False``: before whitening, what whitening is fitted on)."""
    device = default_device(device)
    dc = model.data_config
    transform = ItemTransform(
        image_size=dc.image_size, mean=dc.mean, std=dc.std, mode="crop", crop_margin=crop_margin
    )
    dataset = ItemDataset(
        root=root, split=split, items=items, labels=np.zeros(len(items), np.int64), transform=transform
    )
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=0)
    model.to(device).eval()
    rows = []
    with torch.inference_mode():
        for batch in loader:
            pixels = batch["pixels"].to(device)
            out = model.encode(pixels) if whitened else model.descriptors(pixels)
            rows.append(out.float().cpu().numpy())
    return np.concatenate(rows) if rows else np.zeros((0, model.embed_dim), np.float32)


def late_fusion_scores(
    image_q: np.ndarray,
    image_g: np.ndarray,
    caption_q: np.ndarray,
    caption_g: np.ndarray,
    query_has: np.ndarray,
    gallery_has: np.ndarray,
    *,
    alpha: float,
) -> np.ndarray:
    """``alpha * image + (1 - alpha) * caption`` cosine scores ``[Q, G]``; a pair in which either side has no
    caption is scored by the image alone."""
    image = image_q @ image_g.T
    caption = caption_q @ caption_g.T
    both = query_has[:, None] & gallery_has[None, :]
    return np.where(both, alpha * image + (1 - alpha) * caption, image).astype(np.float32)


def _scores_to_features(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Query/gallery "features" whose inner products are ``scores`` (identity gallery), for the evaluator."""
    return scores.astype(np.float32), np.eye(scores.shape[1], dtype=np.float32)


def _holdout(items: list[Item], *, fraction: float, seed: int) -> tuple[list[Item], list[Item]]:
    """Split train items by identity: ``fraction`` of the identities are held out (for tuning)."""
    identities = sorted({it.identity for it in items})
    rng = np.random.default_rng(seed)
    count = max(1, round(len(identities) * fraction))
    held = {identities[i] for i in rng.choice(len(identities), size=count, replace=False)}
    return [it for it in items if it.identity not in held], [it for it in items if it.identity in held]


def evaluate_baseline(
    spec: dict[str, Any],
    *,
    root: str | Path,
    train_split: str,
    val_split: str,
    train_captions: str | Path | None = None,
    val_captions: str | Path | None = None,
    ks: Sequence[int] = (1, 5, 10, 20),
    category_filter: bool = False,
    seed: int = 0,
    batch_size: int = 64,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Build, fit and score one baseline on the validation split's ground-truth-box protocol.

    Args:
        spec: ``{"name": <registered baseline>, **constructor arguments}``, or ``{"name": "late_fusion",
            "image": <baseline spec>, "text": <hub id / folder / "minilm">, "holdout": 0.2, "alphas": [...]}``.
        root, train_split, val_split: the DeepFashion2-layout data; train items fit whitening and tune alpha.
        train_captions, val_captions: caption stores (late fusion only).
        ks, category_filter: as in :func:`score_items`.
        seed: the identity hold-out of late fusion.
    """
    spec = dict(spec)
    name = str(spec.pop("name", ""))
    fusion = None
    if name == "late_fusion":
        fusion = {k: spec.pop(k) for k in ("text", "holdout", "alphas") if k in spec}
        spec = dict(spec.pop("image", {"name": "gem"}))
        name = str(spec.pop("name", "gem"))
    model = create_baseline(name, **spec)
    train = [it for it in load_items(root, train_split, progress=False) if it.style > 0]

    def encode(items: list[Item], split: str, *, whitened: bool = True) -> np.ndarray:
        return encode_baseline_items(
            model,
            root=root,
            split=split,
            items=items,
            batch_size=batch_size,
            device=device,
            whitened=whitened,
        )

    if model.needs_fit:
        model.fit_whitening(torch.from_numpy(encode(train, train_split, whitened=False)))
    queries, gallery = gt_box_protocol(load_items(root, val_split, progress=False))
    q_img, g_img = encode(queries.items, val_split), encode(gallery.items, val_split)
    result: dict[str, Any] = {"baseline": name}
    if fusion is None:
        return {**result, **score_items(q_img, g_img, queries.items, gallery.items, ks=ks,
                                        category_filter=category_filter)}  # fmt: skip
    if category_filter:
        raise ConfigError("late_fusion does not combine with category_filter")
    text = _sentence_encoder(str(fusion.get("text", "minilm")))
    alphas = [float(a) for a in fusion.get("alphas", np.linspace(0.0, 1.0, 11))]
    _, held = _holdout(train, fraction=float(fusion.get("holdout", 0.2)), seed=seed)
    hq, hg = gt_box_protocol(held)
    held_parts = _fusion_parts(
        text,
        hq.items,
        hg.items,
        train_captions,
        image=(encode(hq.items, train_split), encode(hg.items, train_split)),
    )
    tuning = []
    for alpha in alphas:
        q, g = _scores_to_features(late_fusion_scores(*held_parts, alpha=alpha))
        tuning.append(float(score_items(q, g, hq.items, hg.items, ks=[1])["map"]))
    best = alphas[int(np.argmax(tuning))]
    parts = _fusion_parts(text, queries.items, gallery.items, val_captions, image=(q_img, g_img))
    q, g = _scores_to_features(late_fusion_scores(*parts, alpha=best))
    metrics = score_items(q, g, queries.items, gallery.items, ks=ks)
    tuned = {f"{a:g}": m for a, m in zip(alphas, tuning)}
    return {**result, "fusion": "late", "alpha": best, "alpha_tuning_map": tuned, **metrics}


def _sentence_encoder(source: str) -> Any:
    from capret.models.encoders import create_encoder, minilm_dir

    path = str(minilm_dir()) if source == "minilm" else source
    return create_encoder("hf_text", source=path, pretrained=True, max_length=64, freeze=True).eval()


def _fusion_parts(
    text: Any,
    queries: list[Item],
    gallery: list[Item],
    captions: str | Path | None,
    *,
    image: tuple[np.ndarray, np.ndarray],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Image and caption embeddings of both sides plus which items have a caption (late fusion's inputs)."""
    q_cap = join_captions(queries, captions, warn=False).captions
    g_cap = join_captions(gallery, captions, warn=False).captions

    def embed(caps: list[str | None]) -> np.ndarray:
        with torch.inference_mode():
            tokens = text.tokenize([c or "" for c in caps])
            pooled = text(tokens["input_ids"], tokens["attention_mask"]).pooled
        return torch.nn.functional.normalize(pooled.float(), dim=-1).numpy()

    has_q = np.array([c is not None for c in q_cap])
    has_g = np.array([c is not None for c in g_cap])
    return image[0], image[1], embed(q_cap), embed(g_cap), has_q, has_g
