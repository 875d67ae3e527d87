"""`sparsity.uniform.uniforms`: torch.rand's own float32 numbers on a CPU generator, and its end state."""

import pytest
import torch

from nmtrain.sparsity import uniform
from nmtrain.sparsity.uniform import uniforms

pytestmark = pytest.mark.skipif(uniform.njit is None, reason="numba is not installed")


@pytest.mark.parametrize("seed", [0, 1, 5489, 2**40 + 7])
def test_the_numbers_and_the_end_state_are_torch_rands(seed):
    ours, theirs = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    # lengths below, at and across the engine's 624-word regenerations, a many-regeneration one, shapes
    for shape in ((1,), (3,), (620,), (624,), (625,), (1247,), (0,), (2, 5, 2), (37, 128, 2), (100_003,)):
        got = uniforms(shape, ours)
        want = torch.rand(shape, generator=theirs)
        assert got is not None and got.dtype == torch.float32 and got.shape == want.shape
        assert torch.equal(got, want), shape
        assert torch.equal(ours.get_state(), theirs.get_state()), shape


def test_a_generator_used_by_other_draws_goes_on_as_torch_would():
    ours, theirs = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for g in (ours, theirs):      # a normal sample cached in the state, integers, doubles: all left as they are
        torch.randn(1, generator=g), torch.randint(0, 9, (5,), generator=g)
        torch.rand(7, dtype=torch.float64, generator=g)
    assert torch.equal(uniforms((1000,), ours), torch.rand(1000, generator=theirs))
    assert torch.equal(torch.randn(3, generator=ours), torch.randn(3, generator=theirs))
    assert torch.equal(ours.get_state(), theirs.get_state())


def test_no_generator_means_torchs_default_one():
    saved = torch.get_rng_state()
    try:
        torch.manual_seed(11)
        got = uniforms((4, 300))
        torch.manual_seed(11)
        assert torch.equal(got, torch.rand(4, 300))
    finally:
        torch.set_rng_state(saved)


def test_an_engine_that_disagrees_serves_nothing_and_leaves_the_generator(monkeypatch):
    monkeypatch.setattr(uniform, "_agrees", lambda: False)
    g = torch.Generator().manual_seed(5)
    before = g.get_state()
    assert uniforms((10,), g) is None
    assert torch.equal(g.get_state(), before)


def test_the_check_of_the_engine_passes_in_this_torch():
    assert uniform._agrees()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_generator_is_left_to_torch():
    g = torch.Generator(device="cuda").manual_seed(0)
    assert uniforms((8,), g) is None
