"""The papers' defaults and data paths of the zero-shot mapper tasks (SEARLE phi, Pic2Word, LinCIR), each
checked against the fact read from the authors' code or paper, and the option that restores our earlier choice."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import yaml
from tiny_zeroshot import tiny_open_clip

from capret.config import from_dict
from capret.data.keywords import clean_caption, keyword_spans, pos_spans, replace_keywords, replace_spans
from capret.engine.schedule import build_optimizer, resolve_param_groups
from capret.inference.cir.concepts import CONCEPT_TEMPLATES, SEARLE_TEMPLATES, TEMPLATE_SETS
from capret.inference.cir.inversion_methods import _orders, _pic2word_orders
from capret.inference.cir.methods import CirQuerySet
from capret.inference.cir.oti import OTI_TEMPLATE_SETS, OTIConfig
from capret.models.zeroshot import Pic2WordMapper
from capret.tasks.lincir import LinCIRTask, LinCIRTaskConfig
from capret.tasks.pic2word import Pic2WordTask, Pic2WordTaskConfig
from capret.tasks.searle_phi import PhiTaskConfig, mask_concept

ROOT = Path(__file__).resolve().parents[2]


def test_searle_phi_regulariser_is_the_papers() -> None:
    loss = PhiTaskConfig().loss
    assert (loss.lambda_gpt, loss.top_k_concepts) == (0.75, 150)
    demo = yaml.safe_load((ROOT / "configs" / "searle_phi_demo.yaml").read_text())["loss"]
    assert (demo["lambda_gpt"], demo["top_k_concepts"]) == (0.75, 150)
    # every occurrence of the concept becomes the pseudo-word, as train_phi.py's str.replace does
    assert mask_concept("a dog chasing another dog", "dog") == "a $ chasing another $"


def test_searle_templates_are_the_24_of_the_paper() -> None:
    assert len(SEARLE_TEMPLATES) == 24 and len(set(SEARLE_TEMPLATES)) == 24
    assert SEARLE_TEMPLATES[0] == "This is a photo of a {}" and SEARLE_TEMPLATES[-1] == "{} illustration"
    assert CONCEPT_TEMPLATES is SEARLE_TEMPLATES and OTIConfig().templates == "searle"
    assert OTI_TEMPLATE_SETS["searle"] is SEARLE_TEMPLATES and len(TEMPLATE_SETS["capret"]) == 8


def test_pic2word_optimiser_is_the_papers() -> None:
    trainer = Pic2WordTaskConfig().trainer
    assert (trainer.betas, trainer.eps, trainer.weight_decay, trainer.lr) == ([0.9, 0.98], 1e-6, 0.1, 1e-4)
    mapper = Pic2WordMapper(8, hidden_dim=6, output_dim=4)
    groups = resolve_param_groups(mapper, Pic2WordTask.param_groups(None, mapper))  # type: ignore[arg-type]
    optimizer = build_optimizer(
        groups, name="adamw", lr=trainer.lr, weight_decay=trainer.weight_decay,
        betas=(trainer.betas[0], trainer.betas[1]), eps=trainer.eps,
    )  # fmt: skip
    by_name = {g["name"]: g for g in optimizer.param_groups}
    biases = {id(p) for n, p in mapper.named_parameters() if n.endswith("bias")}
    assert {id(p) for p in by_name["no_decay"]["params"]} == biases and by_name["no_decay"][
        "weight_decay"
    ] == 0
    assert by_name["pic2word"]["weight_decay"] == 0.1 and by_name["pic2word"]["betas"] == (0.9, 0.98)
    assert by_name["pic2word"]["eps"] == 1e-6


def test_pic2word_reads_one_fashioniq_order() -> None:
    queries = CirQuerySet(
        dataset="fashioniq/dress",
        references=["r1", "r2"],
        captions=["Is red and has sleeves", "x"],
        caption_orders=[("is red and has sleeves", "has sleeves and is red"), ("x",)],
        load_image=lambda name: None,
    )
    assert _pic2word_orders(queries) == [["has sleeves and is red"], ["x"]]  # 'a photo of * , {c2} and {c1}'
    assert _orders(queries)[0] == ["is red and has sleeves", "has sleeves and is red"]  # SEARLE / LinCIR


def _fake_tagger(text: str) -> list[tuple[str, str]]:
    tags = {"a": "DET", "red": "ADJ", "dress": "NOUN", "the": "DET", "beach": "NOUN", "walks": "VERB"}
    return [(w, tags.get(w, "ADP")) for w in text.split()]


def test_lincir_keywords_clean_dollars_and_tagged_spans() -> None:
    assert clean_caption("A $5 Red  dress$") == "a 5 red dress"
    assert "$" not in replace_keywords("a $ sign", placeholder="*").replace("*", "")
    tagged = _fake_tagger("a red dress walks on the beach")
    assert pos_spans(tagged) == ["a red dress", "the beach"]  # DET/ADJ/NOUN/PROPN runs (loader.py)
    assert keyword_spans("A red dress walks on the beach", tagger=_fake_tagger) == [
        "a red dress",
        "the beach",
    ]
    out = replace_keywords("A red dress walks on the beach", tagger=_fake_tagger, placeholder="$")
    assert out == "$ walks on $"  # the verb a word list could mask stays


def test_lincir_defaults_and_fallback_word_redrawn_each_epoch(tmp_path: Path) -> None:
    config = LinCIRTaskConfig()
    assert config.model.clip.preprocess == "none" and config.trainer.schedule == "constant"
    assert config.data.keywords == "auto"
    corpus = tmp_path / "captions.txt"
    corpus.write_text("a red dress\nis on and in with for\n")
    config = from_dict(
        LinCIRTaskConfig,
        {
            "data": {"captions": str(corpus), "keywords": "wordlist"},
            "model": {"clip": {"backend": "open_clip", "name": tiny_open_clip(tmp_path / "oc")}},
        },
    )
    task = LinCIRTask(config)
    assert task.edits([0], epoch=0, seed=0) == ["$"]
    no_spans = {task.edits([1], epoch=e, seed=0)[0] for e in range(12)}
    assert len(no_spans) > 1 and all(e.count("$") == 1 for e in no_spans)  # a new word most epochs
    assert task.edits([1], epoch=3, seed=0) == task.edits([1], epoch=3, seed=0)  # resumable
    words = "is on and in with for".split()
    expected = replace_spans("is on and in with for", [], rng=random.Random("0:3:1"))
    assert task.edits([1], epoch=3, seed=0) == [expected] and expected.split() != words


def test_lincir_span_finder_choice() -> None:
    """spaCy is the [nlp] extra; its English model is not on PyPI, so asking for spaCy without it names the
    command that installs it, and ``auto`` falls back to the word lists."""
    pytest.importorskip("spacy")
    import spacy.util

    from capret.errors import ConfigError, MissingDependencyError
    from capret.tasks.lincir import keyword_tagger

    assert keyword_tagger("wordlist") is None
    with pytest.raises(ConfigError, match="valid: spacy, wordlist, auto"):
        keyword_tagger("nltk")
    if spacy.util.is_package("en_core_web_sm"):
        assert keyword_tagger("auto") is not None
        return
    with pytest.raises(MissingDependencyError, match="python -m spacy download en_core_web_sm"):
        keyword_tagger("spacy")
    assert keyword_tagger("auto") is None


def test_validation_selects_the_lincir_checkpoint_on_cirr_val(tmp_path: Path) -> None:
    """CIRR val R@1 every N steps picks the exported model, as SEARLE / Pic2Word / LinCIR select theirs."""
    import json

    from tiny_cir import write_cirr

    from capret.inference.cir.inversion import load_zeroshot_model
    from capret.tasks.lincir import run

    corpus = tmp_path / "captions.txt"
    corpus.write_text("a red dress\na blue shirt with stripes\ntwo dogs on the grass\na small cat\n")
    out = tmp_path / "run"
    config = from_dict(
        LinCIRTaskConfig,
        {
            "data": {"captions": str(corpus), "keywords": "wordlist", "batch_size": 2},
            "model": {"clip": {"backend": "open_clip", "name": tiny_open_clip(tmp_path / "oc")}},
            "validation": {"dataset": "cirr", "root": str(write_cirr(tmp_path / "cirr"))},
            "trainer": {"output_dir": str(out), "max_steps": 4, "eval_every": 2, "progress": False, "monitor": "recall@1",
                        "tensorboard": False, "amp": "off", "num_workers": 0},
        },
    )  # fmt: skip
    assert (
        LinCIRTaskConfig().trainer.monitor == "recall@1"
    )  # the task's default (a trainer section resets it)
    summary = run(config)
    assert summary["best_checkpoint"] and summary["best_step"] in (2, 4)
    sidecar = json.loads((out / "best" / "checkpoint.json").read_text())
    assert 0.0 <= sidecar["metrics"]["recall@1"] <= 1.0 and "recall_subset@1" in sidecar["metrics"]
    best = load_zeroshot_model(out / "best")
    exported = load_zeroshot_model(out / "model")
    x = torch.randn(2, exported.clip.feature_dim)
    with torch.no_grad():
        torch.testing.assert_close(exported.mapper(x), best.mapper(x))
    with pytest.raises(Exception, match="test split has no public targets"):
        config.validation.split = "test1"
        from capret.tasks.lincir import LinCIRTask

        LinCIRTask(config).evaluate(torch.nn.Linear(1, 1))
