"""The spine on the trained tiny pool: mergekit-yaml, mergekit-fw and the replay
config agree, and Frank-Wolfe beats task arithmetic through lm-eval."""

import json

import pytest
import torch
import yaml

from testbed.build import greedy_scores as exact_match
from testbed.data import read_rows as read_jsonl
from tests.paths import (
    assert_same_tensors,
    mergekit_fw_here,
    mergekit_fw_run,
    mergekit_yaml,
    replay,
    tensors,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def merges(testbed, tmp_path_factory):
    work = tmp_path_factory.mktemp("merges")
    mergekit_fw_run(testbed.root / "fw.yml", work / "fast")
    mergekit_fw_here(testbed.root / "fw.yml", work / "adapter", "--output-format", "adapter")  # the solve reused
    mergekit_yaml(testbed.root / "fw.yml", work / "yaml")
    replay(work / "yaml", work / "replay", work / "cache")
    mergekit_yaml(testbed.root / "ta.yml", work / "ta", work / "cache")
    return work


def test_three_paths_write_the_same_tensors(merges):
    fast, yaml_out, replayed = (tensors(merges / name) for name in ("fast", "yaml", "replay"))
    assert_same_tensors(fast, yaml_out, replayed)
    ta = tensors(merges / "ta")
    assert any(not torch.equal(ta[n], fast[n]) for n in fast)  # the comparison can fail


def test_outputs_carry_table_trace_and_replay(merges, testbed):
    for name in ("fast", "yaml"):
        folder = merges / name
        table = json.loads((folder / "fw_table.json").read_text())
        trace = json.loads((folder / "fw_trace.json").read_text())
        replay = yaml.safe_load((folder / "fw_mergekit.yml").read_text())
        assert table["format"] == "mergekit-fw/coefficient-table" and table["fingerprint"]
        assert trace["final_loss"] < trace["initial_loss"]
        assert all(it["gap"] >= 0 for it in trace["iterations"])
        assert replay["merge_method"] == "task_arithmetic"
        assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
    assert not list(merges.glob(".*partial*"))


def test_the_solve_ran_once_and_was_reused(merges):
    assert json.loads((merges / "fast" / "fw_trace.json").read_text())["reused_cached_solve"] is False
    assert json.loads((merges / "yaml" / "fw_trace.json").read_text())["reused_cached_solve"] is True


def test_table_picks_the_relevant_adapters(merges, testbed):
    table = json.loads((merges / "fast" / "fw_table.json").read_text())
    relevant = {testbed.reference(t) for t in testbed.asked}
    names = table["candidates"]
    wins = 0
    for tensor, coefficients in table["coefficients"].items():
        best = names[max(range(len(names)), key=lambda i: coefficients[i])]
        wins += best in relevant
    assert wins / len(table["coefficients"]) > 0.6, wins


def test_frank_wolfe_beats_task_arithmetic_under_lm_eval(merges, testbed):
    from mergekit_fw.evaluation import lm_eval_scores

    tasks = [testbed.lm_eval_task(t) for t in testbed.asked]
    fw = lm_eval_scores(merges / "fast", tasks, testbed.lm_eval_dir)
    ta = lm_eval_scores(merges / "ta", tasks, testbed.lm_eval_dir)
    assert sum(fw.values()) > sum(ta.values()) + 0.2, (fw, ta)
    # the same merge as a PEFT adapter on the base, as lm-eval users load one (peft=)
    adapter = lm_eval_scores(testbed.base, tasks, testbed.lm_eval_dir, peft=merges / "adapter")
    assert adapter == fw, (adapter, fw)


def test_pool_behaves_like_real_loras(testbed):
    """The relevant LoRAs merged alone (0.5 each) keep most of each one's gain."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from mergekit_fw.pool.pool import open_pool
    from mergekit_fw.pool.references import CandidateSpec, ModelSource, PoolSpec

    tokenizer = AutoTokenizer.from_pretrained(str(testbed.base))
    spec = PoolSpec(ModelSource(str(testbed.base)), tuple(
        CandidateSpec(t, ModelSource(str(testbed.base)), ModelSource(str(testbed.adapters[t]))) for t in testbed.asked))
    pool = open_pool(spec)

    def score(weights):
        model = LlamaForCausalLM.from_pretrained(str(testbed.base), dtype=torch.float32)
        state = model.state_dict()
        with torch.no_grad():
            for candidate in pool.candidates:
                for tensor, factors in candidate.factors.items():
                    state[tensor].add_(factors.delta(), alpha=weights.get(candidate.name, 0.0))
        return {t: exact_match(model, tokenizer, read_jsonl(testbed.eval_files[t])) for t in testbed.asked}

    base = score({})
    pair = score({t: 0.5 for t in testbed.asked})
    for task in testbed.asked:
        alone = score({task: 1.0})[task]
        assert alone - base[task] > 0.4, (task, alone, base[task])
        assert pair[task] - base[task] >= 0.6 * (alone - base[task]), (task, pair, alone, base)
