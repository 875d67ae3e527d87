import os

import pytest
import torch

from nmtrain.experiments.io import CheckpointError, atomic_write, load_state_dict, save_state_dict, state_dict_mismatch
from nmtrain.experiments.rundir import load_weights


def test_round_trip_and_weights_only(tmp_path):
    path = tmp_path / "a.pt"
    save_state_dict({"w": torch.ones(2)}, path)
    assert torch.equal(load_state_dict(path)["w"], torch.ones(2))


def test_interrupted_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "a.pt"
    save_state_dict({"w": torch.ones(2)}, path)

    def crash(fh):
        fh.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, crash)
    assert torch.equal(load_state_dict(path)["w"], torch.ones(2))
    assert os.listdir(tmp_path) == ["a.pt"]


def test_directory_without_model(tmp_path):
    with pytest.raises(CheckpointError, match="without model.pt"):
        load_weights(tmp_path)


def test_state_dict_mismatch_names_the_first_missing_extra_or_reshaped_entry():
    model = {"a.weight": torch.zeros(4, 2), "a.bias": torch.zeros(4)}
    assert state_dict_mismatch(model, {k: v.clone() for k, v in model.items()}) is None
    assert state_dict_mismatch(model, {"a.weight": torch.zeros(4, 2)}) == "a.bias is missing from the file"
    assert state_dict_mismatch(model, {**model, "b.weight": torch.zeros(1)}) == \
        "the file has b.weight, which the model does not"
    assert state_dict_mismatch(model, {**model, "a.weight": torch.zeros(2, 4)}) == \
        "a.weight has shape (2, 4) in the file, (4, 2) in the model"
