"""Bad configs fail before any maths, with a message naming the field."""

import pickle
import subprocess

import pytest
import yaml

from mergekit_fw.config import ConfigError, ParameterError, naming_config, parse_parameters
from tests.conftest import subprocess_env


def test_unknown_parameter_is_named():
    with pytest.raises(ConfigError, match=r"parameters\.step_size: unknown parameter"):
        parse_parameters({"calibration": "c.jsonl", "step_size": 0.1})


def test_iterations_below_one_is_named():
    with pytest.raises(ConfigError, match=r"parameters\.iterations"):
        parse_parameters({"calibration": "c.jsonl", "iterations": 0})


def test_missing_calibration_field_is_named():
    with pytest.raises(ConfigError, match=r"parameters\.calibration"):
        parse_parameters({"iterations": 3})


def test_filter_lists_are_rejected_with_the_field_name():
    with pytest.raises(ConfigError, match=r"parameters\.iterations: frank_wolfe takes a single scalar"):
        parse_parameters({"calibration": "c.jsonl", "iterations": [{"filter": "x", "value": 2}]})


def _config(random_pool, **parameters):
    return {
        "merge_method": "frank_wolfe",
        "base_model": str(random_pool["base"]),
        "models": [{"model": f"{random_pool['base']}+{random_pool['adapters'][0]}"}],
        "parameters": {"calibration": str(random_pool["calibration"]), **parameters},
        "dtype": "float32",
    }


@pytest.mark.parametrize(
    "parameters, message",
    [
        ({"iterations": 0}, "parameters.iterations"),
        ({"bogus": 1}, "parameters.bogus: unknown parameter"),
        ({"calibration": "missing.jsonl"}, "parameters.calibration: file not found"),
    ],
)
@pytest.mark.parametrize("command", ["mergekit-fw", "mergekit-yaml"])
def test_commands_fail_early_naming_the_field(random_pool, tmp_path, parameters, message, command):
    config = tmp_path / "fw.yml"
    config.write_text(yaml.safe_dump(_config(random_pool, **parameters)))
    out = tmp_path / "out"
    if command == "mergekit-fw":  # in-process: the command's own code, without a Python start-up (CI time)
        from click.testing import CliRunner

        from mergekit_fw.cli import main

        result = CliRunner().invoke(main, ["run", str(config), str(out)])
        assert result.exit_code == 2 and f"{config}: {message}" in result.output, result.output
    else:
        argv = ["mergekit-yaml", str(config), str(out), "--lora-merge-cache", str(tmp_path / "cache")]
        done = subprocess.run(argv, capture_output=True, text=True, env=subprocess_env(), timeout=300)
        assert done.returncode != 0
        assert f"mergekit-fw: error: {config}: {message}" in done.stderr, done.stderr
    assert not out.exists()  # nothing written
    assert not (tmp_path / "cache").exists()  # failed before mergekit expanded any LoRA


def test_a_parameter_error_found_in_the_solve_is_given_the_config_file_name():
    error = ParameterError("init", "file not found: 'table.json'")
    assert isinstance(error, ConfigError) and error.field == "init"
    assert str(naming_config(error, "fw.yml")) == "fw.yml: parameters.init: file not found: 'table.json'"
    # one that already names its file (an init merge's own config) is left as it is
    own = ConfigError("init.yml: init: base_model is 'a', but the pool's base is 'b'")
    assert naming_config(own, "fw.yml") is own
    # like any exception, it survives pickle (a caller's process pool) with both parts
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is ParameterError and (again.field, str(again)) == ("init", str(error))


@pytest.mark.parametrize(
    "raw, field",
    [
        ({"variant": "medium"}, "variant"),
        ({"lmo": "global"}, "lmo"),
        ({"lmo_score": "dot"}, "lmo_score"),
        ({"step": "armijo"}, "step"),
        ({"step": "fixed", "gamma": 0.0}, "gamma"),
        ({"step": "fixed", "gamma": 3.0}, "gamma"),
        ({"variant": "soft", "top_k": 0}, "top_k"),
        ({"variant": "soft", "top_k_per": "model"}, "top_k_per"),
        ({"variant": "soft", "inner_weights": "block"}, "inner_weights"),
        ({"variant": "soft", "inner_steps": 0}, "inner_steps"),
        ({"variant": "soft", "inner_lr": 0.0}, "inner_lr"),
        ({"init": "previous.txt"}, "init"),
        ({"merge_fn": "dare"}, "merge_fn"),
        ({"merge_fn": "ties", "density": 0.0}, "density"),
        ({"merge_fn": "ties", "density": 1.5}, "density"),
        ({"objective": "mse"}, "objective"),
        ({"constraint": "ball"}, "constraint"),
        ({"constraint": "scaled_hull", "radius": 0.0}, "radius"),
        ({"epsilon_relative": 1.0}, "epsilon_relative"),
        ({"epsilon_relative": -0.1}, "epsilon_relative"),
        ({"radius": 3.0}, "radius"),
        ({"step": "schedule", "line_search_steps": 4}, "line_search_steps"),
        ({"constraint": "scaled_hull", "radius": 0.5, "init": "ta.yml"}, "init"),
        # settings the chosen variant would silently ignore
        ({"top_k": 3}, "top_k"),
        ({"variant": "soft", "step": "schedule"}, "step"),
        ({"gamma": 0.1}, "gamma"),
        ({"density": 0.5}, "density"),
        ({"inner_lr": 0.1}, "inner_lr"),
        ({"entropy_positions": "prompt"}, "entropy_positions"),
        ({"answer_tokens": 3}, "answer_tokens"),
        ({"objective": "entropy", "answer_tokens": 0}, "answer_tokens"),
        ({"objective": "entropy", "entropy_positions": "prompt", "answer_tokens": 2}, "answer_tokens"),
        ({"solver": "adam"}, "solver"),
        ({"solver": "projected_gradient", "gradient_steps": 0}, "gradient_steps"),
        ({"solver": "projected_gradient", "learning_rate": 0.0}, "learning_rate"),
        # one solver's settings given to the other
        ({"solver": "frank_wolfe", "gradient_steps": 100}, "gradient_steps"),
        ({"solver": "frank_wolfe", "learning_rate": 0.1}, "learning_rate"),
        # solver auto takes either's settings, not both's (it could not say which to run)
        ({"iterations": 10, "gradient_steps": 100}, "solver"),
        ({"solver": "projected_gradient", "iterations": 30}, "iterations"),
        ({"solver": "projected_gradient", "step": "quadratic"}, "step"),
        ({"solver": "projected_gradient", "variant": "soft"}, "variant"),
        ({"solver": "projected_gradient", "lmo_score": "cosine"}, "lmo_score"),
        ({"solver": "stochastic_frank_wolfe", "learning_rate": 0.1}, "learning_rate"),
        ({"solver": "stochastic_frank_wolfe", "step": "quadratic"}, "step"),
        ({"variant": "soft", "weight_penalty": 0.3}, "weight_penalty"),
        ({"solver": "projected_gradient", "weight_penalty": -0.1}, "weight_penalty"),
        ({"granularity": "rank"}, "granularity"),
        ({"granularity": "rank_component", "merge_fn": "ties"}, "granularity"),
    ],
)
def test_every_parameter_rejects_bad_values_by_name(raw, field):
    with pytest.raises(ConfigError, match=rf"parameters\.{field}\b"):
        parse_parameters({"calibration": "c.jsonl", **raw})


def test_kernel_kwargs_with_mergekit_defaults_are_not_taken_as_given():
    from mergekit_fw.config import FrankWolfeParameters, from_method_kwargs

    defaults = {name: field.default for name, field in FrankWolfeParameters.model_fields.items() if not field.is_required()}
    params = from_method_kwargs({**defaults, "calibration": "c.jsonl", "variant": "soft", "top_k": 3})
    assert params.variant == "soft" and params.top_k == 3 and params.step == defaults["step"]
    # the direction's default depends on the variant, and resolves the same here as in a config
    assert params.direction == "frank_wolfe" == parse_parameters({"calibration": "c.jsonl", "variant": "soft"}).direction


@pytest.mark.parametrize(
    ("given", "direction"),
    [
        ({}, "projected_pairwise"),
        ({"step": "line_search"}, "projected_pairwise"),
        ({"step": "adaptive"}, "projected_pairwise"),
        ({"step": "schedule"}, "frank_wolfe"),
        ({"step": "fixed", "gamma": 0.1}, "frank_wolfe"),
        ({"variant": "soft"}, "frank_wolfe"),
        ({"direction": "away"}, "away"),
    ],
)
def test_the_default_direction_is_projected_pairwise_where_a_step_is_searched(given, direction):
    """Issue 17's defaults (box, projected pairwise, adaptive step, <= 30 iterations,
    relative gap 0.01) must not invalidate a config that sets only a step rule or the
    soft variant."""
    params = parse_parameters({"calibration": "c.jsonl", **given})
    assert params.direction == direction
    assert (params.constraint, params.iterations, params.epsilon_relative) == ("box", 30, 0.01)
    if not given:
        assert params.step == "adaptive"


def test_a_solver_s_unread_settings_stay_out_of_its_fingerprint():
    """Projected gradient reads no Frank-Wolfe setting: changing one (or its default)
    must not move a cached projected-gradient solve, and must move a Frank-Wolfe one."""
    pg = parse_parameters({"calibration": "c.jsonl", "solver": "projected_gradient"})
    fw = parse_parameters({"calibration": "c.jsonl", "solver": "frank_wolfe"})
    assert not {"iterations", "step", "direction", "variant"} & set(pg.fingerprint_fields())
    assert {"iterations", "step", "direction"} <= set(fw.fingerprint_fields())
    assert not {"gradient_steps", "learning_rate"} & set(fw.fingerprint_fields())


def test_readme_parameter_table_matches_the_config():
    from pathlib import Path

    from mergekit_fw.config import FrankWolfeParameters

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for name, field in FrankWolfeParameters.model_fields.items():
        default = "required" if field.is_required() else ("none" if field.default is None else str(field.default))
        assert f"| `{name}` | {default} | {field.description} |" in readme, name


def test_settings_added_later_keep_earlier_fingerprints_at_their_old_behaviour():
    from mergekit_fw.config import FrankWolfeParameters

    # the paper's settings, which were the defaults before these settings existed
    paper = {"constraint": "hull", "epsilon_relative": 0.0, "direction": "frank_wolfe", "step": "line_search",
             "iterations": 10}
    plain = FrankWolfeParameters(calibration="c.jsonl", solver="frank_wolfe", **paper).fingerprint_fields()
    assert not {"constraint", "radius", "epsilon_relative", "direction", "solver"} & set(plain)
    # today's defaults are not those, so they cannot reuse a solve cached at the old ones
    defaults = FrankWolfeParameters(calibration="c.jsonl", solver="frank_wolfe").fingerprint_fields()
    assert defaults["constraint"] == "box" and defaults["direction"] == "projected_pairwise"
    assert defaults["epsilon_relative"] == 0.01 and defaults["iterations"] == 30
    box = FrankWolfeParameters(calibration="c.jsonl", solver="frank_wolfe", constraint="box").fingerprint_fields()
    assert box["constraint"] == "box" and "radius" not in box
    scaled = FrankWolfeParameters(
        calibration="c.jsonl", solver="frank_wolfe", constraint="scaled_hull", radius=3.0
    ).fingerprint_fields()
    assert scaled["radius"] == 3.0
    relative = FrankWolfeParameters(calibration="c.jsonl", solver="frank_wolfe", epsilon_relative=0.1)
    assert relative.fingerprint_fields()["epsilon_relative"] == 0.1
    assert not {"solver", "gradient_steps", "learning_rate"} & set(plain)
    projected = FrankWolfeParameters(calibration="c.jsonl", solver="projected_gradient", learning_rate=0.02)
    assert projected.fingerprint_fields()["solver"] == "projected_gradient"
    assert projected.fingerprint_fields()["learning_rate"] == 0.02
    # a stochastic solver's settings count at their defaults too (a later default must not reuse old
    # solves), and only the ones it reads
    stochastic = FrankWolfeParameters(calibration="c.jsonl", solver="stochastic_frank_wolfe").fingerprint_fields()
    assert stochastic["gradient_steps"] == 400 and "learning_rate" not in stochastic
    # the weight penalty came later: at 0 (what solves did before it) it leaves fingerprints alone
    assert "weight_penalty" not in stochastic
    penalised = FrankWolfeParameters(calibration="c.jsonl", solver="stochastic_frank_wolfe", weight_penalty=0.3)
    assert penalised.fingerprint_fields()["weight_penalty"] == 0.3
    # hard Frank-Wolfe reads it too
    assert "weight_penalty" not in plain
    penalised_fw = FrankWolfeParameters(calibration="c.jsonl", solver="frank_wolfe", weight_penalty=0.3)
    assert penalised_fw.fingerprint_fields()["weight_penalty"] == 0.3
    # solver auto has no fingerprint of its own: the solve's is the resolved solver's
    with pytest.raises(ValueError, match="solver auto"):
        FrankWolfeParameters(calibration="c.jsonl").fingerprint_fields()
