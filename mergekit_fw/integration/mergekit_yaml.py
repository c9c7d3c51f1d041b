"""``mergekit-yaml`` for ``frank_wolfe``: solve once, before mergekit plans the merge,
and write the table, trace and replay config beside the merged weights. Other
merge methods pass through untouched."""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any

from mergekit_fw import METHOD_NAME
from mergekit_fw.integration.artifacts import write_artifacts
from mergekit_fw.integration.configs import pool_and_parameters
from mergekit_fw.integration.method import remember_solve
from mergekit_fw.integration.stock import solve


def wrap_run_merge(module: Any) -> None:
    """Replace ``module.run_merge`` (``mergekit.merge``) by the wrapper, once."""
    original = module.run_merge
    if getattr(original, "_mergekit_fw", False):
        return

    @functools.wraps(original)
    def run_merge(merge_config: Any, out_path: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(merge_config, "merge_method", None) != METHOD_NAME:
            return original(merge_config, out_path, *args, **kwargs)
        options = kwargs.get("options", args[0] if args else None)
        try:
            spec, params = pool_and_parameters(merge_config)
            result = solve(spec, params, progress=not getattr(options, "quiet", False))
        except ValueError as error:  # a bad pool, config or calibration file: say which, no traceback
            raise SystemExit(f"mergekit-fw: error: {error}") from None
        remember_solve(spec, params, result)
        started = time.perf_counter()
        value = original(merge_config, out_path, *args, **kwargs)
        write_artifacts(Path(out_path), result, merge_config, write_seconds=time.perf_counter() - started)
        return value

    run_merge._mergekit_fw = True  # type: ignore[attr-defined]
    module.run_merge = run_merge
