"""CLIP4Cir Combiner, element-wise sum, batch classification loss, tiny HF CLIP loading and feature cache."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tiny_cir import make_tiny_clip, write_image  # noqa: E402

from capret.inference.cir import features as feature_cache  # noqa: E402
from capret.models.clip import load_clip, weights_fingerprint  # noqa: E402
from capret.models.combiner import (  # noqa: E402
    Combiner,
    ElementWiseSum,
    batch_classification_loss,
    create_combiner,
    list_combiners,
)


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory):
    return make_tiny_clip(tmp_path_factory.mktemp("clip"))


def test_combiner_default_sizes_follow_rn50x4():
    model = Combiner(640)
    assert (model.projection_dim, model.hidden_dim) == (2560, 5120)
    assert model.text_projection[0].weight.shape == (2560, 640)
    assert model.fusion[0].weight.shape == (5120, 5120)
    assert model.fusion[3].weight.shape == (640, 5120)
    assert model.dynamic_scalar[3].weight.shape == (1, 5120)


def test_combiner_matches_explicit_formula():
    torch.manual_seed(0)
    model = Combiner(8, projection_dim=12, hidden_dim=20).eval()
    img, txt = torch.randn(5, 8), torch.randn(5, 8)
    out = model(img, txt)

    def lin(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        return x @ layer.weight.T + layer.bias

    tp = torch.relu(lin(model.text_projection[0], txt))
    ip = torch.relu(lin(model.image_projection[0], img))
    joint = torch.cat([tp, ip], dim=1)
    mlp = lin(model.fusion[3], torch.relu(lin(model.fusion[0], joint)))
    lam = torch.sigmoid(lin(model.dynamic_scalar[3], torch.relu(lin(model.dynamic_scalar[0], joint))))
    expected = F.normalize(mlp + lam * txt + (1 - lam) * img, dim=-1)
    torch.testing.assert_close(out, expected)
    assert torch.allclose(out.norm(dim=-1), torch.ones(5))
    assert model.logits(img, txt, targets=img).shape == (5, 5)
    assert model.logit_scale == 100.0


def test_combiner_dropout_only_in_training():
    torch.manual_seed(0)
    model = Combiner(8)
    img, txt = torch.randn(4, 8), torch.randn(4, 8)
    model.train()
    assert not torch.allclose(model(img, txt), model(img, txt))
    model.eval()
    torch.testing.assert_close(model(img, txt), model(img, txt))


def test_element_wise_sum_and_registry():
    img, txt = torch.randn(3, 6), torch.randn(3, 6)
    torch.testing.assert_close(ElementWiseSum()(img, txt), F.normalize(img + txt, dim=-1))
    assert list_combiners() == ["combiner", "sum"]
    assert isinstance(create_combiner("combiner", feature_dim=4), Combiner)
    with pytest.raises(KeyError, match="valid names: combiner, sum"):
        create_combiner("concat")


def test_batch_classification_loss_matches_loop():
    torch.manual_seed(1)
    query = F.normalize(torch.randn(6, 5), dim=-1)
    targets = torch.randn(6, 5)
    loss = batch_classification_loss(query, targets)
    norm_t = F.normalize(targets, dim=-1)
    terms = []
    for i in range(6):
        scores = [100.0 * float(query[i] @ norm_t[j]) for j in range(6)]
        m = max(scores)
        log_z = m + torch.log(torch.tensor([sum(torch.exp(torch.tensor(s - m)) for s in scores)]))
        terms.append(float(log_z) - scores[i])
    assert loss.item() == pytest.approx(sum(terms) / 6, rel=1e-4)
    with pytest.raises(ValueError, match="must match"):
        batch_classification_loss(query, targets[:3])


def test_load_tiny_clip_through_from_pretrained(tiny_clip_dir, tmp_path):
    clip = load_clip(tiny_clip_dir, preprocess="targetpad")
    write_image(tmp_path / "a.png", "a", size=(60, 20))
    from PIL import Image

    pixels = clip.transform(Image.open(tmp_path / "a.png"))
    assert pixels.shape == (3, 32, 32)
    img = clip.image_features(pixels[None])
    assert img.shape == (1, clip.feature_dim) == (1, 24)
    txt = clip.encode_text(["is shiny and silver", "fit and flare with a very long description " * 5])
    assert txt.shape == (2, 24)
    assert torch.allclose(txt.norm(dim=-1), torch.ones(2), atol=1e-5)
    tokens = clip.tokenize(["fit and flare"])
    assert tokens["input_ids"][0, 0] == clip.tokenizer.bos_token_id
    assert tokens["input_ids"][0, -1] == clip.tokenizer.eos_token_id
    clip.set_trainable(text=True, image=False)
    assert all(p.requires_grad for p in clip.model.text_model.parameters())
    assert not any(p.requires_grad for p in clip.model.vision_model.parameters())
    with pytest.raises(ValueError, match="valid: targetpad, squarepad, none"):
        load_clip(tiny_clip_dir, preprocess="pad")  # type: ignore[arg-type]


def test_feature_cache_computes_once_and_keys_by_weights(tiny_clip_dir, tmp_path):
    clip = load_clip(tiny_clip_dir)
    names = [f"img{i}" for i in range(5)]
    for n in names:
        write_image(tmp_path / "images" / f"{n}.png", n)
    calls: list[str] = []

    def load(name: str):
        from PIL import Image

        calls.append(name)
        return Image.open(tmp_path / "images" / f"{name}.png")

    cache = tmp_path / "cache"
    first = feature_cache.image_features(
        clip, names + names[:2], load_image=load, cache_dir=cache, batch_size=2
    )
    assert first.names == names and len(calls) == 5
    assert len(list(cache.glob("image-*.safetensors"))) == 1
    second = feature_cache.image_features(clip, names, load_image=load, cache_dir=cache)
    assert len(calls) == 5  # read back, not recomputed
    torch.testing.assert_close(first.features, second.features)
    reference = torch.cat([clip.image_features(clip.transform(load(n))[None]) for n in names]).detach()
    torch.testing.assert_close(second.lookup(names[::-1]), reference.flip(0), atol=1e-5, rtol=1e-4)
    with pytest.raises(KeyError, match="img9"):
        second.lookup(["img9"])

    before = weights_fingerprint(clip.model)
    with torch.no_grad():
        clip.model.visual_projection.weight.add_(0.01)
    assert weights_fingerprint(clip.model) != before
    feature_cache.image_features(clip, names, load_image=load, cache_dir=cache)
    assert len(list(cache.glob("image-*.safetensors"))) == 2

    texts = feature_cache.text_features(clip, ["fit and flare", "is shiny", "fit and flare"], cache_dir=cache)
    assert texts.names == ["fit and flare", "is shiny"]
    torch.testing.assert_close(
        texts.features, feature_cache.encode_texts(clip, ["fit and flare", "is shiny"]), atol=1e-5, rtol=1e-4
    )


def test_cirr_rankings_match_the_full_ranking(tiny_clip_dir, tmp_path):
    """Top-k plus the remaining img_set members gives the same R@k and subset ranking as ranking everything."""
    from tiny_cir import write_cirr

    from capret.data.cirr import CIRR
    from capret.evaluation.cir import cirr_subset_ranking
    from capret.inference.cir.search import FeatureOptions, cirr_with_members, rank_cir_queries

    torch.manual_seed(0)
    ds = CIRR(write_cirr(tmp_path / "cirr", n=6, extra=10), "val")
    clip, fuser = load_clip(tiny_clip_dir), Combiner(24).eval()
    options = FeatureOptions(cache_dir=tmp_path / "cache")

    def ranked(k: int):
        return rank_cir_queries(
            clip,
            fuser,
            references=[t.reference for t in ds.triplets],
            captions=[t.caption for t in ds.triplets],
            gallery=ds.gallery,
            load_image=ds.load_image,
            k=k,
            exclude_reference=True,
            options=options,
        )

    fast = cirr_with_members(ranked(5), dataset=ds)
    full = ranked(len(ds.gallery)).names
    for t, reference in zip(ds.triplets, full):
        ranking = fast[t.query_id]
        assert t.reference not in ranking and ranking[:5] == reference[:5]
        assert cirr_subset_ranking(ranking, reference=t.reference, members=t.members) == cirr_subset_ranking(
            reference, reference=t.reference, members=t.members
        )
