import math

import numpy as np
import pytest

from neuraldb import EditConfig, StoreError
from neuraldb.config import check_gamma


@pytest.mark.parametrize("value", [-1, -1.0, 0, 0.65, 1, np.float32(0.5), np.float64(-0.25)])
def test_check_gamma_accepts_numbers_in_minus_one_to_one(value):
    got = check_gamma(value, where="gamma")
    assert type(got) is float and got == float(value)


@pytest.mark.parametrize("value", [True, False, "0.5", None, 1.5, -1.01, math.nan, math.inf, [0.5]])
def test_check_gamma_rejects_the_rest_naming_the_field_and_the_fix(value):
    with pytest.raises(ValueError, match=r"^NeuralDB\.gamma=.* is not a cosine threshold: set it to a number in \[-1, 1\]"):
        check_gamma(value, where="NeuralDB.gamma")


def test_check_gamma_raises_the_callers_error_class():
    with pytest.raises(StoreError, match="gamma=2"):
        check_gamma(2, where="gamma", error=StoreError)


def test_edit_config_checks_gamma():
    assert EditConfig(gamma=-1).gamma == -1
    for bad in (2.0, True, "0.65"):
        with pytest.raises(ValueError, match="EditConfig.gamma"):
            EditConfig(gamma=bad)
