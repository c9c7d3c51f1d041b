"""mergekit's own machinery, handed down to the layers that may not import it.

:data:`UPSTREAM` is what a solve borrows (TIES, stock merges for ``init:``);
:func:`solve` is :func:`mergekit_fw.solve.runner.solve_cached` with it handed in,
the entry point for every command; :func:`mergekit_card` is mergekit's model card
for an output folder mergekit did not write.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mergekit_fw.config import FrankWolfeParameters
from mergekit_fw.integration.configs import config_models, load_merge_config
from mergekit_fw.merge_fn import MergeFunction
from mergekit_fw.pool.references import PoolSpec
from mergekit_fw.solve.runner import SolveResult, solve_cached
from mergekit_fw.solve.upstream import StockConfig, Upstream


def run_mergekit(merge_config: Any, out_path: Path, *, lora_cache: Path, seed: int, quiet: bool = True) -> None:
    """Run a stock mergekit merge (the initial point of a solve) into ``out_path``."""
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    options = MergeOptions(lora_merge_cache=str(lora_cache), random_seed=seed, quiet=quiet, copy_tokenizer=True)
    run_merge(merge_config, str(out_path), options=options)


def _merge_config_dict(config: dict[str, Any], out_path: Path, lora_cache: Path, seed: int) -> None:
    from mergekit.config import MergeConfiguration

    run_mergekit(MergeConfiguration.model_validate(config), out_path, lora_cache=lora_cache, seed=seed)


def read_stock_config(path: Path) -> StockConfig:
    merge_config = load_merge_config(path)
    base, models = config_models(merge_config)
    return StockConfig(merge_method=merge_config.merge_method, base=base, models=models)


def ties_merge_function(density: float) -> MergeFunction:
    """A merge function for the oracle and writer that is mergekit's own ``ties``,
    called on one tensor: weights are the table's coefficients, ``normalize`` is
    off (the weights are absolute, as in the convex merge) and ``lambda`` is 1."""
    from mergekit.merge_methods.api import merge_tensors

    def merge(name: str, base: torch.Tensor, deltas: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
        tensors = [base, *(base + delta for delta in deltas)]
        return merge_tensors(
            tensors,
            "ties",
            parameters={"weight": list(weights), "density": density, "normalize": False, "lambda": 1.0},
            base_index=0,
            name=name,
        )

    return merge


UPSTREAM = Upstream(ties=ties_merge_function, read_config=read_stock_config, merge=_merge_config_dict)


def solve(spec: PoolSpec, params: FrankWolfeParameters, *, progress: bool = True) -> SolveResult:
    """The cached solve, with mergekit's machinery handed in."""
    return solve_cached(spec, params, progress=progress, upstream=UPSTREAM)


def mergekit_card(merge_config: Any, name: str) -> tuple[str, str]:
    """(mergekit's model card, the config's YAML) for a folder mergekit did not write."""
    from mergekit.card import generate_card

    config_yaml = merge_config.to_yaml()
    return generate_card(config=merge_config, config_yaml=config_yaml, name=name), config_yaml
