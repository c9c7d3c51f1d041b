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
