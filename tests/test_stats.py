"""The statistics behind `compare --seeds`: mean, sample std, Student's t p-values, the paired test."""

import math

import pytest

from nmtrain.experiments.stats import betainc, mean, paired_test, std, t_two_sided_p


@pytest.mark.parametrize("t,df,p", [(12.706, 1, 0.05), (4.303, 2, 0.05), (2.776, 4, 0.05), (2.228, 10, 0.05),
                                    (9.925, 2, 0.01), (1.0, 1, 0.5), (0.0, 3, 1.0)])
def test_t_p_values_match_the_table(t, df, p):
    assert t_two_sided_p(t, df) == pytest.approx(p, abs=2e-4)


def test_t_p_value_closed_form_for_two_degrees_of_freedom():
    for t in (0.3, 1.7, 5.0, 40.0):      # df = 2: p = 1 - |t| / sqrt(2 + t^2)
        assert t_two_sided_p(t, 2) == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-9)
    assert t_two_sided_p(math.inf, 2) == 0.0


def test_betainc_edges_and_symmetry():
    assert betainc(2.0, 3.0, 0.0) == 0.0 and betainc(2.0, 3.0, 1.0) == 1.0
    assert betainc(2.0, 3.0, 0.4) == pytest.approx(1 - betainc(3.0, 2.0, 0.6), rel=1e-12)
    assert betainc(1.0, 1.0, 0.37) == pytest.approx(0.37, rel=1e-12)     # uniform


def test_mean_and_sample_std():
    assert mean([1.0, 2.0, 6.0]) == 3.0
    assert std([1.0, 2.0, 6.0]) == pytest.approx(math.sqrt(7.0))        # n - 1 in the denominator
    assert std([5.0]) is None


def test_paired_test_uses_the_per_seed_differences():
    # A is 0.1 above B on every seed although both spread by 1 point over seeds: paired, that is clear.
    a = {0: 90.1, 1: 89.1, 2: 91.1}
    b = {0: 90.0, 1: 89.0, 2: 91.0}
    res = paired_test(a, b)
    assert res.seeds == [0, 1, 2] and res.difference == pytest.approx(0.1)
    assert res.within_noise is False and res.p_value == 0.0 and res.to_dict()["t"] is None   # no spread: exact
    c = {0: 90.4, 1: 88.9, 2: 90.9}     # differences 0.4, -0.1, -0.1: mean 0.067, spread 0.29
    res = paired_test(c, b)
    assert res.within_noise is True and 0.05 < res.p_value < 1.0
    d = {0: 91.0, 1: 90.1, 2: 91.9}     # differences 1.0, 1.1, 0.9: t = 17.3, p = 0.0033
    res = paired_test(d, b)
    assert res.within_noise is False and res.p_value == pytest.approx(0.00333, abs=2e-4)
    assert res.t == pytest.approx(17.32, abs=0.01)


def test_paired_test_over_common_seeds_only_and_one_seed_untested():
    res = paired_test({0: 1.0, 1: 2.0, 5: 3.0}, {1: 1.0, 5: 1.5, 7: 0.0})
    assert res.seeds == [1, 5] and res.difference == pytest.approx(1.25)
    one = paired_test({0: 1.0}, {0: 0.5})
    assert one.within_noise is None and one.p_value is None and one.difference == 0.5
    with pytest.raises(ValueError):
        paired_test({0: 1.0}, {1: 1.0})
