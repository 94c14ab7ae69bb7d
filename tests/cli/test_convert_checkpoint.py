"""``capret convert-checkpoint``: the papers' released files, built here with exactly their key names and layouts
(tiny sizes), convert into folders that ``capret-eval cir`` and the Python API load, and give the same model.

Layouts (read from the projects' public code): SEARLE ``{"Phi": sd}`` (``src/phi.py``); LinCIR ``{"epoch",
"Phi": sd}`` (``train_phi.py``); Pic2Word ``{"epoch", "name", "state_dict", "state_dict_img2text", "optimizer"}``
with ``module.`` prefixes (``src/main.py``, ``model/model.py``'s IM2TEXT); CLIP4Cir ``{"epoch", "Combiner": sd}``
and ``{"epoch", "CLIP": sd}`` (``src/utils.py``'s ``save_model``, ``src/combiner.py``).
"""

from __future__ import annotations

import builtins
import json
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_zeroshot import tiny_hf_clip, tiny_open_clip

import capret
from capret.cli.convert_checkpoint import SOURCES
from capret.cli.main import main
from capret.errors import CheckpointError
from capret.inference.cir.combiner import load_cir_model
from capret.inference.cir.inversion import load_zeroshot_model
from capret.models.clip import load_clip
from capret.models.combiner import Combiner
from capret.models.convert import list_converters, read_tensor_file
from capret.models.zeroshot import Phi, Pic2WordMapper
from capret.tasks.released import convert_released_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

#: Phi's tensors in SEARLE's / LinCIR's names (src/phi.py)
SEARLE_PHI_KEYS = [f"layers.{i}.{p}" for i in (0, 3, 6) for p in ("weight", "bias")]


@pytest.fixture(scope="module")
def backbones(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("convert")
    return {
        "base": base,
        "vit": tiny_open_clip(base / "oc_vit"),
        "rn": tiny_open_clip(base / "oc_rn", image_tower="rn", seed=1),
        "hf": tiny_hf_clip(base / "hf"),
    }


def _run(argv: list[str], capsys: pytest.CaptureFixture) -> dict[str, Any]:
    capsys.readouterr()
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def _seeded(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return module.eval()


def _openai_clip_state(name: str) -> dict[str, torch.Tensor]:
    """The backbone's weights in OpenAI's layout (open_clip keeps OpenAI's names), as Pic2Word/CLIP4Cir save."""
    clip = load_clip(name, backend="open_clip", preprocess="none")
    state = {k.removeprefix("model."): v.clone() for k, v in clip.state_dict().items()}
    for key in ("visual.conv1.weight", "token_embedding.weight", "positional_embedding", "ln_final.weight",
                "text_projection", "logit_scale", "transformer.resblocks.0.attn.in_proj_weight",
                "transformer.resblocks.0.mlp.c_fc.weight"):  # fmt: skip
        assert key in state, key
    return state


#: CLIP4Cir's src/combiner.py module names for ours (the dynamic scalar keeps its name).
_CLIP4CIR_NAMES = {"text_projection.0": "text_projection_layer", "image_projection.0": "image_projection_layer",
                   "fusion.0": "combiner_layer", "fusion.3": "output_layer"}  # fmt: skip


def _released_combiner(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our Combiner state dict under the released checkpoint's names."""
    out = {}
    for key, value in state.items():
        module, param = key.rsplit(".", 1)
        out[f"{_CLIP4CIR_NAMES[module]}.{param}" if module in _CLIP4CIR_NAMES else key] = value
    return out


def test_sources_listed_by_the_cli_are_the_registry() -> None:
    assert tuple(sorted(list_converters())) == SOURCES


def test_searle_phi_round_trip(backbones: dict[str, Any], capsys: pytest.CaptureFixture) -> None:
    base = backbones["base"]
    phi = _seeded(Phi(24, hidden_dim=96, output_dim=32), 0)  # tiny open_clip: features 24, tokens 32
    assert list(phi.state_dict()) == SEARLE_PHI_KEYS
    torch.save({"Phi": phi.state_dict(), "epoch": 7}, base / "SEARLE_tiny.pt")
    report = _run(
        ["convert-checkpoint", "--from", "searle", "--checkpoint", str(base / "SEARLE_tiny.pt"),
         "--clip", backbones["vit"], "--out", str(base / "searle")],
        capsys,
    )  # fmt: skip
    assert report["kind"] == "phi" and report["clip"]["preprocess"] == "targetpad"
    assert sorted(report["mapped"]) == sorted(f"Phi.{k}" for k in SEARLE_PHI_KEYS)
    assert report["dropped"] == {"epoch": "training bookkeeping, not a weight of phi"}
    assert "--method searle --mapper" in report["evaluate"]
    model = load_zeroshot_model(base / "searle")
    assert model.method == "searle" and model.placeholder == "$"
    meta = json.loads((base / "searle" / "capret_model.json").read_text())
    assert meta["kind"] == "phi" and meta["trained_from"]["converted_from"]["source"] == "searle"
    assert capret.load(base / "searle").method == "searle"  # the Python API opens it too
    x = torch.randn(5, 24)
    with torch.no_grad():
        torch.testing.assert_close(model.mapper(x), phi(x), rtol=0, atol=0)
    reference = _seeded(Phi(24, hidden_dim=96, output_dim=32), 0)
    captions = [["is red", "has stripes"], ["is blue"], ["is longer"], ["a"], ["b"]]
    from capret.inference.cir.inversion import searle_query_features

    torch.testing.assert_close(
        model.query_features(reference_features=x, captions=captions),
        searle_query_features(model.clip, reference, reference_features=x, captions=captions),
    )


def test_lincir_phi_on_a_hugging_face_clip(backbones: dict[str, Any], capsys: pytest.CaptureFixture) -> None:
    base = backbones["base"]
    clip = load_clip(backbones["hf"])
    phi = _seeded(Phi(clip.feature_dim, output_dim=clip.token_width), 1)
    torch.save({"epoch": 20000, "Phi": phi.state_dict()}, base / "lincir_tiny.pt")
    report = _run(
        ["convert-checkpoint", "--from", "lincir", "--checkpoint", str(base / "lincir_tiny.pt"),
         "--clip", str(backbones["hf"]), "--out", str(base / "lincir")],
        capsys,
    )  # fmt: skip
    assert report["clip"]["backend"] == "hf" and report["clip"]["preprocess"] == "none"  # LinCIR: centre crop
    assert report["metadata"] == {"epoch": 20000}
    model = load_zeroshot_model(base / "lincir")
    assert model.method == "lincir"
    x = torch.randn(3, clip.feature_dim)
    with torch.no_grad():
        torch.testing.assert_close(model.mapper(x), phi(x), rtol=0, atol=0)


def _pic2word_file(path: Path, mapper: Pic2WordMapper, clip_state: dict[str, torch.Tensor]) -> Path:
    layers = mapper.state_dict()
    im2text = {  # model/model.py IM2TEXT: layers.{i}.0 = Linear, fc_out
        "layers.0.0.weight": layers["layers.0.weight"],
        "layers.0.0.bias": layers["layers.0.bias"],
        "layers.1.0.weight": layers["layers.3.weight"],
        "layers.1.0.bias": layers["layers.3.bias"],
        "fc_out.weight": layers["layers.6.weight"],
        "fc_out.bias": layers["layers.6.bias"],
    }
    payload = {
        "epoch": 3,
        "name": "pic2word_tiny",
        "state_dict": {f"module.{k}": v for k, v in clip_state.items()},
        "state_dict_img2text": {f"module.{k}": v for k, v in im2text.items()},
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.98), "params": [0, 1]}]},
    }
    torch.save(payload, path)
    return path


def test_pic2word_round_trip_and_its_frozen_clip(
    backbones: dict[str, Any], capsys: pytest.CaptureFixture
) -> None:
    base = backbones["base"]
    mapper = _seeded(Pic2WordMapper(24, hidden_dim=16, output_dim=32), 2)
    clip_state = {k: v.half() for k, v in _openai_clip_state(backbones["vit"]).items()}  # an fp16 save
    clip_state.update(
        input_resolution=torch.tensor(32), context_length=torch.tensor(77), vocab_size=torch.tensor(49408)
    )
    path = _pic2word_file(base / "pic2word_model.pt", mapper, clip_state)
    report = _run(
        ["convert-checkpoint", "--from", "pic2word", "--checkpoint", str(path), "--clip", backbones["vit"],
         "--out", str(base / "pic2word")],
        capsys,
    )  # fmt: skip
    assert report["clip_weights"].startswith("equal to the backbone")
    assert report["mapped"]["state_dict_img2text.module.fc_out.weight"] == "layers.6.weight"
    assert {"optimizer", "epoch", "name", "clip.input_resolution", "clip.vocab_size"} <= set(
        report["dropped"]
    )
    n_clip = sum(k.startswith("clip.") for k in report["mapped"])
    assert n_clip + 3 == len(clip_state)  # every CLIP tensor mapped except the three JIT facts
    model = load_zeroshot_model(base / "pic2word")
    assert model.method == "pic2word" and model.template == "a photo of * , {caption}"
    x = torch.randn(4, 24)
    with torch.no_grad():
        torch.testing.assert_close(model.mapper(x), mapper(x), rtol=0, atol=0)

    clip_state["transformer.resblocks.0.mlp.c_fc.weight"] = (
        clip_state["transformer.resblocks.0.mlp.c_fc.weight"] + 1
    )
    other = _pic2word_file(base / "pic2word_other_clip.pt", mapper, clip_state)
    with pytest.raises(CheckpointError, match="is not the backbone"):
        convert_released_checkpoint("pic2word", checkpoint=other, clip=backbones["vit"], out=base / "p2")


def test_clip4cir_combiner_and_fine_tuned_clip(
    backbones: dict[str, Any], capsys: pytest.CaptureFixture
) -> None:
    base = backbones["base"]
    combiner = _seeded(Combiner(24, projection_dim=40, hidden_dim=48), 3)
    ours = combiner.state_dict()
    released = {  # src/combiner.py names
        "text_projection_layer.weight": ours["text_projection.0.weight"],
        "text_projection_layer.bias": ours["text_projection.0.bias"],
        "image_projection_layer.weight": ours["image_projection.0.weight"],
        "image_projection_layer.bias": ours["image_projection.0.bias"],
        "combiner_layer.weight": ours["fusion.0.weight"],
        "combiner_layer.bias": ours["fusion.0.bias"],
        "output_layer.weight": ours["fusion.3.weight"],
        "output_layer.bias": ours["fusion.3.bias"],
        **{
            f"dynamic_scalar.{i}.{p}": ours[f"dynamic_scalar.{i}.{p}"]
            for i in (0, 3)
            for p in ("weight", "bias")
        },
    }
    torch.save({"epoch": 300, "Combiner": released}, base / "fiq_comb_tiny.pt")
    tuned = _openai_clip_state(backbones["rn"])
    assert "visual.attnpool.c_proj.weight" in tuned and "visual.layer1.0.downsample.0.weight" in tuned
    tuned["token_embedding.weight"] = (
        tuned["token_embedding.weight"] + 0.5
    )  # stage 1 fine-tuned the text side
    torch.save({"epoch": 30, "CLIP": tuned}, base / "fiq_clip_tiny.pt")
    report = _run(
        ["convert-checkpoint", "--from", "clip4cir", "--checkpoint", str(base / "fiq_comb_tiny.pt"),
         "--clip-checkpoint", str(base / "fiq_clip_tiny.pt"), "--clip", backbones["rn"],
         "--out", str(base / "clip4cir")],
        capsys,
    )  # fmt: skip
    assert report["kind"] == "combiner" and report["clip_weights"].startswith("differ")
    assert report["folders"] == [str(base / "clip4cir")]
    assert report["hparams"] == {"feature_dim": 24, "projection_dim": 40, "hidden_dim": 48, "dropout": 0.5}
    assert type(capret.load(base / "clip4cir")).__name__ == "CombinerModel"
    clip, fuser, _ = load_cir_model(base / "clip4cir")
    torch.testing.assert_close(
        clip.state_dict()["model.token_embedding.weight"], tuned["token_embedding.weight"]
    )
    image, text = torch.randn(3, 24), torch.randn(3, 24)
    with torch.no_grad():
        torch.testing.assert_close(fuser(image, text), combiner(image, text), rtol=0, atol=0)


class _WritesAFile:
    """A pickle payload whose loading would create ``marker`` (the attack ``weights_only`` stops)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (builtins.open, (str(self.marker), "w"))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_a_pickle_that_carries_code_is_refused_and_never_run(
    backbones: dict[str, Any], tmp_path: Path, writer: str, capsys: pytest.CaptureFixture
) -> None:
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "SEARLE_ViT-L14.pt"
    payload = {"Phi": {"layers.0.weight": torch.zeros(2, 2)}, "hook": _WritesAFile(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with path.open("wb") as f:
            pickle.dump(payload, f)
    with pytest.raises(CheckpointError, match="refused") as err:
        read_tensor_file(path)
    assert str(path) in str(err.value)
    capsys.readouterr()
    argv = ["convert-checkpoint", "--from", "searle", "--checkpoint", str(path), "--clip", backbones["vit"],
            "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 2
    assert "refused" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_every_unmatched_key_and_a_wrong_backbone_are_named(
    backbones: dict[str, Any], tmp_path: Path
) -> None:
    phi = Phi(24, hidden_dim=96, output_dim=32).state_dict()
    torch.save(
        {"Phi": {**phi, "layers.9.weight": torch.zeros(1), "scale": torch.ones(1)}}, tmp_path / "extra.pt"
    )
    with pytest.raises(
        CheckpointError, match=r"2 checkpoint keys match nothing: \['layers.9.weight', 'scale'\]"
    ):
        convert_released_checkpoint(
            "searle", checkpoint=tmp_path / "extra.pt", clip=backbones["vit"], out=tmp_path / "a"
        )
    im2text = {  # an IM2TEXT with n_layer=3 has one block more than Pic2Word's released model
        **{f"module.layers.{i}.0.weight": torch.zeros(16, 24 if i == 0 else 16) for i in range(3)},
        **{f"module.layers.{i}.0.bias": torch.zeros(16) for i in range(3)},
        "module.fc_out.weight": torch.zeros(32, 16),
        "module.fc_out.bias": torch.zeros(32),
    }
    torch.save({"state_dict_img2text": im2text, "state_dict": {}}, tmp_path / "p3.pt")
    with pytest.raises(CheckpointError, match="layers.2.0.bias"):
        convert_released_checkpoint(
            "pic2word", checkpoint=tmp_path / "p3.pt", clip=backbones["vit"], out=tmp_path / "b"
        )
    torch.save({"Phi": Phi(512, output_dim=512).state_dict()}, tmp_path / "b32.pt")  # ViT-B/32's phi
    with pytest.raises(CheckpointError, match="input 512 but .* features are 24-wide"):
        convert_released_checkpoint(
            "searle", checkpoint=tmp_path / "b32.pt", clip=backbones["vit"], out=tmp_path / "c"
        )
    torch.save({"epoch": 1, "CLIP": {}}, tmp_path / "clip_only.pt")
    with pytest.raises(CheckpointError, match="--clip-checkpoint"):
        convert_released_checkpoint(
            "clip4cir", checkpoint=tmp_path / "clip_only.pt", clip=backbones["rn"], out=tmp_path / "d"
        )


def test_converted_folders_evaluate_with_the_documented_command(
    backbones: dict[str, Any], capsys: pytest.CaptureFixture
) -> None:
    """``capret-eval --method searle --mapper OUT`` and ``--method combiner --checkpoint OUT`` on a tiny CIRR."""
    from tiny_cir import write_cirr

    from capret.cli import eval as eval_cli

    base = backbones["base"]
    cirr = write_cirr(base / "cirr_eval")
    phi = _seeded(Phi(24, hidden_dim=96, output_dim=32), 5)
    torch.save({"Phi": phi.state_dict()}, base / "phi_eval.pt")
    searle = _run(["convert-checkpoint", "--from", "searle", "--checkpoint", str(base / "phi_eval.pt"),
                   "--clip", backbones["vit"], "--out", str(base / "phi_eval")], capsys)  # fmt: skip
    combiner = _seeded(Combiner(24, projection_dim=8, hidden_dim=8), 6).state_dict()
    released = _released_combiner(combiner)
    torch.save({"Combiner": released}, base / "comb_eval.pt")
    clip4cir = _run(["convert-checkpoint", "--from", "clip4cir", "--checkpoint", str(base / "comb_eval.pt"),
                     "--clip", backbones["vit"], "--out", str(base / "comb_eval")], capsys)  # fmt: skip
    for report, flags in ((searle, ["--method", "searle", "--mapper", str(base / "phi_eval")]),
                          (clip4cir, ["--method", "combiner", "--checkpoint", str(base / "comb_eval")])):  # fmt: skip
        assert report["evaluate"].startswith(f"capret-eval cir {' '.join(flags)} ")  # the command it prints
        capsys.readouterr()
        code = eval_cli.main(["--dataset", "cirr", "--split", "val", "--root", str(cirr), *flags,
                              "--out", str(base / f"eval_{flags[1]}"), "--device", "cpu"])  # fmt: skip
        captured = capsys.readouterr()
        assert code == 0, captured.err
        metrics = json.loads(captured.out)["metrics"]
        assert 0.0 <= metrics["recall@1"] <= metrics["recall@50"] <= 1.0


def _hf_to_openai(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Hugging Face CLIP state dict in OpenAI's layout (what CLIP4Cir / Pic2Word save), written out by hand:
    q/k/v fused into ``in_proj``, the projections stored ``[width, embed]``."""
    out: dict[str, torch.Tensor] = {
        "token_embedding.weight": hf["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": hf["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": hf["text_model.final_layer_norm.weight"],
        "ln_final.bias": hf["text_model.final_layer_norm.bias"],
        "text_projection": hf["text_projection.weight"].T,
        "logit_scale": hf["logit_scale"],
        "visual.class_embedding": hf["vision_model.embeddings.class_embedding"],
        "visual.positional_embedding": hf["vision_model.embeddings.position_embedding.weight"],
        "visual.conv1.weight": hf["vision_model.embeddings.patch_embedding.weight"],
        "visual.ln_pre.weight": hf["vision_model.pre_layrnorm.weight"],
        "visual.ln_pre.bias": hf["vision_model.pre_layrnorm.bias"],
        "visual.ln_post.weight": hf["vision_model.post_layernorm.weight"],
        "visual.ln_post.bias": hf["vision_model.post_layernorm.bias"],
        "visual.proj": hf["visual_projection.weight"].T,
    }
    for tower, prefix in (("text_model", ""), ("vision_model", "visual.")):
        layers = {int(k.split(".")[3]) for k in hf if k.startswith(f"{tower}.encoder.layers.")}
        for i in layers:
            src, dst = f"{tower}.encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
            for kind in ("weight", "bias"):
                out[f"{dst}attn.in_proj_{kind}"] = torch.cat(
                    [hf[f"{src}self_attn.{p}_proj.{kind}"] for p in ("q", "k", "v")]
                )
                out[f"{dst}attn.out_proj.{kind}"] = hf[f"{src}self_attn.out_proj.{kind}"]
                out[f"{dst}ln_1.{kind}"] = hf[f"{src}layer_norm1.{kind}"]
                out[f"{dst}ln_2.{kind}"] = hf[f"{src}layer_norm2.{kind}"]
                out[f"{dst}mlp.c_fc.{kind}"] = hf[f"{src}mlp.fc1.{kind}"]
                out[f"{dst}mlp.c_proj.{kind}"] = hf[f"{src}mlp.fc2.{kind}"]
    return {k: v.clone() for k, v in out.items()}


def test_openai_layout_clip_onto_a_hugging_face_backbone(
    backbones: dict[str, Any], capsys: pytest.CaptureFixture
) -> None:
    """CLIP4Cir's fine-tuned CLIP (OpenAI layout) on a transformers CLIPModel: every tensor placed, features equal."""
    base = backbones["base"]
    clip = load_clip(backbones["hf"])
    hf = {k.removeprefix("model."): v for k, v in clip.state_dict().items()}
    tuned = _hf_to_openai(hf)
    blocks = sum(k.endswith("self_attn.q_proj.weight") for k in hf)
    assert (
        len(tuned) == len(hf) - 4 * blocks
    )  # q/k/v weights and biases fused into one in_proj pair per block
    tuned["transformer.resblocks.0.attn.in_proj_weight"] += 0.25  # stage 1 changed the text tower
    d = clip.feature_dim
    combiner = _seeded(Combiner(d, projection_dim=8, hidden_dim=8), 7).state_dict()
    released = _released_combiner(combiner)
    torch.save({"Combiner": released}, base / "comb_hf.pt")
    torch.save({"CLIP": tuned}, base / "clip_hf.pt")
    report = _run(["convert-checkpoint", "--from", "clip4cir", "--checkpoint", str(base / "comb_hf.pt"),
                   "--clip-checkpoint", str(base / "clip_hf.pt"), "--clip", str(backbones["hf"]),
                   "--clip-backend", "hf", "--out", str(base / "comb_hf")], capsys)  # fmt: skip
    assert report["clip_weights"].startswith("differ") and report["clip"]["backend"] == "hf"
    loaded, _, _ = load_cir_model(base / "comb_hf")
    q = loaded.state_dict()["model.text_model.encoder.layers.0.self_attn.q_proj.weight"]
    width = q.shape[0]
    torch.testing.assert_close(q, tuned["transformer.resblocks.0.attn.in_proj_weight"][:width])
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.image_features(pixels), clip.image_features(pixels)
        )  # image tower kept
