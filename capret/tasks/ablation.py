"""Ablation runner: train and evaluate named config variants over seeds; mean +- std tables and a bar chart.

``capret ablate --config X.yaml --variants V.yaml --seeds 3 --out DIR`` (``capret/cli/ablate.py``) calls
:func:`run_ablation`. The variants file names each variant with the config overrides that make it::

    variants:
      - name: image_only                      # dual-stream model, captions off
        overrides: {data.captions: null, data.val_captions: null, loss.itc_weight: 0.0, loss.box_weight: 0.0}
      - name: image_only_category_filtered    # same model, ranking filtered by the annotated category (oracle)
        overrides: {data.captions: null, data.val_captions: null, loss.itc_weight: 0.0, loss.box_weight: 0.0}
        category_filter: true
      - name: gem_resnet18                    # a baseline instead of a trained dual-stream model
        baseline: {name: gem, source: resnet18, pretrained: true, whiten_dim: 128}

Variants with the same training config (a model scored with and without the category filter) share one training
per seed (``DIR/train/<config hash>/seed<n>``). Each run ``(variant, seed)`` writes ``DIR/runs/<variant>/seed<seed>/result.json`` atomically when it is done;
a rerun skips every run whose result exists (resumable), so an interrupted ablation loses at most the run in
progress. Every variant is scored by the same protocol (ground-truth boxes on the base config's validation
split, :func:`capret.inference.dualstream.baselines.score_items`): mAP, R@k and the official DeepFashion2 top-k, plus the box
head's grounding quality for dual-stream runs with captions. ``DIR/ablation.json`` and ``DIR/ablation.md`` hold
mean +- std over seeds, ``DIR/ablation.png`` the bar chart.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from capret.config import ConfigError, from_dict, load_yaml_file, merge_trees, parse_overrides, set_nested
from capret.data.captions import join_captions
from capret.data.deepfashion2 import gt_box_protocol, load_items
from capret.inference.dualstream.baselines import evaluate_baseline, score_items
from capret.inference.dualstream.encoding import box_quality, encode_items, load_model, predict_item_boxes
from capret.io import atomic_write_json, atomic_write_text

__all__ = ["TABLE_METRICS", "Variant", "load_variants", "run_ablation", "summarise"]

logger = logging.getLogger(__name__)

#: metrics of the table (fractions), in column order; official top-k = R@k under ground-truth boxes
TABLE_METRICS = ("map", "recall@1", "recall@10", "official_top1", "official_top10", "box_miou")
_RESULT = "result.json"


@dataclass
class Variant:
    """One named configuration of the ablation."""

    name: str
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted config key -> value
    baseline: dict[str, Any] | None = None  # a registered baseline instead of training the dual-stream model
    category_filter: bool = False  # rank same-category gallery items first (annotated category: an oracle)
    captions: bool = True  # evaluate with the validation captions when the config has them


def load_variants(path: str | Path) -> list[Variant]:
    """Read a variants YAML (see the module docstring); names must be unique path-safe words."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"variants file {path} does not exist")
    raw = load_yaml_file(path) or {}  # syntax, duplicate keys, python tags: named with the file
    entries = raw.get("variants") if isinstance(raw, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{path}: expected a non-empty list under `variants:`")
    valid = {"name", "overrides", "baseline", "category_filter", "captions"}
    variants: list[Variant] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "name" not in entry:
            raise ConfigError(f"{path}: variant {i} must be a mapping with a `name`")
        unknown = set(entry) - valid
        if unknown:
            raise ConfigError(
                f"{path}: variant {entry['name']!r} has unknown keys {sorted(unknown)}; valid: {sorted(valid)}"
            )
        name = str(entry["name"])
        if not name.replace("_", "").replace("-", "").replace("+", "").isalnum():
            raise ConfigError(f"{path}: variant name {name!r} must be letters, digits, '_', '-', '+'")
        if any(v.name == name for v in variants):
            raise ConfigError(f"{path}: variant name {name!r} appears twice")
        variants.append(
            Variant(
                name=name,
                overrides=dict(entry.get("overrides") or {}),
                baseline=dict(entry["baseline"]) if entry.get("baseline") else None,
                category_filter=bool(entry.get("category_filter", False)),
                captions=bool(entry.get("captions", True)),
            )
        )
    return variants


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    set_nested(tree, key.split("."), value, what=f"override {key!r}")


def _training_key(base: dict[str, Any], variant: Variant) -> str:
    """Variants whose training configs are equal (e.g. a model scored with and without the category filter)
    share one training per seed: the key is a hash of the resolved config tree."""
    tree = json.loads(json.dumps(base))
    for key, value in variant.overrides.items():
        _set_dotted(tree, key, value)
    return hashlib.sha1(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:12]


def _run_key(base: dict[str, Any], variant: Variant) -> str:
    """What makes a finished run reusable: its resolved training config and how the variant scores it."""
    what = {
        "train": _training_key(base, variant),
        "baseline": variant.baseline,
        "category_filter": variant.category_filter,
        "captions": variant.captions,
    }
    return hashlib.sha1(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _variant_config(base: dict[str, Any], variant: Variant, *, seed: int, train_dir: Path) -> Any:
    """The typed dual-stream config of one run: base + variant overrides + seed + training folders."""
    from capret.tasks.dualstream import DualStreamConfig

    tree = json.loads(json.dumps(base))
    for key, value in variant.overrides.items():
        _set_dotted(tree, key, value)
    _set_dotted(tree, "trainer.seed", seed)
    _set_dotted(tree, "trainer.output_dir", str(train_dir / "run"))
    _set_dotted(tree, "eval.export_dir", str(train_dir / "model"))
    try:
        return from_dict(DualStreamConfig, tree)
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"variant {variant.name!r}: {exc}") from exc


def _check_inputs(base: dict[str, Any], variants: list[Variant]) -> None:
    """Fail before the first run when a variant's data root or caption store does not exist (not an hour in)."""
    problems = []
    for variant in variants:
        tree = json.loads(json.dumps(base))
        for key, value in variant.overrides.items():
            _set_dotted(tree, key, value)
        data = tree.get("data", {})
        needed = [("data.root", data.get("root"), Path.is_dir)]
        if variant.baseline is None or variant.baseline.get("name") == "late_fusion":
            needed += [
                (k, data.get(k.split(".")[1]), Path.is_file) for k in ("data.captions", "data.val_captions")
            ]
        for key, value, exists in needed:
            if value is not None and not exists(Path(str(value))):
                problems.append(f"{variant.name}: {key} {value} does not exist")
    if problems:
        raise ConfigError("; ".join(problems) + " (fix the paths, or leave those variants out with --only)")


def _run_one(base: dict[str, Any], variant: Variant, *, seed: int, out_dir: Path) -> dict[str, Any]:
    """Train (or fit) and evaluate one ``(variant, seed)``; returns the result record."""
    from capret.models.dual_stream import MODEL_CONFIG_FILE
    from capret.tasks.dualstream import run as train_dualstream

    key = _training_key(base, variant)
    train_dir = out_dir / "train" / key / f"seed{seed}"
    config = _variant_config(base, variant, seed=seed, train_dir=train_dir)
    data, ks = config.data, list(config.eval.ks)
    val_split = data.val_split or "validation"
    val_captions = data.val_captions if variant.captions else None
    if variant.baseline is not None:
        metrics = evaluate_baseline(
            variant.baseline,
            root=data.root,
            train_split=data.train_split,
            val_split=val_split,
            train_captions=data.captions,
            val_captions=data.val_captions,
            ks=ks,
            category_filter=variant.category_filter,
            seed=seed,
            batch_size=config.eval.batch_size,
        )
        return {"kind": "baseline", "spec": variant.baseline, **metrics}
    model_dir = train_dir / "model"
    summary_path = train_dir / "train_result.json"
    if (model_dir / MODEL_CONFIG_FILE).is_file() and summary_path.is_file():
        trained = json.loads(summary_path.read_text())  # trained for another variant with the same config
    else:
        trained = json.loads(json.dumps(train_dualstream(config), default=str))
        atomic_write_json(summary_path, trained, indent=2)
    model = load_model(model_dir).model
    queries, gallery = gt_box_protocol(load_items(data.root, val_split, progress=False))
    feats = []
    for side in (queries.items, gallery.items):
        captions = join_captions(side, val_captions, warn=False).captions if val_captions else None
        feats.append(
            encode_items(
                model,
                root=data.root,
                split=val_split,
                items=side,
                captions=captions,
                batch_size=config.eval.batch_size,
            )
        )
    metrics = score_items(
        feats[0], feats[1], queries.items, gallery.items, ks=ks, category_filter=variant.category_filter
    )
    if val_captions is not None:
        items = [*queries.items, *gallery.items]
        pred, target = predict_item_boxes(
            model,
            root=data.root,
            split=val_split,
            items=items,
            captions=join_captions(items, val_captions, warn=False).captions,
            batch_size=config.eval.batch_size,
        )
        metrics.update(box_quality(pred, target))
    return {
        "kind": "dualstream",
        "training": key,
        "train_steps": trained.get("steps"),
        "train_seconds": trained.get("seconds"),
        "eval_captions": str(val_captions) if val_captions else "none",
        "train_captions": str(data.captions) if data.captions else "none",
        **metrics,
    }


def summarise(results: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Mean and sample standard deviation (ddof 1; 0 for one seed) of :data:`TABLE_METRICS` per variant."""
    table: dict[str, dict[str, Any]] = {}
    for name, runs in results.items():
        row: dict[str, Any] = {"seeds": len(runs)}
        for metric in TABLE_METRICS:
            values = np.array([float(r[metric]) for r in runs if metric in r], dtype=np.float64)
            if len(values):
                row[metric] = {
                    "mean": float(values.mean()),
                    "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                    "values": values.tolist(),
                }
        table[name] = row
    return table


def _markdown(table: dict[str, dict[str, Any]], *, header: str) -> str:
    metrics = [m for m in TABLE_METRICS if any(m in row for row in table.values())]
    lines = [
        header,
        "",
        "| variant | seeds | " + " | ".join(metrics) + " |",
        "|---|---|" + "---|" * len(metrics),
    ]
    for name, row in table.items():
        cells = [f"{row[m]['mean']:.3f} ± {row[m]['std']:.3f}" if m in row else "–" for m in metrics]
        lines.append(f"| {name} | {row['seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _bar_chart(table: dict[str, dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(table)
    metrics = [m for m in ("map", "recall@1", "recall@10") if any(m in r for r in table.values())]
    x = np.arange(len(names))
    width = 0.8 / max(1, len(metrics))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(names)), 4.0))
    for i, metric in enumerate(metrics):
        means = [table[n].get(metric, {}).get("mean", 0.0) for n in names]
        stds = [table[n].get(metric, {}).get("std", 0.0) for n in names]
        ax.bar(x + (i - (len(metrics) - 1) / 2) * width, means, width, yerr=stds, capsize=3, label=metric)
    ax.set_xticks(x, names, rotation=25, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("fraction (mean ± std over seeds)")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path


def run_ablation(
    *,
    config: str | Path,
    variants: str | Path,
    seeds: int | Sequence[int],
    out_dir: str | Path,
    overrides: Sequence[str] = (),
    only: Sequence[str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run every ``(variant, seed)`` not finished yet, then write the tables and the chart.

    Args:
        config: base dual-stream YAML config.
        variants: variants YAML (see the module docstring).
        seeds: a count (seeds ``0..n-1``) or explicit seeds.
        out_dir: output folder; finished runs found there are skipped.
        overrides: ``key=value`` applied to the base config before every variant (e.g. ``trainer.max_seconds=40``).
        only: run only these variant names.
        progress: show the bar over the runs and each run's training bar (False hides both).
    """
    from tqdm.auto import tqdm

    config, out_dir = Path(config), Path(out_dir)
    if not config.is_file():
        raise ConfigError(f"config file {config} does not exist")
    base = load_yaml_file(config) or {}
    if base.get("task", "dualstream") != "dualstream":
        raise ConfigError(f"{config}: ablations run task dualstream, not {base.get('task')!r}")
    base = merge_trees(base, parse_overrides(overrides))
    if not progress:  # no training bar inside each run either
        base = merge_trees(base, {"trainer": {"progress": False}})
    chosen = load_variants(variants)
    if only:
        unknown = sorted(set(only) - {v.name for v in chosen})
        if unknown:
            raise ConfigError(f"--only {unknown}: not in {variants}; valid: {[v.name for v in chosen]}")
        chosen = [v for v in chosen if v.name in only]
    _check_inputs(base, chosen)
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seed_list:
        raise ConfigError("--seeds must give at least one seed")
    results: dict[str, list[dict[str, Any]]] = {v.name: [] for v in chosen}
    skipped = 0
    jobs = [(v, s) for v in chosen for s in seed_list]
    for variant, seed in tqdm(jobs, desc="ablation", unit="run", disable=not progress):
        run_dir = out_dir / "runs" / variant.name / f"seed{seed}"
        done = run_dir / _RESULT
        # a finished run counts only for the config it was run with: a changed base config, override or
        # variant definition (a new recipe) reruns it instead of reusing a stale result
        key = _run_key(base, variant)
        if done.is_file():
            previous = json.loads(done.read_text())
            if previous.get("config_key") == key:
                results[variant.name].append(previous)
                skipped += 1
                continue
            logger.warning(
                "ablation: %s seed %d was run with another config; running it again", variant.name, seed
            )
        logger.info("ablation: %s seed %d", variant.name, seed)
        record = {
            "variant": variant.name,
            "seed": seed,
            "config_key": key,
            **_run_one(base, variant, seed=seed, out_dir=out_dir),
        }
        record = json.loads(json.dumps(record, default=float))
        atomic_write_json(done, record, indent=2)
        results[variant.name].append(record)
    table = summarise(results)
    summary = {
        "config": str(config),
        "variants": str(variants),
        "overrides": list(overrides),
        "seeds": seed_list,
        "skipped_finished_runs": skipped,
        "table": table,
    }
    atomic_write_json(out_dir / "ablation.json", summary, indent=2)
    header = f"Ablation of `{config}` ({len(seed_list)} seed(s); mean ± std; fractions)"
    atomic_write_text(out_dir / "ablation.md", _markdown(table, header=header))
    _bar_chart(table, out_dir / "ablation.png")
    return {**summary, "json": str(out_dir / "ablation.json"), "markdown": str(out_dir / "ablation.md"),
            "chart": str(out_dir / "ablation.png")}  # fmt: skip
