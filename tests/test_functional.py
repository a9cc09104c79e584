"""Pure math helpers, each against a hand-computed or closed-form case."""

import math

import pytest

from salsa.functional import warmup_cosine


def test_warmup_cosine():
    assert warmup_cosine(0, warmup=4, total=14) == pytest.approx(0.25)
    assert warmup_cosine(3, warmup=4, total=14) == pytest.approx(1.0)
    assert warmup_cosine(4, warmup=4, total=14) == pytest.approx(1.0)
    # halfway through the decay: min + (1 - min) * 0.5
    assert warmup_cosine(9, warmup=4, total=14, min_ratio=0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert warmup_cosine(14, warmup=4, total=14, min_ratio=0.1) == pytest.approx(0.1)
    assert warmup_cosine(100, warmup=0, total=10, min_ratio=0.0) == pytest.approx(0.0, abs=1e-12)
    assert warmup_cosine(5, warmup=0, total=10, min_ratio=0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 2)))
