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

import functools
import inspect
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from mergekit_fw import METHOD_NAME
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
                    spec, params = pool_and_parameters(
                        merge_config, trust_remote_code=bool(getattr(options, "trust_remote_code", False))
                    )
                    result = solve(spec, params, progress=not getattr(options, "quiet", False))
                except (ValueError, OSError) as error:  # a bad pool, config or calibration file, a full disk
                    raise SystemExit(f"mergekit-fw: error: {error}") from None
                remember_solve(spec, params, result)
                call["merge_config"] = graph_config(merge_config)
                if options is not None:
                    # mergekit's card would list the base alone; write_artifacts writes its
                    # card for the config as the user wrote it, as the fast path does.
                    call["options"] = options.model_copy(update={"write_model_card": False})
                started = time.perf_counter()
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
