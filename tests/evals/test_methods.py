"""The compared methods compute what they claim: mergekit's and PEFT's merges equal
the task-vector sums they stand for, the learned baselines descend the objective
FW minimises and count what they spend, and the normalised score is the paper's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evals.learned import Objective, layerwise, lorahub
from evals.methods import (
    Cell,
    Workspace,
    mergekit_config,
    method,
    run_mergekit,
    weighted_sum_model,
)
from evals.scoring import normalized


def tensors(folder: Path):
    out = {}
    for shard in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


def assert_same_model(folder: Path, model) -> None:
    got = tensors(folder)
    expected = model.state_dict()
    assert set(got) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(got[name].double(), value.double(), rtol=1e-5, atol=1e-6, msg=name)


@pytest.fixture()
def work(tmp_path) -> Workspace:
    return Workspace(tmp_path / "work")


def lora_cell(pool) -> Cell:
    return Cell(pool, ("reverse", "sort", "firstlow", "reverse-duplicate"), ("reverse", "firstlow"), per_task=8)


def test_mergekit_task_arithmetic_is_the_sum_the_lambda_was_picked_on(tiny_pool, work, tmp_path):
    """lambda is chosen on mergekit-fw's writer's sum; mergekit must compute the same model."""
    cell = Cell(tiny_pool, ("reverse", "sort", "full-reverse"), ("reverse",), per_task=8)
    run_mergekit(mergekit_config(cell, "task_arithmetic", {"weight": 0.3}), tmp_path / "ta", work)
    assert_same_model(tmp_path / "ta", weighted_sum_model(cell, [0.3, 0.3, 0.3]))


def test_linear_is_the_members_mean(tiny_pool, work, tmp_path):
    cell = Cell(tiny_pool, ("reverse", "sort", "full-reverse"), ("reverse",), per_task=8)
    method("linear").produce(cell, tmp_path / "linear", work)
    assert_same_model(tmp_path / "linear", weighted_sum_model(cell, [1 / 3] * 3))


def test_peft_cat_is_the_exact_mean_and_svd_its_truncation(tiny_pool, work, tmp_path):
    cell = Cell(tiny_pool, ("reverse", "sort", "firstlow", "full-reverse"), ("reverse",), per_task=8)
    produced = method("peft_cat").produce(cell, tmp_path / "cat", work)
    assert produced.info["left_out"] == ["full-reverse"]  # PEFT holds LoRAs only
    lora_only = Cell(tiny_pool, ("reverse", "sort", "firstlow"), ("reverse",), per_task=8)
    mean = weighted_sum_model(lora_only, [1 / 3] * 3)
    assert_same_model(tmp_path / "cat", mean)
    method("peft_svd").produce(cell, tmp_path / "svd", work)
    svd, exact, base = tensors(tmp_path / "svd"), mean.state_dict(), tensors(tiny_pool.base)
    moved = [n for n in exact if not torch.equal(exact[n], base[n])]
    assert moved
    for name in moved:  # a rank-limited copy of the same sum: nearer to it than the base is
        assert (svd[name] - exact[name]).norm() < 0.9 * (exact[name] - base[name]).norm()


def test_adamerging_starts_at_task_arithmetic_and_descends_the_entropy(tiny_pool, work, tmp_path):
    cell = lora_cell(tiny_pool)
    calibration = work.calibration(cell)
    entropy = Objective("entropy")
    info = layerwise(cell, calibration, tmp_path / "start", objective=entropy, steps=0, lr=1e-3)
    assert_same_model(tmp_path / "start", weighted_sum_model(cell, [0.3] * 4))
    assert info["loss_final"] == pytest.approx(info["loss_initial"])
    assert info["spend"]["gradient"] == 0 and info["spend"]["forward"] == pytest.approx(2.0)

    info = layerwise(cell, calibration, tmp_path / "trained", objective=entropy, steps=15, lr=0.05)
    assert info["loss_final"] < info["loss_initial"]
    assert all(0.0 <= c <= 1.0 for c in info["mean_coefficients"].values())
    assert any(abs(c - 0.3) > 1e-3 for c in info["mean_coefficients"].values())
    # 8 rows a task, one step = one batch of up to 16 rows of each task = the whole set
    assert info["spend"]["gradient"] == pytest.approx(15.0)


def test_supervised_per_rank_component_learns_one_coefficient_per_component(tiny_pool, work, tmp_path):
    """The same recipe over the split pool: at its start (every component at 0.3) it is the
    layer-wise start, loss and written model, and training lowers the loss."""
    cell = lora_cell(tiny_pool)
    start = layerwise(cell, work.calibration(cell), tmp_path / "s0", objective=Objective(), steps=0, lr=0.05)
    ranked = layerwise(cell, work.calibration(cell), tmp_path / "r0", objective=Objective(), steps=0, lr=0.05,
                       granularity="rank_component")
    assert abs(ranked["loss_initial"] - start["loss_initial"]) < 1e-6 * start["loss_initial"]
    trained = layerwise(cell, work.calibration(cell), tmp_path / "r", objective=Objective(), steps=20, lr=0.05,
                        granularity="rank_component")
    assert trained["granularity"] == "rank_component" and trained["loss_final"] < trained["loss_initial"]
    assert ranked["coefficients"] > start["coefficients"]  # one per component, not per member
    assert set(trained["mean_coefficients"]) == set(start["mean_coefficients"])  # reported per member
    written, reference = tensors(tmp_path / "r0"), tensors(tmp_path / "s0")
    assert set(written) == set(reference)
    for name, value in reference.items():
        torch.testing.assert_close(written[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_supervised_layerwise_lowers_the_cross_entropy_fw_minimises(tiny_pool, work, tmp_path):
    cell = lora_cell(tiny_pool)
    info = layerwise(cell, work.calibration(cell), tmp_path / "sup", objective=Objective(), steps=20, lr=0.05)
    assert info["objective"] == "cross_entropy"
    assert info["loss_final"] < info["loss_initial"]
    assert all(0.0 <= c <= 1.0 for c in info["mean_coefficients"].values())


def test_lorahub_writes_the_weighted_sum_it_found_and_counts_its_budget(tiny_pool, work, tmp_path):
    cell = lora_cell(tiny_pool)
    info = lorahub(cell, work.calibration(cell), tmp_path / "hub", budget=6, optimizer="CMA")
    weights = list(info["weights"].values())
    assert len(weights) == len(cell.members) and all(-1.5 <= w <= 1.5 for w in weights)
    assert info["spend"]["forward"] == pytest.approx(6.0) and info["spend"]["gradient"] == 0
    assert_same_model(tmp_path / "hub", weighted_sum_model(cell, weights))
    published = lorahub(cell, work.calibration(cell), tmp_path / "ngopt", budget=4)
    assert published["optimiser"].startswith("nevergrad NGOpt")


def test_normalised_score_is_the_mean_ratio_to_the_individual_adapters():
    assert normalized({"a": 0.5, "b": 0.5}, {"a": 1.0, "b": 0.5}) == pytest.approx(75.0)
    assert normalized({"a": 0.5, "b": 0.2}, {"a": 1.0, "b": 0.0}) == pytest.approx(50.0)  # nothing to normalise b by


def test_cells_are_keyed_by_what_decides_them(tiny_pool):
    a = Cell(tiny_pool, ("reverse", "sort"), ("reverse",), per_task=8)
    assert a.key == Cell(tiny_pool, ("reverse", "sort"), ("reverse",), per_task=8).key
    assert len({a.key, Cell(tiny_pool, ("reverse", "sort"), ("reverse",), per_task=4).key,
                Cell(tiny_pool, ("sort", "reverse"), ("reverse",), per_task=8).key,
                Cell(tiny_pool, ("reverse", "sort"), ("sort",), per_task=8).key}) == 4



def test_frank_wolfe_can_start_from_the_calibrated_task_arithmetic_merge(tiny_pool, work, tmp_path):
    """The exp 3 probe: the start is task_arithmetic's own pick on the same rows, written as
    a mergekit config that the run adds as one more vertex."""
    import json

    import yaml

    from evals.methods import calibrated_lambda, fw_method

    cell = lora_cell(tiny_pool)
    produced = fw_method(variant="hard", lmo="layer", init="ta_calibrated", iterations=2)(cell, tmp_path / "fw", work)
    picked = calibrated_lambda(cell, Workspace(tmp_path / "fresh"))[0]  # picked again, not read from work's cache
    assert produced.info["init_weight"] == picked
    start = yaml.safe_load((work.root / "fw_inits" / f"{cell.key}-ta_calibrated.yml").read_text())
    assert start["merge_method"] == "task_arithmetic"
    assert {m["parameters"]["weight"] for m in start["models"]} == {picked}
    trace = json.loads((tmp_path / "fw" / "fw_trace.json").read_text())
    assert trace["final_loss"] <= trace["initial_loss"] + 1e-6  # line search never accepts a worse point


def test_task_arithmetic_picks_lambda_once_per_cell(tiny_pool, work, monkeypatch):
    from evals import methods

    cell = lora_cell(tiny_pool)
    first = methods.calibrated_lambda(cell, work)
    assert first[0] in methods.TA_LAMBDAS and first[0] == max(first[1], key=lambda lam: (first[1][lam], -lam))
    monkeypatch.setattr(methods, "weighted_sum_model", lambda *a: pytest.fail("picked lambda again"))
    assert methods.calibrated_lambda(cell, work) == first


def test_the_defaults_row_runs_what_a_user_gets_with_nothing_set(monkeypatch):
    """Result tables label one row 'at its defaults'; it is read from the config class,
    so it follows a change of defaults (the paper's row kept that label for a while
    after issue 17 changed them)."""
    from mergekit_fw.config import FrankWolfeParameters
    from evals.methods import PAPER_FW, defaults_row, method, row_settings

    fields = FrankWolfeParameters.model_fields
    row = defaults_row()
    assert row is not None
    settings = row_settings(method(row).produce.settings)
    for name in (*PAPER_FW, "constraint", "variant", "lmo", "granularity"):
        assert settings.get(name, fields[name].default) == fields[name].default, name
    monkeypatch.setattr(fields["direction"], "default", "frank_wolfe")  # another default: another row
    assert defaults_row() != row
