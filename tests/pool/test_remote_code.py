"""Members that ask to run their repository's code are refused unless the user passed
``--trust-remote-code``, and the hub download leaves code out unless it is trusted."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from mergekit_fw.cli import main
from mergekit_fw.pool import references
from mergekit_fw.pool.references import ModelSource
from mergekit_fw.pool.remote_code import download_patterns
from tests.conftest import subprocess_env
from tests.paths import write_config


def test_code_is_downloaded_only_when_trusted():
    assert "*.py" not in download_patterns(False) and "*.py" in download_patterns(True)
    for needed in ("*.safetensors", "*.json", "*.model", "*.txt", "*.tiktoken", "*.jinja"):
        assert needed in download_patterns(False)
    # the chat template transformers 5 saves beside the tokenizer, read for chat calibration rows
    from fnmatch import fnmatch

    assert any(fnmatch("chat_template.jinja", pattern) for pattern in download_patterns(False))


@pytest.mark.parametrize("trusted", [False, True])
def test_a_hub_id_asks_the_hub_for_those_files_alone(trusted, monkeypatch, tmp_path):
    """The real resolver with the hub call recorded (no network here)."""
    import huggingface_hub

    asked = {}

    def record(repo_id, **kwargs):
        asked.update(kwargs, repo_id=repo_id)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", record)
    folder = references.local_dir(ModelSource("org/model", "v1"), "base_model", patterns=download_patterns(trusted))
    assert folder == tmp_path
    assert asked == {"repo_id": "org/model", "revision": "v1", "allow_patterns": download_patterns(trusted)}


def _edit(path: Path, **changes) -> None:
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.update(changes)
    path.write_text(json.dumps(data))


def _config(pool, work: Path, base: Path | None = None, adapter: Path | None = None) -> Path:
    base = base or pool["base"]
    models = [{"model": f"{base}+{adapter or pool['adapters'][0]}"}, {"model": f"{base}+{pool['adapters'][1]}"}]
    return write_config(work / "fw.yml", {
        "merge_method": "frank_wolfe", "base_model": str(base), "models": models, "dtype": "float32",
        "parameters": {"calibration": str(pool["calibration"]), "iterations": 1},
    })


def _custom_adapter(pool, work: Path) -> Path:
    adapter = shutil.copytree(pool["adapters"][0], work / "custom_lora")
    _edit(adapter / "adapter_config.json",
          auto_mapping={"base_model_class": "MyModel", "parent_library": "transformers_modules.org.modeling_my"})
    return adapter


ROWS = {
    "config.json auto_map": ("config.json", {"auto_map": {"AutoModelForCausalLM": "modeling_my.MyModel"}}),
    "tokenizer_config.json auto_map": ("tokenizer_config.json", {"auto_map": {"AutoTokenizer": ["tok.MyTok", None]}}),
}


@pytest.mark.parametrize("row", list(ROWS))
def test_a_base_that_asks_for_its_code_is_refused(row, random_pool, tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEKIT_FW_CACHE", str(tmp_path / "cache"))
    name, changes = ROWS[row]
    base = shutil.copytree(random_pool["base"], tmp_path / "base")
    _edit(base / name, **changes)
    result = CliRunner().invoke(main, ["run", str(_config(random_pool, tmp_path, base=base)), str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert f"base_model {base / name}: asks to run code" in result.output
    assert f"{next(iter(changes))} = " in result.output and "--trust-remote-code" in result.output


def test_an_adapter_that_asks_for_its_code_is_refused_unless_trusted(random_pool, tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEKIT_FW_CACHE", str(tmp_path / "cache"))
    adapter = _custom_adapter(random_pool, tmp_path)
    config = _config(random_pool, tmp_path, adapter=adapter)
    refused = CliRunner().invoke(main, ["run", str(config), str(tmp_path / "out"), "--quiet"])
    assert refused.exit_code == 2 and f"{adapter / 'adapter_config.json'}: asks to run code" in refused.output
    assert "auto_mapping = " in refused.output and "transformers_modules.org.modeling_my" in refused.output
    trusted = CliRunner().invoke(main, ["run", str(config), str(tmp_path / "out"), "--quiet", "--trust-remote-code"])
    assert trusted.exit_code == 0, trusted.output
    assert (tmp_path / "out" / "fw_table.json").is_file()


@pytest.mark.slow
def test_mergekit_yaml_passes_its_own_trust_remote_code(random_pool, tmp_path):
    config = _config(random_pool, tmp_path, adapter=_custom_adapter(random_pool, tmp_path))
    env = subprocess_env(MERGEKIT_FW_CACHE=str(tmp_path / "cache"))
    refused = subprocess.run(["mergekit-yaml", str(config), str(tmp_path / "no"), "--quiet"],
                             env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "asks to run code" in refused.stderr and "--trust-remote-code" in refused.stderr
    trusted = subprocess.run(["mergekit-yaml", str(config), str(tmp_path / "yes"), "--quiet", "--trust-remote-code"],
                             env=env, capture_output=True, text=True, timeout=300)
    assert trusted.returncode == 0, trusted.stderr[-3000:]
    assert (tmp_path / "yes" / "fw_table.json").is_file()
