"""What the solve borrows from mergekit, handed in rather than imported.

Two options of a solve are mergekit's own machinery: ``merge_fn: ties`` (mergekit's
TIES kernel) and ``init: other.yml`` (a stock mergekit merge as the starting
point). This layer must not import mergekit (only :mod:`mergekit_fw.integration`
does), so the integration layer fills an :class:`Upstream` with those functions
and hands it to :func:`mergekit_fw.solve.runner.solve_cached`. A solve that needs
neither runs without one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergekit_fw.config import ConfigError
from mergekit_fw.merge_fn import TiesKernel


@dataclass(frozen=True)
class StockConfig:
    """A stock mergekit config as the solve sees it: its method and the models it merges."""

    merge_method: str
    base: str | None
    models: list[str]


@dataclass(frozen=True)
class Upstream:
    ties: TiesKernel
    # a mergekit config file -> its method and models (raises ConfigError naming the file)
    read_config: Callable[[Path], StockConfig]
    # (config, out_path, lora_cache, seed): a stock mergekit merge written to out_path
    merge: Callable[[dict[str, Any], Path, Path, int], None]


def require(upstream: Upstream | None, what: str) -> Upstream:
    """The upstream functions, or a clear error naming the option that needs them."""
    if upstream is None:
        raise ConfigError(
            f"{what} uses mergekit's own machinery: solve through mergekit-fw, mergekit-yaml or "
            "mergekit_fw.integration.stock.solve, which hand it in"
        )
    return upstream
