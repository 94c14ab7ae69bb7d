"""check_module_state: released state dicts are checked against the module they are for, not a restated table."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from capret.errors import CheckpointError
from capret.models.combiner import Combiner
from capret.models.convert.clip4cir import map_combiner
from capret.models.convert.common import MAPPER_SIZES, check_module_state
from capret.models.convert.searle import map_phi_state
from capret.models.zeroshot import Phi, Pic2WordMapper

#: CLIP4Cir's module names (``src/combiner.py``) for capret's Combiner modules
_CLIP4CIR = {
    "text_projection.0": "text_projection_layer",
    "image_projection.0": "image_projection_layer",
    "fusion.0": "combiner_layer",
    "fusion.3": "output_layer",
    "dynamic_scalar.0": "dynamic_scalar.0",
    "dynamic_scalar.3": "dynamic_scalar.3",
}


def _clip4cir_state(combiner: Combiner) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in combiner.state_dict().items():
        module, param = key.rsplit(".", 1)
        out[f"{_CLIP4CIR[module]}.{param}"] = value
    return out


def test_a_combiner_release_is_renamed_and_its_sizes_read_off() -> None:
    combiner = Combiner(8, projection_dim=16, hidden_dim=32)
    state, _, sizes = map_combiner(_clip4cir_state(combiner), path=Path("combiner.pt"))
    assert sizes == {"feature_dim": 8, "projection_dim": 16, "hidden_dim": 32}
    assert state.keys() == combiner.state_dict().keys()


def test_every_problem_of_a_combiner_release_is_listed_at_once() -> None:
    state = _clip4cir_state(Combiner(8, projection_dim=16, hidden_dim=32))
    del state["output_layer.bias"]
    state["extra"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as err:
        map_combiner(state, path=Path("combiner.pt"))
    assert "['extra']" in str(err.value) and "['fusion.3.bias']" in str(err.value)


def test_a_shape_that_disagrees_with_the_module_is_named() -> None:
    state = _clip4cir_state(Combiner(8, projection_dim=16, hidden_dim=32))
    state["output_layer.weight"] = torch.zeros(8, 31)
    with pytest.raises(CheckpointError, match=r"fusion.3.weight: \(8, 31\) but the Combiner needs \(8, 32\)"):
        map_combiner(state, path=Path("combiner.pt"))


@pytest.mark.parametrize("cls", [Phi, Pic2WordMapper])
def test_both_mappers_read_their_sizes_from_the_same_places(cls: type[torch.nn.Module]) -> None:
    module = cls(8, hidden_dim=12, output_dim=6)
    sizes = check_module_state(module.state_dict(), path="m.pt", sizes=MAPPER_SIZES, build=cls, what="m")
    assert sizes == {"input_dim": 8, "hidden_dim": 12, "output_dim": 6}


def test_phi_keys_outside_the_module_and_wrong_shapes_are_refused_together() -> None:
    state = dict(Phi(8, hidden_dim=12, output_dim=6).state_dict())
    state["layers.3.weight"] = torch.zeros(12, 11)
    state["scale"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as err:
        map_phi_state(state, path=Path("phi.pt"), dropout=0.5)
    assert "['scale']" in str(err.value) and "layers.3.weight: (12, 11) but phi needs (12, 12)" in str(
        err.value
    )


def test_a_size_tensor_without_the_dimension_is_an_error_not_a_crash() -> None:
    state = dict(Phi(8, hidden_dim=12, output_dim=6).state_dict())
    state["layers.0.weight"] = torch.zeros(12)
    with pytest.raises(CheckpointError, match=r"has no dimension 1 \(input_dim\)"):
        map_phi_state(state, path=Path("phi.pt"), dropout=0.5)
