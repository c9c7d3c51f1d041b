"""The shipped configs are valid mergekit configs with valid frank_wolfe parameters."""

from pathlib import Path

import yaml

from mergekit_fw.integration.configs import pool_and_parameters

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_llama2_community_pool_config_validates_without_downloading():
    from mergekit.config import MergeConfiguration

    path = EXAMPLES / "llama2-7b-community-loras" / "fw.yml"
    config = MergeConfiguration.model_validate(yaml.safe_load(path.read_text()))
    spec, params = pool_and_parameters(config, source=str(path))
    assert spec.base.path == "meta-llama/Llama-2-7b-hf"
    assert len(spec.candidates) == 16 and all(c.lora is not None for c in spec.candidates)
    assert params.variant == "hard" and params.lmo == "layer" and params.samples_per_task == 100
    # as it stands, the oracle follows the config's dtype: a 7B in bfloat16 (~14 GB), not float32 (27 GB)
    assert params.oracle_dtype_for(spec.dtype) == "bfloat16"


def test_tiny_example_configs_validate(testbed):
    from mergekit.config import MergeConfiguration

    for name in ("fw.yml", "ta.yml"):
        MergeConfiguration.model_validate(yaml.safe_load((testbed.root / name).read_text()))


def test_llama2_calibration_line_writes_the_rows_its_python_script_wrote(tmp_path):
    """``build_calib.sh`` on local stand-ins of its three datasets (same columns): the
    rows of each split's seed-0 shuffle, in the text the replaced Python script made."""
    import json
    import subprocess

    import datasets

    from tests.conftest import subprocess_env

    def saved(name: str, rows: list[dict]) -> str:
        datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / name))
        return str(tmp_path / name)

    cnn = [{"article": f"article {i}", "highlights": f"summary {i}", "id": str(i)} for i in range(7)]
    code = [{"instruction": f"do {i}", "input": "x = 1" if i % 2 else "", "output": f"print({i})"} for i in range(7)]
    pubmed = [{"question": f"q {i}?", "context": {"contexts": [f"c{i}a", f"c{i}b"], "labels": ["A", "B"]},
               "final_decision": "yes" if i % 2 else "no"} for i in range(7)]
    sources = {"CNN_DAILYMAIL": saved("cnn", cnn), "CODE_ALPACA": saved("code", code), "PUBMEDQA": saved("pubmed", pubmed)}
    out = tmp_path / "calib.jsonl"
    done = subprocess.run(["bash", str(EXAMPLES / "llama2-7b-community-loras" / "build_calib.sh")],
                          env=subprocess_env(OUT=str(out), PER_TASK="3", **sources), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    written = [json.loads(line) for line in out.read_text().splitlines()]

    def first(rows: list[dict]) -> list[dict]:  # what the script read: shuffle(seed=0).select(range(3))
        return list(datasets.Dataset.from_list(rows).shuffle(seed=0).select(range(3)))

    expected = [("cnn_dailymail", f"Summarize the following article.\n\n{r['article']}\n\nSummary:", " " + r["highlights"])
                for r in first(cnn)]
    expected += [("code_alpaca", f"Instruction:\n{r['instruction']}{f'{chr(10) * 2}Input:{chr(10)}' + r['input'] if r['input'] else ''}"
                  f"\n\nResponse:\n", r["output"]) for r in first(code)]
    expected += [("pubmedqa", f"Context: {' '.join(r['context']['contexts'])}\nQuestion: {r['question']}\n"
                  "Answer (yes, no or maybe):", " " + r["final_decision"]) for r in first(pubmed)]
    assert [(r["task"], r["prompt"], r["completion"]) for r in written] == expected
