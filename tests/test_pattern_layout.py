import pytest
import torch

from nmtrain.sparsity import LayoutError, Pattern, PatternError, from_matrix, parse_pattern, shape_violation, to_matrix
from nmtrain.sparsity.layout import from_tiles, to_tiles


@pytest.mark.parametrize("text,n,m,t", [("2:4", 2, 4, False), ("1:16", 1, 16, False), (" 4 : 8-T", 4, 8, True),
                                        ("3:7", 3, 7, False), ("2:4-t", 2, 4, True)])
def test_parse(text, n, m, t):
    p = parse_pattern(text)
    assert (p.n, p.m, p.transposable) == (n, m, t)
    assert p.density == n / m
    assert f"{n / m:.2f}" in p.describe()


@pytest.mark.parametrize("text,needle", [("5:4", "smaller than M"), ("4:4", "smaller than M"), ("0:4", "at least 1"),
                                         ("1:1", "at least 2"), ("abc", "form N:M"), ("2/4", "form N:M")])
def test_bad_patterns_name_the_constraint(text, needle):
    with pytest.raises(PatternError) as err:
        parse_pattern(text)
    message = str(err.value)
    assert "\n" not in message
    assert needle in message


def test_transposable_flag_forces_t():
    assert parse_pattern("2:4", transposable=True) == Pattern(2, 4, True)
    assert str(Pattern(2, 4, True)) == "2:4-T"


def test_shape_constraints_table():
    p = Pattern(2, 4)
    assert shape_violation((8, 16), p) is None
    assert "in_features=6" in shape_violation((8, 6), p)
    assert "1-D" in shape_violation((8,), p)
    # conv: nhwc groups input channels at one tap; flatten groups C_in*kh*kw
    assert "C_in=6" in shape_violation((8, 6, 3, 3), p, "nhwc")
    assert shape_violation((8, 6, 2, 2), p, "flatten") is None
    pt = Pattern(2, 4, True)
    assert "out_features=6" in shape_violation((6, 8), pt)
    assert "C_out=6" in shape_violation((6, 8, 1, 1), pt)
    with pytest.raises(LayoutError):
        shape_violation((8, 8), p, "nchw")


@pytest.mark.parametrize("layout", ["nhwc", "flatten"])
def test_matrix_round_trip(layout):
    w = torch.randn(8, 12, 3, 5)
    mat = to_matrix(w, layout)
    assert mat.shape == (8, 12 * 15)
    assert torch.equal(from_matrix(mat, w.shape, layout), w)


def test_nhwc_groups_input_channels_at_a_tap():
    w = torch.arange(2 * 4 * 2 * 2).reshape(2, 4, 2, 2)
    mat = to_matrix(w, "nhwc")
    # the first group of 4 along K is the 4 input channels at tap (0, 0) of output channel 0
    assert mat[0, :4].tolist() == w[0, :, 0, 0].tolist()
    assert to_matrix(w, "flatten")[0, :4].tolist() == w[0, 0].reshape(-1).tolist()


def test_tiles_round_trip_and_contents():
    mat = torch.arange(8 * 12).reshape(8, 12)
    tiles = to_tiles(mat, 4)
    assert tiles.shape == (6, 4, 4)
    assert torch.equal(tiles[1], mat[0:4, 4:8])
    assert torch.equal(tiles[3], mat[4:8, 0:4])
    assert torch.equal(from_tiles(tiles, 8, 12), mat)
