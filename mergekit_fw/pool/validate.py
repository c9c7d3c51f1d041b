"""One pass over the pool before any maths: what each candidate is, whether it
fits the base, whether its numbers are sane, and a verdict.

Community pools hold adapters trained on another base, broken downloads and
misinitialised models. Every check here names the file and the problem, so a
run fails in seconds rather than after an hour of gradients, and
``mergekit-fw inspect`` shows the same findings as a table without failing.

Outliers are judged on the task vector's RMS per element over the tensors a
candidate moves (so LoRAs of different ranks and target sets compare fairly):
a candidate whose RMS is more than ``OUTLIER_RATIO`` times away from the pool's
median, and whose robust z-score (median absolute deviation of the log RMS)
passes ``OUTLIER_Z``, is flagged. Both must hold, so a tight pool with one
slightly different member is not flagged, and a pool of three is never judged.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergekit_fw.files import file_fingerprint, fingerprint, write_json_atomic
from mergekit_fw.pool.candidates import Candidate, LoraCandidate, SafetensorsIndex
from mergekit_fw.pool.pool import Pool, load_candidate, open_base
from mergekit_fw.pool.references import PoolError, PoolSpec
from mergekit_fw.pool.rows import delta_norm as candidate_delta_norm
from mergekit_fw.pool.tied import untie_heads

LOG = logging.getLogger(__name__)
OUTLIER_RATIO = 4.0
OUTLIER_Z = 3.5
MIN_POOL_FOR_OUTLIERS = 4


@dataclass
class CandidateCheck:
    """What ``inspect`` prints for one candidate."""

    name: str
    kind: str  # "lora", "full" or "?" when it could not be read
    folder: str
    rank: str = ""
    alpha: str = ""
    rslora: bool | None = None
    targets: list[str] = field(default_factory=list)
    modules_to_save: list[str] = field(default_factory=list)
    recorded_base: str | None = None  # base_model_name_or_path / _name_or_path
    recorded_base_differs: bool = False
    block_norms: dict[str, float] = field(default_factory=dict)  # ||task vector|| per block
    rms: float = 0.0  # task vector RMS per moved element
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    outlier: bool = False
    excluded: bool = False

    @property
    def verdict(self) -> str:
        if self.errors:
            return "refused"
        if self.excluded:
            return "excluded"
        if self.outlier:
            return "outlier"
        return "warning" if self.warnings else "ok"


@dataclass
class PoolCheck:
    base: str
    candidates: list[CandidateCheck]
    pool: Pool | None = None  # the usable pool (refused and excluded candidates left out)

    def first_error(self) -> str | None:
        for check in self.candidates:
            if check.errors:
                return check.errors[0]
        return None

    def exclusions(self) -> dict[str, str]:
        """Candidate -> why it was left out (for the trace)."""
        return {c.name: "; ".join(c.warnings) for c in self.candidates if c.excluded}

    def to_json(self) -> dict:
        return {
            "base": self.base,
            "candidates": [{**vars(c), "verdict": c.verdict} for c in self.candidates],
        }


def block_of(tensor: str) -> str:
    """The block a tensor belongs to: its decoder layer, or the embeddings / head."""
    match = re.search(r"\.(?:layers|h|blocks|layer)\.(\d+)\.", tensor)
    if match:
        return f"layer {int(match.group(1))}"
    if "embed" in tensor or "wte" in tensor or "wpe" in tensor:
        return "embed"
    if "lm_head" in tensor or tensor.startswith("output."):
        return "head"
    return "other"


def _non_finite(tensor: torch.Tensor) -> int:
    if not tensor.is_floating_point():
        return 0
    return int((~torch.isfinite(tensor)).sum())


def _scan_index(index: SafetensorsIndex, names: list[str], what: str) -> str | None:
    """The first tensor with NaN/Inf values (truncation was caught when the index opened)."""
    for name in names:
        bad = _non_finite(index.get(name))
        if bad:
            return f"{what}: {index.where(name)[0]}: tensor {name} has {bad} NaN/Inf values"
    return None


def _recorded_base_mismatch(recorded: str | None, base_dir: Path, base_source: str) -> str | None:
    """A warning when an adapter says it was trained on something that is not our base."""
    if not recorded:
        return None
    candidates = {base_source.rstrip("/"), str(base_dir), base_dir.name}
    base_config = base_dir / "config.json"
    if base_config.is_file():
        name_or_path = json.loads(base_config.read_text()).get("_name_or_path")
        if name_or_path:
            candidates.add(str(name_or_path).rstrip("/"))
    recorded = recorded.rstrip("/")
    if recorded in candidates or Path(recorded).name == base_dir.name:
        return None
    try:
        if Path(recorded).expanduser().resolve() == base_dir.resolve():
            return None
    except OSError:
        pass
    return f"recorded base {recorded!r} is not the base model {base_source!r} (shapes fit; merged with a warning)"


def _describe_lora(check: CandidateCheck, candidate: LoraCandidate) -> None:
    config = candidate.config
    ranks = sorted({f.rank for f in candidate.factors.values()})
    check.rank = "/".join(map(str, ranks))
    check.targets = sorted({name.rsplit(".", 2)[-2] for name in candidate.factors})
    if config is not None:
        check.alpha = f"{config.lora_alpha:g}"
        check.rslora = config.use_rslora
        check.modules_to_save = sorted(config.modules_to_save)
        check.recorded_base = config.base_model_name_or_path


def _norms(candidate: Candidate, pool_base: SafetensorsIndex) -> tuple[dict[str, float], float, str | None]:
    """Per-block task-vector norms (low-rank for LoRAs), the RMS, and the first NaN/Inf."""
    squares: dict[str, float] = {}
    elements = 0
    for tensor in candidate.tensor_names():
        low_rank = candidate.is_low_rank(tensor)
        factors = candidate.factors[tensor] if low_rank else None  # type: ignore[union-attr]
        was_loaded = factors is not None and factors.loaded
        delta_norm = candidate_delta_norm(candidate, tensor, pool_base)
        if factors is not None and not was_loaded:
            factors.release()  # checked, not kept: memory must not grow with the pool
        if not math.isfinite(delta_norm):
            path, _ = (candidate.weights_file, None) if low_rank else candidate.source_of(tensor)  # type: ignore[union-attr]
            return {}, 0.0, f"candidate {candidate.name}: {path}: the delta of {tensor} has NaN/Inf values"
        block = block_of(tensor)
        squares[block] = squares.get(block, 0.0) + delta_norm**2
        shape = pool_base.shape(tensor)
        elements += math.prod(shape) if shape else 1
    norms = {block: value**0.5 for block, value in squares.items()}
    rms = (sum(squares.values()) / max(elements, 1)) ** 0.5
    return norms, rms, None


def _mark_outliers(checks: list[CandidateCheck]) -> None:
    usable = [c for c in checks if not c.errors and c.rms > 0]
    if len(usable) < MIN_POOL_FOR_OUTLIERS:
        return
    logs = torch.tensor([math.log(c.rms) for c in usable], dtype=torch.float64)
    median = float(logs.median())
    mad = float((logs - median).abs().median())
    scale = 1.4826 * mad if mad > 0 else 1e-12
    for check, value in zip(usable, logs.tolist()):
        ratio = math.exp(abs(value - median))
        z = abs(value - median) / scale
        if ratio >= OUTLIER_RATIO and z >= OUTLIER_Z:
            check.outlier = True
            direction = "above" if value > median else "below"
            check.warnings.append(
                f"task vector RMS {check.rms:.3g} is {ratio:.1f}x {direction} the pool's median "
                f"{math.exp(median):.3g} (robust z {z:.1f}): a broken or misinitialised model?"
            )


class _NumericCache:
    """Results of the reading checks (NaN/Inf scans, dense norms) keyed by the files'
    fingerprints: a 7B base or a full checkpoint is read once, not on every run."""

    def __init__(self, folder: Path | None):
        self.folder = folder

    def _path(self, files: list[Path]) -> Path | None:
        if self.folder is None:
            return None
        return self.folder / f"{fingerprint(['check', 1, file_fingerprint(files)])}.json"

    def get(self, files: list[Path]) -> dict | None:
        path = self._path(files)
        if path is None or not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except ValueError:
            return None

    def put(self, files: list[Path], value: dict) -> None:
        path = self._path(files)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, value)


def _numeric_checks(
    candidate: Candidate, base_index: SafetensorsIndex, base_files: list[Path], cache: _NumericCache
) -> dict:
    files = [*candidate.files(), *base_files]
    cached = cache.get(files)
    if cached is not None:
        return cached
    # a full checkpoint's NaN/Inf shows in its deltas' norms: its tensors are read once, here
    norms, rms, problem = _norms(candidate, base_index)
    result = {"block_norms": norms, "rms": rms, "error": problem}
    cache.put(files, result)
    return result


def check_pool(
    spec: PoolSpec, *, exclude_outliers: bool = False, pickles_to: Path | None = None, cache: Path | None = None
) -> PoolCheck:
    """Every check on every candidate; nothing raises except a base that cannot be read.
    ``cache``: a folder remembering the reading checks of unchanged files."""
    numeric = _NumericCache(cache)
    base_dir, base_config, base_index = open_base(spec, pickles_to=pickles_to)
    base_files = [base_dir / "config.json", *base_index.weight_files()]
    scanned = numeric.get(base_files)
    if scanned is None:
        scanned = {"error": _scan_index(base_index, base_index.names(), "base_model")}
        numeric.put(base_files, scanned)
    if scanned["error"]:
        raise PoolError(scanned["error"])
    checks: list[CandidateCheck] = []
    loaded: list[Candidate] = []
    for candidate_spec in spec.candidates:
        folder = str(candidate_spec.lora or candidate_spec.model)
        check = CandidateCheck(candidate_spec.name, "lora" if candidate_spec.lora else "full", folder)
        checks.append(check)
        try:
            candidate = load_candidate(candidate_spec, spec, base_dir, base_config, base_index, pickles_to=pickles_to)
        except PoolError as error:
            check.errors.append(str(error))
            continue
        if isinstance(candidate, LoraCandidate):
            _describe_lora(check, candidate)
        result = _numeric_checks(candidate, base_index, base_files, numeric)
        if result["error"]:
            check.errors.append(result["error"])
            continue
        check.block_norms, check.rms = result["block_norms"], result["rms"]
        if check.rms == 0.0:
            check.warnings.append("its task vector is zero (it equals the base)")
        mismatch = _recorded_base_mismatch(check.recorded_base, base_dir, str(spec.base))
        if mismatch:
            check.recorded_base_differs = True
            check.warnings.append(mismatch)
        loaded.append(candidate)
    _mark_outliers(checks)
    keep = []
    for check, candidate in zip([c for c in checks if not c.errors], loaded):
        if check.outlier and exclude_outliers:
            check.excluded = True
            continue
        keep.append(candidate)
    found = PoolCheck(str(spec.base), checks)
    if keep:
        found.pool = Pool(
            base_dir=base_dir,
            base_config=untie_heads(base_config, base_index, keep),
            base_index=base_index,
            candidates=keep,
            trust_remote_code=spec.trust_remote_code,
        )
    return found


def validated_pool(
    spec: PoolSpec, *, exclude_outliers: bool = False, pickles_to: Path | None = None, cache: Path | None = None
) -> tuple[Pool, PoolCheck]:
    """The pool ready for maths, or a :class:`PoolError` naming the first culprit."""
    check = check_pool(spec, exclude_outliers=exclude_outliers, pickles_to=pickles_to, cache=cache)
    error = check.first_error()
    if error:
        raise PoolError(error)
    for candidate in check.candidates:
        for warning in candidate.warnings:
            LOG.warning("candidate %s: %s", candidate.name, warning)
        if candidate.excluded:
            LOG.warning("candidate %s: left out of the pool (exclude_outliers: true)", candidate.name)
    if check.pool is None:
        raise PoolError("every candidate was left out as an outlier; nothing to merge")
    return check.pool, check


def _fits(check: CandidateCheck) -> str:
    if check.errors:
        return "no"
    if check.recorded_base_differs:
        return "shapes (id differs)"
    return "yes"


def format_check(check: PoolCheck) -> str:
    """``mergekit-fw inspect``'s table: one row per candidate, then per-block norms and findings."""
    header = [
        "candidate",
        "kind",
        "rank",
        "alpha",
        "rsLoRA",
        "targets",
        "modules_to_save",
        "RMS |dW|",
        "fits base",
        "verdict",
    ]
    rows = [header]
    for c in check.candidates:
        rows.append(
            [
                c.name,
                c.kind,
                c.rank or "-",
                c.alpha or "-",
                "-" if c.rslora is None else ("yes" if c.rslora else "no"),
                ",".join(c.targets) or ("all" if c.kind == "full" and not c.errors else "-"),
                ",".join(c.modules_to_save) or "-",
                f"{c.rms:.3g}" if not c.errors else "-",
                _fits(c),
                c.verdict,
            ]
        )
    lines = [f"base: {check.base}", *_aligned(rows)]
    blocks = sorted({b for c in check.candidates for b in c.block_norms}, key=_block_order)
    if blocks:
        lines += ["", "task-vector norm per block (LoRAs computed low-rank):"]
        table = [["candidate", *blocks]]
        for c in check.candidates:
            table.append([c.name, *(f"{c.block_norms[b]:.3g}" if b in c.block_norms else "-" for b in blocks)])
        lines += _aligned(table)
    findings = [(c.name, "error", e) for c in check.candidates for e in c.errors]
    findings += [(c.name, "warning", w) for c in check.candidates for w in c.warnings]
    if findings:
        lines += ["", "findings:"] + [f"  {name}: {level}: {text}" for name, level, text in findings]
    return "\n".join(lines)


def _block_order(block: str):
    if block.startswith("layer "):
        return (1, int(block.split()[1]))
    return ({"embed": 0, "head": 2}.get(block, 3), 0)


def _aligned(rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
