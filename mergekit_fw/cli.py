"""``mergekit-fw``: the fast path and the pieces of a Frank-Wolfe merge.

Thin by design: parsing and validation live in :mod:`mergekit_fw.config` and
:mod:`mergekit_fw.integration.configs`, the work in :mod:`mergekit_fw.solve` and
:mod:`mergekit_fw.output`, reached through :mod:`mergekit_fw.integration`.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import click

from mergekit_fw.config import ConfigError, naming_config, parameter_descriptions
from mergekit_fw.interrupts import RESUME_HINT, Interrupted, signals_raise

LOG = logging.getLogger("mergekit_fw")


def _parameters_help() -> str:
    lines = ["\b", "Parameters of merge_method: frank_wolfe (the config's parameters: block):"]
    for name, description in parameter_descriptions().items():
        lines.append(f"  {name}: {description}")
    return "\n".join(lines)


def _setup(verbose: bool, threads: int | None) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if threads:
        import torch

        torch.set_num_threads(threads)


def _finish() -> None:
    from mergekit_fw.distributed import shutdown

    shutdown()


def _fail(error: Exception) -> None:
    click.echo(f"mergekit-fw: error: {error}", err=True)
    sys.exit(2)


def _stopped(stop: Interrupted) -> None:
    """One line, and the shell's status for the signal (130 SIGINT, 143 SIGTERM):
    the clean-ups have run by now (lock, hidden output folder), the checkpoint stays."""
    click.echo(f"mergekit-fw: stopped by {stop.name}; {RESUME_HINT}", err=True)
    sys.exit(stop.exit_status)


@click.group(epilog=_parameters_help())
def main() -> None:
    """Frank-Wolfe merging of LoRA and full fine-tunes, for mergekit configs."""


_config_arg = click.argument("config_file", type=click.Path(dir_okay=False, path_type=Path))
_verbose = click.option("-v", "--verbose", is_flag=True, help="Log progress at INFO level.")
_threads = click.option("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
_quiet = click.option("--quiet", is_flag=True, help="No progress bars.")
_trust = click.option(
    "--trust-remote-code",
    is_flag=True,
    help="Load members whose configs ask to run their repository's code (mergekit's option; danger).",
)


@main.command(epilog=_parameters_help())
@_config_arg
@click.argument("out_path", type=click.Path(file_okay=False, path_type=Path))
@click.option("--out-shard-size", default="5B", show_default=True, help="Largest output shard (e.g. 500M, 5B).")
@click.option("--overwrite", is_flag=True, help="Replace OUT_PATH if it exists (only once the new model is complete).")
@click.option(
    "--output-format",
    type=click.Choice(["model", "adapter"]),
    default="model",
    show_default=True,
    help="'model': the merged weights; 'adapter': a PEFT LoRA adapter for the base (LoRA deltas as stacked "
    "factors, dense deltas as modules_to_save), a few megabytes instead of a model.",
)
@click.option(
    "--adapter-rank",
    type=click.IntRange(min=1),
    default=None,
    help="With --output-format adapter: truncate each module's merged delta to this rank by SVD (default: "
    "exact); the relative error per tensor goes in fw_trace.json.",
)
@_verbose
@_threads
@_quiet
@_trust
def run(
    config_file: Path,
    out_path: Path,
    out_shard_size: str,
    overwrite: bool,
    output_format: str,
    adapter_rank: int | None,
    verbose: bool,
    threads: int | None,
    quiet: bool,
    trust_remote_code: bool,
) -> None:
    """Solve and write the merged model, never expanding LoRAs to full copies.

    Under ``accelerate launch --num_processes N`` (or torchrun) the calibration
    batches are split over the processes and only the first one writes."""
    _setup(verbose, threads)
    try:
        with signals_raise():
            from mergekit_fw.distributed import current
            from mergekit_fw.integration.configs import (
                load_merge_config,
                parse_size,
                pool_and_parameters,
            )
            from mergekit_fw.integration.stock import solve as solve_cached
            from mergekit_fw.output.report import summary
            from mergekit_fw.output.writer import output_lock

            if adapter_rank is not None and output_format != "adapter":
                raise ConfigError("--adapter-rank needs --output-format adapter")
            merge_config = load_merge_config(config_file)
            spec, params = pool_and_parameters(
                merge_config, source=str(config_file), trust_remote_code=trust_remote_code
            )
            shard_size = parse_size(out_shard_size)
            processes = current()
            with output_lock(out_path, overwrite=overwrite) if processes.is_main else nullcontext():
                result = solve_cached(spec, params, progress=not quiet)
                if processes.is_main and output_format == "adapter":
                    _write_adapter(result, merge_config, spec, out_path, adapter_rank, quiet)
                elif processes.is_main:  # the others only lent their share of the calibration batches
                    _write(result, merge_config, out_path, shard_size, quiet)
    except (ConfigError, ValueError, OSError) as error:
        _fail(naming_config(error, str(config_file)))
    except Interrupted as stop:
        _stopped(stop)
    _finish()
    if processes.is_main:
        click.echo(summary(result))
        click.echo(f"{'PEFT adapter' if output_format == 'adapter' else 'merged model'} written to {out_path}")


def _write(result, merge_config, out_path: Path, shard_size: int, quiet: bool) -> None:
    from mergekit_fw.integration.artifacts import write_artifacts
    from mergekit_fw.integration.configs import output_dtype
    from mergekit_fw.integration.stock import ties_merge_function
    from mergekit_fw.output.writer import write_merged_model

    started = time.perf_counter()
    write_merged_model(
        result.pool,
        result.table,
        out_path,
        dtype=output_dtype(merge_config),
        max_shard_size=shard_size,
        progress=not quiet,
        extra_writer=lambda folder: write_artifacts(
            folder, result, merge_config, write_seconds=time.perf_counter() - started, name=out_path.name
        ),
        ties=ties_merge_function,
    )


def _write_adapter(result, merge_config, spec, out_path: Path, rank: int | None, quiet: bool) -> None:
    from mergekit_fw.integration.artifacts import write_artifacts
    from mergekit_fw.integration.configs import output_dtype
    from mergekit_fw.output.adapter import write_merged_adapter

    started = time.perf_counter()
    write_merged_adapter(
        result.pool,
        result.table,
        out_path,
        base_reference=spec.base.path,
        rank=rank,
        dtype=output_dtype(merge_config),
        progress=not quiet,
        extra_writer=lambda folder, report: write_artifacts(
            folder,
            result,
            merge_config,
            write_seconds=time.perf_counter() - started,
            name=out_path.name,
            extra_trace={"adapter": report.to_json()},
        ),
    )


@main.command()
@click.argument("out_path", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--to",
    "target",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder for the PNGs (default: OUT_PATH).",
)
def report(out_path: Path, target: Path | None) -> None:
    """Draw a finished run's figures (also written into every output): loss and FW gap
    per iteration, the coefficient table as a heatmap, and the LMO's scores per
    candidate per calibration task."""
    try:
        from mergekit_fw.output.plots import draw_report

        written = draw_report(out_path, target)
    except (ValueError, OSError) as error:
        _fail(error)
    for path in written:
        click.echo(str(path))


@main.command()
@_config_arg
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON instead of a table.")
@_trust
def inspect(config_file: Path, as_json: bool, trust_remote_code: bool) -> None:
    """Check the pool without merging: each candidate's kind, rank, alpha, targets,
    modules_to_save, task-vector norm per block, fit to the base, and a verdict.

    The same checks run before every merge; here a refused candidate is listed
    (exit status 1) instead of stopping the run."""
    try:
        from mergekit_fw.integration.configs import (
            load_merge_config,
            pool_and_parameters,
        )
        from mergekit_fw.pool.validate import check_pool, format_check
        from mergekit_fw.solve.runner import cache_root, pickles_folder

        merge_config = load_merge_config(config_file)
        spec, params = pool_and_parameters(merge_config, source=str(config_file), trust_remote_code=trust_remote_code)
        check = check_pool(
            spec,
            exclude_outliers=params.exclude_outliers,
            pickles_to=pickles_folder(params),
            cache=cache_root(params) / "checks",
        )
    except (ConfigError, ValueError, OSError) as error:
        _fail(naming_config(error, str(config_file)))
    click.echo(json.dumps(check.to_json(), indent=2) if as_json else format_check(check))
    if check.first_error():
        sys.exit(1)


def _source_help(name: str) -> str:
    from mergekit_fw.calibration.sources import TaskSource

    return f"{TaskSource.model_fields[name].description} Repeat as TASK=VALUE for one task."


@main.command()
@click.argument("out_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--task",
    "tasks",
    multiple=True,
    required=True,
    metavar="NAME=DATASET[:CONFIG]:SPLIT",
    help="A task and where its rows come from: a hub dataset id, a save_to_disk folder, or a json, "
    "jsonl, csv or parquet file (split train). Repeat for each task.",
)
@click.option("--prompt-field", multiple=True, help=_source_help("prompt_field"))
@click.option("--completion-field", multiple=True, help=_source_help("completion_field"))
@click.option("--messages-field", multiple=True, help=_source_help("messages_field"))
@click.option("--prompt-template", multiple=True, help=_source_help("prompt_template"))
@click.option("--completion-template", multiple=True, help=_source_help("completion_template"))
@click.option(
    "--samples-per-task", default=100, show_default=True, type=click.IntRange(min=1), help="Rows sampled per task."
)
@click.option("--seed", default=0, show_default=True, help="Seed of the shuffle each task's rows are drawn in.")
@click.option("--overwrite", is_flag=True, help="Replace OUT_FILE if it exists.")
@_verbose
def calibration(
    out_file: Path,
    tasks: tuple[str, ...],
    samples_per_task: int,
    seed: int,
    overwrite: bool,
    verbose: bool,
    **mappings: tuple[str, ...],
) -> None:
    """Write a calibration JSONL from Hugging Face datasets: SAMPLES_PER_TASK rows of
    each task's split, in a seeded shuffle, as prompt/completion or chat rows.

    Offline (HF_DATASETS_OFFLINE=1 or HF_HUB_OFFLINE=1) hub datasets are read from the
    local cache; local folders and files always work."""
    _setup(verbose, None)
    try:
        from mergekit_fw.calibration.sources import format_report, task_sources, write_calibration

        if out_file.exists() and not overwrite:
            raise FileExistsError(f"{out_file} exists (give --overwrite to replace it)")
        sources = task_sources(tasks, mappings)
        report = write_calibration(out_file, sources, samples_per_task, seed)
    except (ValueError, OSError) as error:
        _fail(error)
    click.echo(format_report(report, out_file, seed))


@main.command(epilog=_parameters_help())
@_config_arg
@click.option(
    "--table",
    "table_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the coefficient table JSON.",
)
@_verbose
@_threads
@_quiet
@_trust
def solve(
    config_file: Path, table_path: Path, verbose: bool, threads: int | None, quiet: bool, trust_remote_code: bool
) -> None:
    """Run only the optimisation and save the coefficient table."""
    _setup(verbose, threads)
    try:
        with signals_raise():
            from mergekit_fw.distributed import current
            from mergekit_fw.integration.configs import (
                load_merge_config,
                pool_and_parameters,
            )
            from mergekit_fw.integration.stock import solve as solve_cached
            from mergekit_fw.output.report import summary

            merge_config = load_merge_config(config_file)
            spec, params = pool_and_parameters(
                merge_config, source=str(config_file), trust_remote_code=trust_remote_code
            )
            processes = current()
            result = solve_cached(spec, params, progress=not quiet)
            if processes.is_main:
                result.table.save(table_path)
    except (ConfigError, ValueError, OSError) as error:
        _fail(naming_config(error, str(config_file)))
    except Interrupted as stop:
        _stopped(stop)
    _finish()
    if processes.is_main:
        click.echo(summary(result))
        click.echo(f"table written to {table_path}")


@main.command()
@click.argument("table_path", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Output YAML (default: fw_mergekit.yml beside the table).",
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The fw.yml the table came from, to carry over dtype and tokenizer settings.",
)
def export(table_path: Path, output: Path | None, config_file: Path | None) -> None:
    """Write stock mergekit config(s) for a table: task_arithmetic or ties with per-tensor
    weights, preceded by the initial merge (for mergekit-multi) when the run had one."""
    try:
        from mergekit_fw.integration.configs import load_merge_config
        from mergekit_fw.integration.replay import write_checked_replay
        from mergekit_fw.output.export import REPLAY_FILE
        from mergekit_fw.solve.table import CoefficientTable

        table = CoefficientTable.load(table_path)
        merge_config = load_merge_config(config_file) if config_file else None
        output = output or table_path.with_name(REPLAY_FILE)
        write_checked_replay(table, merge_config, output)
    except (ConfigError, ValueError, OSError) as error:
        _fail(error)
    click.echo(f"replay config written to {output}")


if __name__ == "__main__":
    main()
