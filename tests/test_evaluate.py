"""experiments/evaluate.py: eval_mode hands a model back in the mode it had, also after an exception."""

import pytest
from torch import nn

from nmtrain.experiments.evaluate import eval_mode


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("was_training", [False, True])
def test_eval_mode_restores_the_previous_mode(training, was_training):
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).train(was_training)
    with eval_mode(model, training=training):
        assert model.training is training and model[1].training is training
    assert model.training is was_training and model[1].training is was_training
    with pytest.raises(RuntimeError, match="boom"):
        with eval_mode(model, training=training):
            raise RuntimeError("boom")
    assert model.training is was_training and model[1].training is was_training
