"""A miniature evidence pool, built once per session for every evals test."""

from __future__ import annotations

import pytest

from evals.testbed.build import PoolSize, Sizes, build_pool

TINY = PoolSize("tiny", hidden=32, layers=1, heads=2, base_steps=60, lora_steps=30, dense_steps=20, batch=16,
                tasks=("reverse", "sort", "firstlow"), duplicates=("reverse",), noisy=("sort",), dense=("reverse",),
                data=Sizes(train=20, calib=8, test=6))


@pytest.fixture(scope="session")
def tiny_pool(tmp_path_factory):
    return build_pool(tmp_path_factory.mktemp("tb") / "pool", TINY, seed=0)
