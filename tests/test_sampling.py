"""Sampling: greedy, seeded temperature sampling, and logits that are not finite."""

import numpy as np
import pytest

from flexio.errors import FlexioError, NumericalError
from flexio.sampling import Sampler, SamplingParams


def test_greedy_is_argmax_even_when_not_finite():
    greedy = Sampler(SamplingParams())
    assert greedy(np.array([0.5, 3.0, -1.0], np.float32)) == 1
    assert greedy(np.array([0.5, np.inf, 1.0], np.float32)) == 1
    assert greedy(np.array([0.5, np.nan, 1.0], np.float32)) == 1  # numpy's argmax: the first NaN


def test_sampling_is_seeded():
    z = np.linspace(-2, 2, 50).astype(np.float32)
    a = [Sampler(SamplingParams(temperature=0.9, seed=3))(z) for _ in range(5)]
    b = [Sampler(SamplingParams(temperature=0.9, seed=3))(z) for _ in range(5)]
    assert a == b


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_sampling_refuses_non_finite_logits_naming_the_step(bad):
    s = Sampler(SamplingParams(temperature=0.8, seed=0))
    z = np.zeros(10, np.float32)
    s(z)
    z[4] = bad
    with pytest.raises(NumericalError, match=r"non-finite logits at generation step 2 \(\d NaN, \d \+inf, 0 -inf of 10\)"):
        s(z)
    assert issubclass(NumericalError, FlexioError)


def test_minus_inf_is_probability_zero():
    z = np.full(8, -np.inf, np.float32)
    z[5] = 1.0
    assert Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=0))(z) == 5
    with pytest.raises(NumericalError, match="8 -inf of 8"):
        Sampler(SamplingParams(temperature=1.0))(np.full(8, -np.inf, np.float32))


def test_temperature_so_small_it_overflows_is_greedy():
    z = np.array([1.0, 3.0, 2.0], np.float32)
    assert Sampler(SamplingParams(temperature=1e-320, top_k=0, top_p=1.0, seed=0))(z) == 1
