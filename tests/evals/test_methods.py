"""The compared methods compute what they claim: mergekit's and PEFT's merges equal
the task-vector sums they stand for, AdaMerging descends its objective, and the
normalised score is the paper's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evals.adamerging import adamerging, answer_positions, step_batches
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


def test_answer_positions_count_only_the_prediction_of_the_answer(tiny_pool, work):
    from transformers import AutoTokenizer

    from mergekit_fw.calibration import build_calibration

    cell = lora_cell(tiny_pool)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_pool.base))
    full = build_calibration(work.calibration(cell), tokenizer, samples_per_task=8, batch_size=3, max_length=64,
                             objective="entropy")
    kept = answer_positions(full)
    equals = tokenizer.convert_tokens_to_ids("=")
    for batch in kept.batches:
        assert batch.positions.sum(dim=1).tolist() == [1] * batch.input_ids.shape[0]
        rows, cols = batch.positions.nonzero(as_tuple=True)
        assert batch.input_ids[rows, cols].tolist() == [equals] * len(rows)  # the last prompt token
    assert kept.counted_positions.tolist() == [8.0, 8.0]
    picked = [step_batches(kept, s) for s in range(4)]
    assert all([b.task for b in step] == [0, 1] for step in picked)  # one batch of every task per step
    assert picked[0][0] is not picked[1][0] and picked[0][0] is picked[3][0]  # 3 batches of task 0, cycled


def test_adamerging_starts_at_task_arithmetic_and_descends_the_entropy(tiny_pool, work, tmp_path):
    cell = lora_cell(tiny_pool)
    calibration = work.calibration(cell)
    info = adamerging(cell, calibration, tmp_path / "start", steps=0)
    assert_same_model(tmp_path / "start", weighted_sum_model(cell, [0.3] * 4))
    assert info["entropy_final_all"] == pytest.approx(info["entropy_initial_all"])

    info = adamerging(cell, calibration, tmp_path / "trained", steps=15, lr=0.05)
    assert info["entropy_final_all"] < info["entropy_initial_all"]
    assert all(0.0 <= c <= 1.0 for c in info["mean_coefficients"].values())
    assert any(abs(c - 0.3) > 1e-3 for c in info["mean_coefficients"].values())


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
