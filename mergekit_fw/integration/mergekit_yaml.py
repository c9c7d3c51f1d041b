"""``mergekit-yaml`` for ``frank_wolfe``: solve once, before mergekit plans the merge,
and write the table, trace and replay config beside the merged weights. Other
merge methods pass through untouched.

mergekit plans a merge over every model its config references, and for a
``BASE+ADAPTER`` reference that means expanding the adapter into a full model copy
in ``--lora-merge-cache`` first. The kernel never reads those copies: it computes
each tensor from the pool's own files (the LoRA factors). So mergekit is handed a
config with the base alone (:func:`graph_config`): its graph loads one base tensor
per output tensor, the kernel adds the solved pool's weighted deltas, and no
adapter is expanded, no candidate tensor read twice, no cache needed.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from mergekit_fw import METHOD_NAME
from mergekit_fw.config import naming_config
from mergekit_fw.integration.artifacts import write_artifacts
from mergekit_fw.integration.configs import pool_and_parameters
from mergekit_fw.integration.method import remember_solve
from mergekit_fw.integration.stock import solve
from mergekit_fw.interrupts import RESUME_HINT, Interrupted, signals_raise


def graph_config(merge_config: Any) -> Any:
    """The config mergekit plans from: the same merge over the base alone, so its
    graph reads nothing but base tensors (the kernel finds the run's solve by the
    base and the settings, see :func:`mergekit_fw.integration.method.remember_solve`)."""
    from mergekit.config import InputModelDefinition

    return merge_config.model_copy(update={"models": [InputModelDefinition(model=merge_config.base_model)]})


def _untied_heads(merge_config: Any, options: Any, untied: list[str]) -> set[str]:
    """The tied names the pool unties (:mod:`mergekit_fw.pool.tied`), checked to be
    weights of mergekit's architecture for the base; a :class:`ValueError` otherwise."""
    if not untied:
        return set()
    from mergekit.architecture import get_architecture_info

    trust = bool(getattr(options, "trust_remote_code", False))
    architecture = get_architecture_info(graph_config(merge_config), options)
    known = {w.name for w in architecture.all_weights(merge_config.base_model.config(trust_remote_code=trust))}
    missing = sorted(set(untied) - known)
    if missing:
        raise ValueError(
            f"the pool unties {', '.join(missing)} from the input embeddings (an adapter saves one of them with "
            "modules_to_save, and PEFT's merge writes the two apart), but mergekit's architecture for this base has "
            "no such weight, so mergekit-yaml cannot write it; the solve is cached: write the merge with "
            "`mergekit-fw run` on the same config"
        )
    return set(untied)


@contextlib.contextmanager
def planning_untied(module: Any, untied: set[str]) -> Iterator[None]:
    """mergekit plans an optional weight only when some input stores it, and a tied
    base stores no head: for the duration of one merge, the untied names are planned
    (mergekit reads the base's values through the weight's tied names) and the output
    config says the two are apart."""
    if not untied:
        yield
        return
    planner = module.MergePlanner
    plan_tensor, out_config = planner.plan_tensor, module._model_out_config

    def plan_untied(self: Any, weight: Any, *args: Any, **kwargs: Any) -> Any:
        if weight.name in untied:
            weight = weight.model_copy(update={"optional": False})
        return plan_tensor(self, weight, *args, **kwargs)

    def untied_config(*args: Any, **kwargs: Any) -> Any:
        config = out_config(*args, **kwargs)
        config.tie_word_embeddings = False
        return config

    planner.plan_tensor, module._model_out_config = plan_untied, untied_config
    try:
        yield
    finally:
        planner.plan_tensor, module._model_out_config = plan_tensor, out_config


def config_name() -> str:
    """The config file as the user named it on ``mergekit-yaml``'s command line, for
    errors: ``run_merge`` is handed the parsed config only. Outside that command (a
    script calling ``run_merge`` itself) there is no file, and errors say "config"."""
    context = click.get_current_context(silent=True)
    name = context.params.get("config_file") if context is not None else None
    return str(name) if name else "config"


def wrap_run_merge(module: Any) -> None:
    """Replace ``module.run_merge`` (``mergekit.merge``) by the wrapper, once."""
    original = module.run_merge
    if getattr(original, "_mergekit_fw", False):
        return
    signature = inspect.signature(original)

    @functools.wraps(original)
    def run_merge(merge_config: Any, out_path: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(merge_config, "merge_method", None) != METHOD_NAME:
            return original(merge_config, out_path, *args, **kwargs)
        call = signature.bind(merge_config, out_path, *args, **kwargs).arguments
        options = call.get("options")
        existed = Path(out_path).exists()
        try:
            with signals_raise():
                try:
                    source = config_name()
                    spec, params = pool_and_parameters(
                        merge_config, source, trust_remote_code=bool(getattr(options, "trust_remote_code", False))
                    )
                    result = solve(spec, params, progress=not getattr(options, "quiet", False))
                    untied = _untied_heads(merge_config, options, result.pool.base_index.untied)
                except (ValueError, OSError) as error:  # a bad pool, config or calibration file, a full disk
                    raise SystemExit(f"mergekit-fw: error: {naming_config(error, source)}") from None
                remember_solve(spec, params, result)
                call["merge_config"] = graph_config(merge_config)
                if options is not None:
                    # mergekit's card would list the base alone; write_artifacts writes its
                    # card for the config as the user wrote it, as the fast path does.
                    call["options"] = options.model_copy(update={"write_model_card": False})
                started = time.perf_counter()
                with planning_untied(module, untied):
                    value = original(**call)
                write_artifacts(Path(out_path), result, merge_config, write_seconds=time.perf_counter() - started)
        except Interrupted as stop:
            # mergekit writes into the output folder itself: one this run created goes, half-written
            if not existed:
                shutil.rmtree(out_path, ignore_errors=True)
            print(f"mergekit-fw: stopped by {stop.name}; {RESUME_HINT}", file=sys.stderr)
            raise SystemExit(stop.exit_status) from None
        return value

    run_merge._mergekit_fw = True  # type: ignore[attr-defined]
    module.run_merge = run_merge
