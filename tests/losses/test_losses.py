"""ITC and box losses against explicit per-pair / per-box references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from capret.losses import BoxLoss, ITCLoss, box_loss, create_loss, itc_loss, list_losses
from capret.losses import gather as distributed


def _itc_reference(image: torch.Tensor, text: torch.Tensor, temperature: float) -> tuple[float, float]:
    """InfoNCE computed pair by pair with Python loops (normalised embeddings)."""

    def unit(v: list[float]) -> list[float]:
        norm = math.sqrt(sum(x * x for x in v))
        return [x / norm for x in v]

    image = [unit(v) for v in image.tolist()]
    text = [unit(v) for v in text.tolist()]
    n = len(image)

    def sim(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b)) / temperature

    i2t = t2i = 0.0
    for i in range(n):
        row = [sim(image[i], text[j]) for j in range(n)]
        i2t += -(row[i] - math.log(sum(math.exp(s) for s in row)))
        col = [sim(text[i], image[j]) for j in range(n)]
        t2i += -(col[i] - math.log(sum(math.exp(s) for s in col)))
    return i2t / n, t2i / n


def test_itc_matches_pairwise_loop() -> None:
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    text = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    out = itc_loss(image, text, temperature=0.1)
    i2t, t2i = _itc_reference(image, text, 0.1)
    assert out["i2t"].item() == pytest.approx(i2t, rel=1e-6)
    assert out["t2i"].item() == pytest.approx(t2i, rel=1e-6)
    assert out["loss"].item() == pytest.approx((i2t + t2i) / 2, rel=1e-6)
    assert out["temperature"].item() == pytest.approx(0.1)


def test_itc_module_temperature_init_clamp_and_gradient() -> None:
    loss = ITCLoss()
    assert loss.temperature.item() == pytest.approx(0.07)
    image, text = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8)
    out = loss(image, text)
    out["loss"].backward()
    assert loss.temperature.grad is not None and torch.isfinite(loss.temperature.grad)
    assert image.grad is not None
    with torch.no_grad():
        loss.temperature.fill_(3.0)
    assert loss(image, text)["temperature"].item() == pytest.approx(0.5)
    with torch.no_grad():
        loss.temperature.fill_(1e-6)
    assert loss(image, text)["temperature"].item() == pytest.approx(0.001)
    fixed = ITCLoss(learnable=False, init_temperature=0.05)
    assert not any(True for _ in fixed.parameters())
    with pytest.raises(ValueError, match="min_temperature"):
        ITCLoss(init_temperature=0.9)


@pytest.mark.parametrize("sizes", [(4, 4, 4), (2, 0, 3), (1, 5)])
def test_itc_gather_path_equals_full_batch(monkeypatch: pytest.MonkeyPatch, sizes: tuple[int, ...]) -> None:
    """Simulated ranks (equal, unequal and empty local batches): the mean of the per-rank losses is the
    full-batch loss, and its gradient is the full-batch gradient (what DDP's averaging applies)."""
    world, total, d = len(sizes), sum(sizes), 6
    offsets = [sum(sizes[:r]) for r in range(world)]
    gen = torch.Generator().manual_seed(1)
    full_image = torch.randn(total, d, generator=gen, dtype=torch.float64, requires_grad=True)
    full_text = torch.randn(total, d, generator=gen, dtype=torch.float64, requires_grad=True)
    temperature = torch.tensor(0.07, dtype=torch.float64, requires_grad=True)

    reference = itc_loss(full_image, full_text, temperature=temperature)
    ref_grads = torch.autograd.grad(reference["loss"], [full_image, full_text, temperature])

    calls: list[tuple[int, int]] = []

    def fake_sizes(rows: int, *, world_size: int, device: torch.device, group: object = None) -> list[int]:
        return list(sizes)

    def fake_gather(
        tensor: torch.Tensor, *, rank: int, world_size: int, group: object = None, sizes: list[int]
    ) -> torch.Tensor:
        # itc_loss gathers the (normalised) image rows first, then the text rows. The result holds every
        # rank's rows with the local slice being the very tensor passed in; the other slices keep their
        # gradient too, which is what the real gather's summing backward achieves across processes.
        full = (full_image, full_text)[len(calls) % 2]
        calls.append((rank, world_size))
        normed = F.normalize(full, dim=-1)
        lo = offsets[rank]
        return torch.cat([normed[:lo], tensor, normed[lo + sizes[rank] :]])

    monkeypatch.setattr(distributed, "all_gather_sizes", fake_sizes)
    monkeypatch.setattr(distributed, "all_gather_with_grad", fake_gather)
    terms = []
    for rank in range(world):
        local = slice(offsets[rank], offsets[rank] + sizes[rank])
        out = itc_loss(
            full_image[local], full_text[local], temperature=temperature, rank=rank, world_size=world
        )
        terms.append(torch.stack([out["loss"], out["i2t"], out["t2i"]]))
    mean = torch.stack(terms).mean(dim=0)
    assert mean[0].item() == pytest.approx(reference["loss"].item(), rel=1e-10)
    assert mean[1].item() == pytest.approx(reference["i2t"].item(), rel=1e-10)
    assert mean[2].item() == pytest.approx(reference["t2i"].item(), rel=1e-10)
    grads = torch.autograd.grad(mean[0], [full_image, full_text, temperature])
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)
    assert calls == [(r, world) for r in range(world) for _ in range(2)]


def _itc_identity_reference(
    image: torch.Tensor, text: torch.Tensor, ids: list[int], temperature: float
) -> tuple[float, float]:
    """Multi-positive InfoNCE written out with loops: row i's target mass is spread evenly over every j with
    ids[j] == ids[i] (X-VLM's retrieval fine-tuning), in both directions."""

    def unit(v: list[float]) -> list[float]:
        norm = math.sqrt(sum(x * x for x in v))
        return [x / norm for x in v]

    image_rows = [unit(v) for v in image.tolist()]
    text_rows = [unit(v) for v in text.tolist()]
    n = len(ids)
    totals = [0.0, 0.0]
    for direction, (a, b) in enumerate(((image_rows, text_rows), (text_rows, image_rows))):
        for i in range(n):
            sims = [sum(x * y for x, y in zip(a[i], b[j])) / temperature for j in range(n)]
            log_z = math.log(sum(math.exp(s) for s in sims))
            positives = [j for j in range(n) if ids[j] == ids[i]]
            totals[direction] += -sum((sims[j] - log_z) / len(positives) for j in positives)
    return totals[0] / n, totals[1] / n


def test_itc_identity_targets_match_loop() -> None:
    gen = torch.Generator().manual_seed(3)
    ids = [0, 0, 1, 2, 2, 2, 3, 0]  # K items of an identity, one repeated as the P x K sampler does
    image = torch.randn(8, 5, generator=gen, dtype=torch.float64)
    text = torch.randn(8, 5, generator=gen, dtype=torch.float64)
    text[1] = text[0]  # a duplicated sample: it must count as a positive, never as a negative
    out = itc_loss(image, text, temperature=0.1, ids=torch.tensor(ids))
    i2t, t2i = _itc_identity_reference(image, text, ids, 0.1)
    assert out["i2t"].item() == pytest.approx(i2t, rel=1e-9)
    assert out["t2i"].item() == pytest.approx(t2i, rel=1e-9)
    # distinct ids reproduce plain InfoNCE; shared ids change the loss
    plain = itc_loss(image, text, temperature=0.1)
    distinct = itc_loss(image, text, temperature=0.1, ids=torch.arange(8) * 7)
    assert distinct["loss"].item() == pytest.approx(plain["loss"].item(), rel=1e-12)
    assert out["loss"].item() != pytest.approx(plain["loss"].item(), rel=1e-3)
    with pytest.raises(ValueError, match="ids"):
        itc_loss(image, text, temperature=0.1, ids=torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("sizes", [(4, 4), (3, 0, 5), (2, 6, 1)])
def test_itc_identity_targets_across_ranks(monkeypatch: pytest.MonkeyPatch, sizes: tuple[int, ...]) -> None:
    """Identities spread over simulated ranks: ids are gathered, the mean of the per-rank losses equals the
    full-batch loop reference, and the gradients equal the full-batch gradients."""
    world, total, d = len(sizes), sum(sizes), 4
    offsets = [sum(sizes[:r]) for r in range(world)]
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 3, (total,), generator=gen)
    full_image = torch.randn(total, d, generator=gen, dtype=torch.float64, requires_grad=True)
    full_text = torch.randn(total, d, generator=gen, dtype=torch.float64, requires_grad=True)
    temperature = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    reference = itc_loss(full_image, full_text, temperature=temperature, ids=ids)
    i2t, t2i = _itc_identity_reference(full_image.detach(), full_text.detach(), ids.tolist(), 0.2)
    assert reference["loss"].item() == pytest.approx((i2t + t2i) / 2, rel=1e-9)
    ref_grads = torch.autograd.grad(reference["loss"], [full_image, full_text, temperature])
    calls: list[str] = []

    def fake_gather(
        tensor: torch.Tensor, *, rank: int, world_size: int, group: object = None, sizes: list[int]
    ) -> torch.Tensor:
        full = (full_image, full_text)[len([c for c in calls if c != "ids"]) % 2]
        calls.append("emb")
        normed = F.normalize(full, dim=-1)
        lo = offsets[rank]
        return torch.cat([normed[:lo], tensor, normed[lo + sizes[rank] :]])

    def fake_gather_ids(
        tensor: torch.Tensor, *, rank: int, world_size: int, group: object = None, sizes: list[int]
    ) -> torch.Tensor:
        calls.append("ids")
        assert torch.equal(tensor, ids[offsets[rank] : offsets[rank] + sizes[rank]])
        return ids.clone()

    monkeypatch.setattr(distributed, "all_gather_sizes", lambda rows, **_: list(sizes))
    monkeypatch.setattr(distributed, "all_gather_with_grad", fake_gather)
    monkeypatch.setattr(distributed, "all_gather_no_grad", fake_gather_ids)
    terms = []
    for rank in range(world):
        local = slice(offsets[rank], offsets[rank] + sizes[rank])
        out = itc_loss(
            full_image[local],
            full_text[local],
            temperature=temperature,
            rank=rank,
            world_size=world,
            ids=ids[local],
        )
        terms.append(out["loss"])
    mean = torch.stack(terms).mean()
    assert mean.item() == pytest.approx(reference["loss"].item(), rel=1e-10)
    for got, want in zip(torch.autograd.grad(mean, [full_image, full_text, temperature]), ref_grads):
        torch.testing.assert_close(got, want)
    assert calls.count("ids") == world


def test_itc_module_rank_defaults() -> None:
    seen = {}

    def gather(
        tensor: torch.Tensor, *, rank: int, world_size: int, group: object, sizes: list[int]
    ) -> torch.Tensor:
        seen.update(rank=rank, world_size=world_size, group=group)
        return torch.cat([tensor, torch.zeros_like(tensor)])

    loss = ITCLoss(rank=0, world_size=2, group="g")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(distributed, "all_gather_sizes", lambda rows, **_: [rows, rows])
        loss(torch.randn(3, 4), torch.randn(3, 4), gather=gather)
    assert seen == {"rank": 0, "world_size": 2, "group": "g"}


def test_itc_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="same"):
        itc_loss(torch.randn(3, 4), torch.randn(2, 4), temperature=0.1)
    with pytest.raises(ValueError, match="rank 2"):
        itc_loss(torch.randn(3, 4), torch.randn(3, 4), temperature=0.1, rank=2, world_size=2)

    def short_gather(tensor: torch.Tensor, **_: object) -> torch.Tensor:
        return tensor

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(distributed, "all_gather_sizes", lambda rows, **_: [rows, rows])
        with pytest.raises(ValueError, match="expected 6"):
            itc_loss(torch.randn(3, 4), torch.randn(3, 4), temperature=0.1, world_size=2, gather=short_gather)


# --------------------------------------------------------------------------------------------------
# box loss
# --------------------------------------------------------------------------------------------------


def _giou_reference(a: list[float], b: list[float]) -> float:
    """GIoU of two cxcywh boxes, written out from Rezatofighi et al. (2019), Algorithm 1."""
    ax1, ay1, ax2, ay2 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx1, by1, bx2, by2 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    hull = (max(ax2, bx2) - min(ax1, bx1)) * (max(ay2, by2) - min(ay1, by1))
    return inter / union - (hull - union) / hull


def test_box_loss_hand_computed_values() -> None:
    pred = torch.tensor([[0.5, 0.5, 0.4, 0.4], [0.2, 0.2, 0.2, 0.2]])
    target = torch.tensor([[0.6, 0.6, 0.4, 0.4], [0.8, 0.8, 0.2, 0.2]])
    # box 1: inter 0.3^2 = 0.09, union 0.23, hull 0.5^2 = 0.25 -> GIoU = 0.09/0.23 - 0.02/0.25
    # box 2: disjoint, union 0.08, hull 0.8^2 = 0.64 -> GIoU = -(0.56/0.64) = -0.875
    giou1, giou2 = 0.09 / 0.23 - 0.02 / 0.25, -0.875
    out = box_loss(pred, target, l1_weight=2.0, giou_weight=3.0)
    assert out["giou"].item() == pytest.approx(((1 - giou1) + (1 - giou2)) / 2, rel=1e-5)
    assert out["l1"].item() == pytest.approx((0.2 + 1.2) / 2, rel=1e-5)
    assert out["loss"].item() == pytest.approx(2 * out["l1"].item() + 3 * out["giou"].item(), rel=1e-6)

    masked = box_loss(pred, target, mask=torch.tensor([True, False]))
    assert masked["giou"].item() == pytest.approx(1 - giou1, rel=1e-5)
    assert masked["l1"].item() == pytest.approx(0.2, rel=1e-5)


def test_box_loss_matches_loop_and_has_gradients() -> None:
    gen = torch.Generator().manual_seed(2)
    pred = (torch.rand(7, 4, generator=gen) * 0.5 + 0.2).requires_grad_()
    target = torch.rand(7, 4, generator=gen) * 0.5 + 0.2
    out = BoxLoss(l1_weight=5.0, giou_weight=2.0)(pred, target)
    p, t = pred.tolist(), target.tolist()
    giou = sum(1 - _giou_reference(a, b) for a, b in zip(p, t)) / 7
    l1 = sum(abs(x - y) for a, b in zip(p, t) for x, y in zip(a, b)) / 7
    assert out["giou"].item() == pytest.approx(giou, rel=1e-5)
    assert out["l1"].item() == pytest.approx(l1, rel=1e-5)
    assert out["loss"].item() == pytest.approx(5 * l1 + 2 * giou, rel=1e-5)
    out["loss"].backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all()


def test_box_loss_empty_mask_and_errors() -> None:
    pred = torch.rand(3, 4, requires_grad=True)
    out = box_loss(pred, torch.rand(3, 4), mask=torch.zeros(3, dtype=torch.bool))
    assert out["loss"].item() == 0.0
    out["loss"].backward()  # still differentiable: a batch without boxes must not break the step
    with pytest.raises(ValueError, match=r"\(n, 4\)"):
        box_loss(torch.rand(3, 5), torch.rand(3, 5))
    with pytest.raises(ValueError, match="mask"):
        box_loss(torch.rand(3, 4), torch.rand(3, 4), mask=torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="weights"):
        BoxLoss(l1_weight=-1.0)


def test_loss_registry() -> None:
    assert {"itc", "box"} <= set(list_losses())
    assert isinstance(create_loss("itc", init_temperature=0.05), ITCLoss)
    assert isinstance(create_loss("box"), BoxLoss)
    with pytest.raises(KeyError, match="valid names: .*box.*itc"):
        create_loss("arcface_typo")


def test_dual_stream_task_builds_itc_and_box_from_the_registry(monkeypatch) -> None:
    """The training module asks the registry for its ITC and box losses (a registered replacement is used)."""
    from torch import nn

    from capret import losses
    from capret.tasks.dualstream import LossConfig, TrainModule

    built: dict[str, dict] = {}
    for name in ("itc", "box"):
        real = losses._LOSSES.get(name)

        def spy(*, _real=real, _name=name, **kwargs):
            built[_name] = kwargs
            return _real(**kwargs)

        monkeypatch.setitem(losses._LOSSES._entries, name, spy)

    model = nn.Linear(2, 2)
    model.embed_dim = 8  # type: ignore[assignment]  # all TrainModule reads of the model when building heads
    config = LossConfig(itc_temperature=0.05, box_l1_weight=2.0)
    module = TrainModule(model, num_classes=3, loss=config, rank=1, world_size=2)  # type: ignore[arg-type]
    assert built == {
        "itc": {"init_temperature": 0.05, "rank": 1, "world_size": 2},
        "box": {"l1_weight": 2.0, "giou_weight": 1.0},
    }
    assert isinstance(module.itc, ITCLoss) and isinstance(module.box, BoxLoss)
    built.clear()
    TrainModule(model, num_classes=3, loss=LossConfig(itc_weight=0.0, box_weight=0.0))  # type: ignore[arg-type]
    assert built == {}
