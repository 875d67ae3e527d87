"""The one-shot engine (sparsity/oneshot.py): Wanda equals its formula, SparseGPT equals a direct float64
transcription of the reference's `fasterprune` and never reconstructs worse than magnitude, the GEMM-view
input rows agree with to_matrix, and every mask is a valid N:M / N:M-T mask, also on tied inputs."""

import itertools
import math

import pytest
import torch
from torch.nn import functional as F

from nmtrain.sparsity import (Hessian, OneShotError, Pattern, conv_rows, linear_rows, make_mask, nm_violation,
                              reconstruction_error, sparsegpt, sq_norms, to_matrix, wanda_mask, wanda_saliency)

# -- direct transcriptions -------------------------------------------------------------------------


def tile_masks(n, m):
    """Every M x M 0/1 matrix with exactly N ones per row and per column (90 for 2:4, 24 for 1:4)."""
    rows = [torch.tensor([j in c for j in range(m)]) for c in itertools.combinations(range(m), n)]
    found = []
    for choice in itertools.product(rows, repeat=m):
        tile = torch.stack(choice)
        if bool((tile.sum(0) == n).all()):
            found.append(tile)
    return torch.stack(found)


def brute_force_tiles(scores, n, m):
    """Keep mask of a (rows, m) score matrix: per tile of m rows, the valid tile mask of largest total score."""
    candidates = tile_masks(n, m).double()                       # (C, m, m)
    keep = torch.zeros(scores.shape, dtype=torch.bool)
    for r in range(0, scores.shape[0], m):
        tile = scores[r:r + m]
        best = int((candidates * tile).sum((1, 2)).argmax())
        keep[r:r + m] = candidates[best].bool()
    return keep


def reference_fasterprune(W, H, prunen, prunem, blocksize, percdamp, tiles=False):
    """IST-DASLab/sparsegpt `SparseGPT.fasterprune` (N:M branch, no quantizer), line by line, in float64.
    As in the reference, ``prunen`` counts the *pruned* entries of each group and ``mask1`` marks them;
    ``tiles``: the M columns' saliency is cut into M x M tiles solved by brute force (kept = N:M-T)."""
    W, H = W.clone().double(), H.clone().double()
    columns = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    H = torch.linalg.cholesky(H, upper=True)
    Hinv = H
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        mask1 = torch.zeros_like(W1) == 1
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if i % prunem == 0:
                tmp = W1[:, i:(i + prunem)] ** 2 / (torch.diag(Hinv1)[i:(i + prunem)].reshape((1, -1))) ** 2
                if tiles:
                    mask1[:, i:i + prunem] = ~brute_force_tiles(tmp, prunem - prunen, prunem)
                else:
                    mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W


def correlated_inputs(tokens, k, seed):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g, dtype=torch.float64) / math.sqrt(k) + torch.eye(k, dtype=torch.float64)
    return torch.randn(tokens, k, generator=g, dtype=torch.float64) @ mix


def hessian_of(x, batches=1):
    h = Hessian(x.shape[1], dtype=torch.float64)
    for part in x.chunk(batches):
        h.add_batch(part, samples=1)
    return h.matrix


# -- Wanda ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_wanda_saliency_and_mask_equal_their_formula(seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 16, generator=g, dtype=torch.float64)
    x = torch.randn(3, 10, 16, generator=g, dtype=torch.float64)          # (samples, tokens, K)
    norm2 = sq_norms(linear_rows(x))
    expected = torch.tensor([[abs(float(w[i, j])) * math.sqrt(sum(float(x[s, t, j]) ** 2 for s in range(3)
                                                                    for t in range(10)))
                              for j in range(16)] for i in range(8)], dtype=torch.float64)
    saliency = wanda_saliency(w, norm2)
    assert saliency.dtype == torch.float64 and (saliency - expected).abs().max() <= 1e-12
    keep = wanda_mask(w, norm2, 2, 4)
    for i in range(8):                               # per row, per group of 4: the two largest scores
        for g0 in range(0, 16, 4):
            order = sorted(range(g0, g0 + 4), key=lambda j: -float(expected[i, j]))
            assert {j for j in range(g0, g0 + 4) if keep[i, j]} == set(order[:2])


def test_wanda_transposable_is_the_best_tile_mask_of_its_saliency():
    w = torch.randn(8, 12, dtype=torch.float64)
    norm2 = sq_norms(torch.randn(40, 12, dtype=torch.float64))
    keep = wanda_mask(w, norm2, 2, 4, transposable=True)
    saliency = wanda_saliency(w, norm2)
    assert nm_violation(keep, Pattern(2, 4, True), exact=True) is None
    for c in range(0, 12, 4):
        assert torch.equal(keep[:, c:c + 4], brute_force_tiles(saliency[:, c:c + 4], 2, 4))


# -- SparseGPT against the transcription ----------------------------------------------------------


@pytest.mark.parametrize("shape,n,m,blocksize,seed", [((8, 16), 2, 4, 128, 0), ((12, 32), 2, 4, 8, 1),
                                                      ((6, 24), 1, 4, 16, 2), ((16, 32), 4, 8, 16, 3),
                                                      ((8, 24), 2, 4, 4, 4)])
def test_sparsegpt_equals_the_reference_transcription(shape, n, m, blocksize, seed):
    rows, k = shape
    x = correlated_inputs(4 * k, k, seed)
    x[:, 3] = 0                                                         # a dead input feature
    h = hessian_of(x, batches=3)
    w = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed + 10), dtype=torch.float64)
    ours, keep = sparsegpt(w, h, n, m, blocksize=blocksize, percdamp=0.01)
    ref = reference_fasterprune(w, h, m - n, m, blocksize, 0.01)
    assert ours.dtype == torch.float64
    assert (ours - ref).abs().max() <= 1e-12
    assert torch.equal(keep, ref != 0) or torch.equal(ours != 0, ref != 0)
    assert nm_violation(keep, Pattern(n, m), exact=True) is None and torch.all(ours[~keep] == 0)


@pytest.mark.parametrize("shape,n,blocksize,seed", [((8, 16), 2, 128, 0), ((12, 32), 2, 8, 1), ((8, 24), 1, 16, 2)])
def test_sparsegpt_transposable_equals_the_reference_with_tile_choice(shape, n, blocksize, seed):
    rows, k = shape
    x = correlated_inputs(4 * k, k, seed)
    h = hessian_of(x)
    w = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed + 10), dtype=torch.float64)
    ours, keep = sparsegpt(w, h, n, 4, transposable=True, blocksize=blocksize, percdamp=0.01)
    ref = reference_fasterprune(w, h, 4 - n, 4, blocksize, 0.01, tiles=True)
    assert (ours - ref).abs().max() <= 1e-12
    assert nm_violation(keep, Pattern(n, 4, True), exact=True) is None
    assert nm_violation(ours, Pattern(n, 4, True)) is None and torch.all(ours[~keep] == 0)


# -- SparseGPT reconstructs better than magnitude --------------------------------------------------


@pytest.mark.parametrize("pattern", [Pattern(2, 4), Pattern(1, 4), Pattern(4, 8), Pattern(2, 4, True),
                                     Pattern(4, 8, True)])
@pytest.mark.parametrize("shape,seed", [((16, 32), 0), ((32, 64), 1), ((24, 48), 2), ((64, 128), 3)])
def test_sparsegpt_reconstruction_error_is_never_above_magnitude(pattern, shape, seed):
    rows, k = shape
    x = correlated_inputs(2 * k, k, seed).float()
    h = hessian_of(x.double()).float()
    w = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed + 100))
    new, keep = sparsegpt(w, h, pattern.n, pattern.m, pattern.transposable, blocksize=16)
    magnitude = w * make_mask(w, pattern)
    direct = lambda v: float(((w - v).double() @ x.double().t()).pow(2).sum())   # noqa: E731 ||(W - W~) X^T||^2
    assert direct(new) <= direct(magnitude)
    assert reconstruction_error(w, new, hessian_of(x.double())) == pytest.approx(direct(new) * 2 / 1, rel=1e-6)
    assert nm_violation(keep, pattern, exact=True) is None and nm_violation(new, pattern) is None


# -- tied inputs, dtypes, inputs in the GEMM view ----------------------------------------------------


@pytest.mark.parametrize("pattern", [Pattern(2, 4), Pattern(1, 4, True), Pattern(2, 4, True), Pattern(4, 8, True)])
def test_masks_are_valid_on_tied_inputs(pattern):
    w = torch.ones(16, 32)
    w[::2] = -1.0                                     # every |w| equal
    x = torch.ones(20, 32)                            # every input feature equal
    keep = wanda_mask(w, sq_norms(x), pattern.n, pattern.m, pattern.transposable)
    assert nm_violation(keep, pattern, exact=True) is None
    new, keep = sparsegpt(w, hessian_of(x.double()).float(), pattern.n, pattern.m, pattern.transposable,
                          blocksize=8, percdamp=0.1)
    assert nm_violation(keep, pattern, exact=True) is None and nm_violation(new, pattern) is None
    assert torch.all(new[~keep] == 0) and not torch.signbit(new[~keep]).any()


def test_sparsegpt_keeps_a_half_precision_weight_in_its_dtype():
    w = torch.randn(8, 16).half()
    new, keep = sparsegpt(w, hessian_of(correlated_inputs(64, 16, 0)).float(), 2, 4)
    assert new.dtype == torch.float16 and nm_violation(new, Pattern(2, 4)) is None


def test_hessian_is_the_running_average_of_the_reference():
    x = torch.randn(30, 6, dtype=torch.float64)
    h = Hessian(6, dtype=torch.float64)
    for part, samples in ((x[:10], 2), (x[10:25], 3), (x[25:], 1)):
        h.add_batch(part, samples)
    assert h.samples == 6
    assert (h.matrix - 2 / 6 * x.t() @ x).abs().max() <= 1e-12


@pytest.mark.parametrize("layout", ["nhwc", "flatten"])
@pytest.mark.parametrize("stride,dilation", [(1, 1), (2, 1), (1, 2)])
def test_conv_rows_follow_to_matrix(layout, stride, dilation):
    conv = torch.nn.Conv2d(4, 8, 3, stride=stride, dilation=dilation, bias=False).double()
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    rows = conv_rows(x, conv.kernel_size, conv.stride, conv.dilation, layout)
    out = conv(x)                                                        # (B, C_out, H', W')
    via_rows = rows @ to_matrix(conv.weight.detach(), layout).t()        # (B * H' * W', C_out)
    assert (via_rows - out.permute(0, 2, 3, 1).reshape(-1, 8)).abs().max() <= 1e-12
    padded = F.pad(x, (1, 1, 1, 1))
    assert conv_rows(padded, (3, 3), layout=layout).shape == (2 * 81, 36)


@pytest.mark.parametrize("kwargs,needle", [({"blocksize": 6}, "blocksize"), ({"blocksize": 0}, "blocksize"),
                                           ({"percdamp": -0.1}, "percdamp"), ({"percdamp": float("nan")}, "percdamp")])
def test_sparsegpt_refuses_bad_choices_in_one_line(kwargs, needle):
    with pytest.raises(OneShotError, match=needle) as info:
        sparsegpt(torch.randn(4, 16), torch.eye(16), 2, 4, **kwargs)
    assert "\n" not in str(info.value)


def test_an_indefinite_hessian_names_percdamp():
    h = -torch.eye(8)
    h[0, 0] = 1.0
    with pytest.raises(OneShotError, match="--percdamp"):
        sparsegpt(torch.randn(4, 8), h, 2, 4, percdamp=0.0)
