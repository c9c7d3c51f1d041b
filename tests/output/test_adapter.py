"""The merge as a PEFT adapter: PEFT loads it on the base and its merge_and_unload()
is the model the same table writes; truncated adapters lose less as the rank grows;
dense deltas go in as modules_to_save."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from mergekit_fw.cli import main
from mergekit_fw.output.adapter import write_merged_adapter
from mergekit_fw.output.low_rank import stacked, truncated
from mergekit_fw.output.writer import write_merged_model
from mergekit_fw.pool.pool import open_pool
from mergekit_fw.solve.table import CoefficientTable
from tests.oracle.helpers import pool_spec
from tests.paths import lora_config, tensors


DENSE_ON = ("model.norm.weight", "model.layers.1.self_attn.o_proj.weight")


def _table(pool, seed: int = 0, merge_fn: str = "convex", dense_on=DENSE_ON) -> CoefficientTable:
    """Random simplex columns, every LoRA with some weight on every tensor; full
    checkpoints only on the tensors ``dense_on`` (None: everywhere)."""
    names = pool.tensor_names()
    g = torch.Generator().manual_seed(seed)
    weights = 0.1 + torch.rand(1 + len(pool.names), len(names), generator=g, dtype=torch.float64)
    for i, candidate in enumerate(pool.names):
        if candidate.startswith("dense") and dense_on is not None:
            weights[1 + i, [j for j, n in enumerate(names) if n not in dense_on]] = 0.0
    weights /= weights.sum(0, keepdim=True)
    return CoefficientTable(list(pool.names), names, weights, "test", str(pool.base_dir), merge_fn=merge_fn)


def _merged_by_peft(base_dir, adapter_dir) -> dict[str, torch.Tensor]:
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32),
                                      str(adapter_dir))
    return {k: v.detach() for k, v in model.merge_and_unload().state_dict().items()}


def _largest_difference(merged: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    assert set(reference) <= set(merged)  # a tied model's state also names lm_head, which no file stores
    return max(float((merged[k].to(torch.float64) - reference[k].to(torch.float64)).abs().max()) for k in reference)


@pytest.fixture(scope="module")
def written(random_pool, tmp_path_factory):
    """A LoRA pool (one with modules_to_save) and a pool with full checkpoints too:
    each table written as a model and as an exact adapter."""
    root = tmp_path_factory.mktemp("adapter")
    out = {}
    for kinds in (("lora", "saved"), ("lora", "dense")):
        pool = open_pool(pool_spec(random_pool, kinds=kinds))
        table = _table(pool)
        key = "+".join(kinds)
        write_merged_model(pool, table, root / f"model-{key}", progress=False)
        report = write_merged_adapter(pool, table, root / f"adapter-{key}", base_reference=str(random_pool["base"]),
                                      progress=False)
        out[kinds[-1]] = (pool, table, root / f"model-{key}", root / f"adapter-{key}", report)
    return out


@pytest.mark.parametrize("pool_kind", ["saved", "dense"])
def test_peft_merges_the_exact_adapter_into_the_models_weights(pool_kind, written, random_pool):
    """float32 throughout; the model sums the deltas block by block in another order
    than PEFT's merge, so they agree to float32 rounding (1e-6 on weights of order 1)."""
    _, _, model_dir, adapter_dir, _ = written[pool_kind]
    merged = _merged_by_peft(random_pool["base"], adapter_dir)
    reference = tensors(model_dir)
    assert _largest_difference(merged, reference) < 1e-6
    base = load_file(str(random_pool["base"] / "model.safetensors"))
    assert any(not torch.equal(reference[k], base[k]) for k in base)  # the comparison can fail


def test_lora_modules_carry_the_summed_ranks_and_dense_ones_are_saved_whole(written):
    pool, _, _, adapter_dir, report = written["saved"]
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    # q_proj: lora0 (r 4) and lora1 (r 2); k_proj: saved0 (r 2); down_proj, o_proj: lora1; up_proj: lora2 (r 3)
    assert report.ranks["model.layers.0.self_attn.q_proj"] == 6
    assert report.ranks["model.layers.1.self_attn.k_proj"] == 2
    assert report.ranks["model.layers.0.mlp.up_proj"] == 3 and report.ranks["model.layers.0.self_attn.v_proj"] == 7
    assert config["modules_to_save"] == ["lm_head"] and report.saved_whole == ["lm_head"]
    assert config["r"] == config["lora_alpha"] and config["rank_pattern"] == config["alpha_pattern"]
    saved = load_file(str(adapter_dir / "adapter_model.safetensors"))
    assert saved["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape[0] == 6
    assert "base_model.model.lm_head.weight" in saved
    dense_report = written["dense"][4]  # the modules full checkpoints move are saved whole, the rest are LoRAs
    assert dense_report.saved_whole == ["model.layers.1.self_attn.o_proj", "model.norm"]
    assert "model.layers.0.self_attn.o_proj" in dense_report.ranks


def test_an_adapter_that_would_be_the_whole_model_is_refused(written, random_pool, tmp_path):
    pool = written["dense"][0]
    with pytest.raises(ValueError, match="every module it moves has a dense delta"):
        write_merged_adapter(pool, _table(pool, dense_on=None), tmp_path / "a", base_reference="b", progress=False)
    assert not list(tmp_path.iterdir())


def test_truncation_loses_less_as_the_rank_grows(written, random_pool, tmp_path):
    pool, table, model_dir, _, _ = written["saved"]
    reference = tensors(model_dir)
    errors, differences = [], []
    for rank in (1, 2, 4, 7):
        report = write_merged_adapter(pool, table, tmp_path / f"r{rank}", base_reference=str(random_pool["base"]),
                                      rank=rank, progress=False)
        assert max(report.ranks.values()) <= rank
        errors.append(report.relative_error)
        differences.append(_largest_difference(_merged_by_peft(random_pool["base"], tmp_path / f"r{rank}"), reference))
    for smaller, larger in zip(errors, errors[1:]):
        assert all(larger[t] <= smaller[t] + 1e-12 for t in smaller)
    assert differences == sorted(differences, reverse=True) and differences[0] > 1e-3
    assert max(errors[-1].values()) == 0.0 and differences[-1] < 1e-6  # rank 7 holds every delta exactly


def test_truncation_is_the_best_low_rank_approximation():
    """Against the SVD of the dense product: the same error, the Eckart-Young one."""
    torch.manual_seed(0)
    factors = [(torch.randn(24, 3), torch.randn(3, 17), 0.7), (torch.randn(24, 4), torch.randn(4, 17), -0.2)]
    B, A = stacked(factors)
    dense = sum(weight * b.double() @ a.double() for b, a, weight in factors)
    singular = torch.linalg.svdvals(dense)
    for rank in range(1, 8):
        B_r, A_r, error = truncated(B, A, rank)
        assert B_r.shape == (24, rank) and A_r.shape == (rank, 17)
        expected = float(singular[rank:].square().sum().sqrt() / singular.square().sum().sqrt())
        assert abs(error - expected) < 1e-10
        assert abs(float((B_r @ A_r - dense).norm() / dense.norm()) - expected) < 1e-10


def test_a_ties_table_is_refused(written, random_pool, tmp_path):
    pool = written["saved"][0]
    with pytest.raises(ValueError, match="not a sum of LoRA products"):
        write_merged_adapter(pool, _table(pool, merge_fn="ties"), tmp_path / "a", base_reference="b", progress=False)
    assert not list(tmp_path.iterdir())


def test_run_writes_an_adapter_with_the_runs_files(random_pool, tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEKIT_FW_CACHE", str(tmp_path / "cache"))
    base = random_pool["base"]
    config = lora_config(tmp_path / "fw.yml", base, random_pool["adapters"], random_pool["calibration"], iterations=2)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", str(config), str(out), "--quiet", "--output-format", "adapter",
                                       "--adapter-rank", "2"])
    assert result.exit_code == 0, result.output
    assert "PEFT adapter written to" in result.output
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "fw_table.json", "fw_trace.json",
            "fw_mergekit.yml", "README.md"} <= names
    assert not any(name.endswith(".safetensors") and name != "adapter_model.safetensors" for name in names)
    trace = json.loads((out / "fw_trace.json").read_text())
    assert trace["adapter"]["rank"] == 2 and trace["adapter"]["relative_error"]
    assert "PEFT LoRA adapter" in (out / "README.md").read_text()
    refused = CliRunner().invoke(main, ["run", str(config), str(tmp_path / "o2"), "--adapter-rank", "2"])
    assert refused.exit_code == 2 and "--adapter-rank needs --output-format adapter" in refused.output


def test_a_conv1d_base_gets_a_fan_in_fan_out_adapter(tmp_path):
    """GPT-2 stores its projections as Conv1D (in x out): the adapter's pair is that of
    the transpose and its config says fan_in_fan_out, as PEFT's own GPT-2 adapters do."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    from mergekit_fw.pool.references import CandidateSpec, ModelSource, PoolSpec
    from testbed.build import SIX, build_tokenizer

    base = tmp_path / "base"
    tokenizer = build_tokenizer(base, list(SIX))
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=2, n_head=2, n_positions=32)).save_pretrained(
        str(base))
    adapters = []
    for index, targets in enumerate([["c_attn"], ["c_fc", "c_proj"]]):
        torch.manual_seed(5 + index)
        model = get_peft_model(GPT2LMHeadModel.from_pretrained(str(base)),
                               LoraConfig(r=2, lora_alpha=4, target_modules=targets, fan_in_fan_out=True,
                                          init_lora_weights=False))
        model.save_pretrained(str(tmp_path / f"lora{index}"))
        adapters.append(tmp_path / f"lora{index}")
    pool = open_pool(PoolSpec(ModelSource(str(base)), tuple(
        CandidateSpec(f"lora{i}", ModelSource(str(base)), ModelSource(str(a))) for i, a in enumerate(adapters))))
    table = _table(pool)
    write_merged_model(pool, table, tmp_path / "model", progress=False)
    report = write_merged_adapter(pool, table, tmp_path / "adapter", base_reference=str(base), progress=False)
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    assert report.ranks["transformer.h.0.attn.c_attn"] == 2 and report.ranks["transformer.h.0.attn.c_proj"] == 2
    assert _largest_difference(_merged_by_peft(base, tmp_path / "adapter"), tensors(tmp_path / "model")) < 1e-6
