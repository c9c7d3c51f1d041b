"""granularity: rank_component: each LoRA's rank-1 components as candidates of their own.

The references are PEFT's own: its ``lora_A`` / ``lora_B`` weights and scaling,
read from a ``PeftModel``, never our parsing of the adapter files."""

from __future__ import annotations

from typing import Dict, List

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM

from mergekit_fw.oracle import Oracle
from mergekit_fw.pool.components import RankComponent, parent_name, split_rank_components
from mergekit_fw.pool.pool import open_pool
from tests.oracle.helpers import brute_force, make_oracle, peft_deltas, pool_spec


def peft_components(base_dir, adapter_dir) -> Dict[str, List[torch.Tensor]]:
    """Per targeted weight, PEFT's ``scaling * B[:, j] A[j, :]`` for every j (float64)."""
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float64), str(adapter_dir))
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            A, B = module.lora_A["default"].weight.detach(), module.lora_B["default"].weight.detach()
            scaling = module.scaling["default"]
            key = name.removeprefix("base_model.model.") + ".weight"
            out[key] = [scaling * B[:, j : j + 1] @ A[j : j + 1] for j in range(A.shape[0])]
    return out


def test_the_components_are_peft_s_rank_one_terms_and_sum_to_its_delta(random_pool):
    spec = pool_spec(random_pool, kinds=("lora", "saved"))
    pool = open_pool(spec)
    split = split_rank_components(pool)
    adapters = [*random_pool["adapters"], random_pool["saved_adapter"]]
    for whole, adapter in zip(pool.candidates, adapters):
        parts = [c for c in split.candidates if parent_name(c.name) == whole.name]
        reference = peft_components(random_pool["base"], adapter)
        ranks = {len(terms) for terms in reference.values()}
        assert len([p for p in parts if p.factors]) == max(ranks)
        for tensor, terms in reference.items():
            for j, term in enumerate(terms):
                factors = parts[j].factors[tensor]
                assert isinstance(factors, RankComponent) and factors.rank == 1
                torch.testing.assert_close(factors.delta(torch.float64), term, rtol=1e-5, atol=1e-8)
            total = sum(parts[j].factors[tensor].delta(torch.float64) for j in range(len(terms)))
            torch.testing.assert_close(total, peft_deltas(random_pool["base"], adapter)[tensor], rtol=1e-5, atol=1e-8)
        # modules_to_save stays whole, as one candidate of its own
        saved = [p for p in parts if p.full]
        assert [p.name for p in saved] == ([f"{whole.name}#full"] if whole.full else [])
        assert all(not p.full for p in parts if p.factors)
    # dense candidates are left whole, and the order is the pool's
    assert [parent_name(c.name) for c in split.candidates] == sorted(
        (parent_name(c.name) for c in split.candidates), key=[c.name for c in pool.candidates].index
    )


def test_a_component_reads_only_its_own_row_and_column_from_the_file(random_pool, monkeypatch):
    from mergekit_fw.pool.candidates import LoraFactors

    pool = open_pool(pool_spec(random_pool, kinds=("lora",)))
    whole = pool.candidates[0]
    tensor = next(iter(whole.factors))
    part = split_rank_components(pool).candidates[1].factors[tensor]
    assert not part.loaded

    def whole_pair(self):
        raise AssertionError("a component read its adapter's whole factor pair")

    monkeypatch.setattr(LoraFactors, "_load", whole_pair)
    A, B = part.A, part.B
    monkeypatch.undo()
    assert A.shape == (1, whole.factors[tensor].shape[1]) and B.shape == (whole.factors[tensor].shape[0], 1)
    assert A.untyped_storage().nbytes() == A.numel() * A.element_size()  # a copy, not a view of the whole pair
    torch.testing.assert_close(A, whole.factors[tensor].A[1:2])
    part.release()
    assert not part.loaded


def test_oracle_scores_each_component_as_a_dense_brute_force_does(random_pool):
    """Loss and ``d loss / d c[i j, l] = <grad_l, s b_j a_j^T>`` at a random point where
    every component has its own coefficient, against the merge built densely from
    PEFT's factors; dense candidates beside them keep their own rows."""
    spec = pool_spec(random_pool, kinds=("lora", "dense"))
    _, pool, calibration = make_oracle(random_pool, spec)
    split = split_rank_components(pool)
    model = AutoModelForCausalLM.from_pretrained(str(random_pool["base"]), dtype=torch.float64)
    oracle = Oracle(model, split, calibration)
    torch.manual_seed(3)
    coefficients = torch.rand(len(split.candidates), len(oracle.tensors), dtype=torch.float64)
    evaluation = oracle.evaluate(coefficients, per_task=True)

    # the brute force: a pool of the components as separate dense deltas
    components = {
        f"lora{i}#r{j}": {t: terms[j] for t, terms in peft_components(random_pool["base"], a).items() if j < len(terms)}
        for i, a in enumerate(random_pool["adapters"])
        for j in range(4)
    }
    base = AutoModelForCausalLM.from_pretrained(str(random_pool["base"]), dtype=torch.float64).state_dict()
    deltas = [components.get(c.name) for c in split.candidates]
    for k, candidate in enumerate(split.candidates):
        if deltas[k] is None:  # a full checkpoint: its whole delta
            folder = candidate.folder  # type: ignore[union-attr]
            state = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float64).state_dict()
            deltas[k] = {name: state[name] - base[name] for name in base}
    loss, scores, _ = brute_force(random_pool, spec, oracle.tensors, coefficients, calibration, deltas=deltas)
    assert abs(evaluation.loss - loss) < 1e-9 * max(1.0, abs(loss))
    assert float(scores.abs().max()) > 1e-6
    torch.testing.assert_close(evaluation.scores, scores, rtol=1e-4, atol=1e-10)
    # the whole adapter's score is the sum of its components' where they share a coefficient
    whole, _, _ = make_oracle(random_pool, spec)
    c_whole = torch.rand(len(pool.candidates), len(oracle.tensors), dtype=torch.float64)
    rows = [[k for k, c in enumerate(split.candidates) if parent_name(c.name) == w.name] for w in pool.candidates]
    c_split = torch.zeros_like(coefficients)
    for i, index in enumerate(rows):
        c_split[index] = c_whole[i]
    summed = oracle.evaluate(c_split).scores
    reference = whole.evaluate(c_whole)
    torch.testing.assert_close(torch.stack([summed[index].sum(0) for index in rows]), reference.scores, rtol=1e-9, atol=1e-12)
    assert abs(oracle.loss(c_split) - reference.loss) < 1e-9


@pytest.mark.parametrize("name", ["a+b", "a+b#r", "a+b#rx", "org/m#r2x"])
def test_parent_name_leaves_other_names_alone(name):
    assert parent_name(name) == name
    assert parent_name(f"{name}#r12") == name and parent_name(f"{name}#full") == name


@pytest.mark.slow
def test_a_rank_component_merge_is_the_tables_sum_in_every_output(random_pool, tmp_path, monkeypatch):
    """``mergekit-fw run`` (model and adapter) and ``mergekit-yaml`` write the merge at the
    table's per-component coefficients; there is no stock replay, and every place that
    would offer one says why."""
    import json

    from click.testing import CliRunner

    from mergekit_fw.cli import main
    from tests.paths import lora_config, mergekit_yaml, tensors

    monkeypatch.setenv("MERGEKIT_FW_CACHE", str(tmp_path / "cache"))
    adapters = [*random_pool["adapters"], random_pool["saved_adapter"]]
    config = lora_config(tmp_path / "fw.yml", random_pool["base"], adapters, random_pool["calibration"],
                         iterations=3, granularity="rank_component", constraint="box")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", str(config), str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    table = json.loads((out / "fw_table.json").read_text())
    assert table["meta"]["granularity"] == "rank_component"
    names = [f"{random_pool['base']}+{a}" for a in adapters]
    assert table["candidates"] == [f"{n}#r{j}" for n, r in zip(names, (4, 2, 3, 2)) for j in range(r)] + [f"{names[3]}#full"]

    # the model: base + sum over components of coefficient x PEFT's rank-1 term
    terms = [peft_components(random_pool["base"], a) for a in adapters]
    saved = peft_deltas(random_pool["base"], random_pool["saved_adapter"])
    written, base = tensors(out), tensors(random_pool["base"])
    spread = set()
    for name, value in base.items():
        expected = value.to(torch.float64).clone()
        column = table["coefficients"].get(name)
        for k, candidate in enumerate(table["candidates"]):
            head, _, part = candidate.rpartition("#")
            delta = saved.get(name) if part == "full" else None
            if part != "full":
                pieces = terms[names.index(head)].get(name, [])
                delta = pieces[int(part[1:])] if int(part[1:]) < len(pieces) else None
            if delta is not None and column is not None:
                expected += column[k] * delta
                spread.add(round(column[k], 6))
        torch.testing.assert_close(written[name].to(torch.float64), expected, rtol=1e-5, atol=1e-6)
    assert len(spread) > 2  # the components took different coefficients: the check is not vacuous

    # no replay config, and the card says why; export refuses with the reason
    assert not (out / "fw_mergekit.yml").exists()
    assert "No replay config" in (out / "README.md").read_text()
    refused = CliRunner().invoke(main, ["export", str(out / "fw_table.json")])
    assert refused.exit_code != 0 and "rank_component" in refused.output and "Traceback" not in refused.output

    # the same table as a PEFT adapter: PEFT's merge is the model
    from peft import PeftModel

    adapter = tmp_path / "adapter"
    result = CliRunner().invoke(main, ["run", str(config), str(adapter), "--quiet", "--output-format", "adapter"])
    assert result.exit_code == 0, result.output
    peft_merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(random_pool["base"])), str(adapter))
    merged = peft_merged.merge_and_unload().state_dict()
    for name, value in written.items():
        torch.testing.assert_close(merged[name], value, rtol=1e-5, atol=1e-6)

    # and mergekit-yaml: the same bytes
    mergekit_yaml(config, tmp_path / "yaml", None, MERGEKIT_FW_CACHE=str(tmp_path / "cache"))
    from_yaml = tensors(tmp_path / "yaml")
    assert set(from_yaml) == set(written) and all(torch.equal(from_yaml[n], written[n]) for n in written)
    assert not (tmp_path / "yaml" / "fw_mergekit.yml").exists()


def test_a_fan_in_fan_out_adapter_splits_into_its_transposed_terms(tmp_path):
    """GPT-2's Conv1D stores (in x out) and its adapters' factors are those of the
    transpose: each component, sliced in the file, is the whole pair's j-th term."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    from mergekit_fw.pool.references import CandidateSpec, ModelSource, PoolSpec
    from testbed.build import SIX, build_tokenizer

    base = tmp_path / "base"
    tokenizer = build_tokenizer(base, list(SIX))
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=1, n_head=2, n_positions=32)).save_pretrained(
        str(base))
    model = get_peft_model(GPT2LMHeadModel.from_pretrained(str(base)),
                           LoraConfig(r=3, lora_alpha=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                                      init_lora_weights=False))
    model.save_pretrained(str(tmp_path / "lora"))
    pool = open_pool(PoolSpec(ModelSource(str(base)), (CandidateSpec("lora", ModelSource(str(base)),
                                                                      ModelSource(str(tmp_path / "lora"))),)))
    whole = pool.candidates[0]
    parts = split_rank_components(pool).candidates
    assert len(parts) == 3
    for tensor, factors in whole.factors.items():
        assert factors.transpose
        for j, part in enumerate(parts):
            term = factors.scale * factors.B[:, j : j + 1].double() @ factors.A[j : j + 1].double()
            torch.testing.assert_close(part.factors[tensor].delta(torch.float64), term)
        total = sum(part.factors[tensor].delta(torch.float64) for part in parts)
        torch.testing.assert_close(total, factors.delta(torch.float64))
