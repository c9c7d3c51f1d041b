"""The start-up hook registers frank_wolfe, can be switched off, and is cheap."""

import subprocess
import sys

from tests.conftest import subprocess_env

PROBE = "import mergekit.merge_methods as m; print('frank_wolfe' in [x.spec.name for x in m.registered_methods()])"


def _probe(**env) -> str:
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=subprocess_env(**env), check=True)
    return done.stdout.strip()


def test_hook_registers_the_method():
    assert _probe() == "True"


def test_env_switch_turns_the_hook_off():
    assert _probe(MERGEKIT_FW_AUTOLOAD="0") == "False"


def test_hook_wraps_run_merge_imported_by_mergekit_yaml():
    code = "from mergekit.scripts.run_yaml import run_merge; print(getattr(run_merge, '_mergekit_fw', False))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(), check=True)
    assert done.stdout.strip() == "True"


def test_hook_does_not_import_heavy_modules_at_startup():
    code = "import sys; print(any(m in sys.modules for m in ('torch', 'mergekit', 'importlib.abc')))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(), check=True)
    assert done.stdout.strip() == "False"
    assert "mergekit_fw.integration.autoload" in subprocess.run(
        [sys.executable, "-c", "import sys; print(list(sys.modules))"], capture_output=True, text=True,
        env=subprocess_env(), check=True).stdout


def test_register_is_idempotent():
    from mergekit import merge_methods

    from mergekit_fw.integration.method import register_method

    register_method()
    register_method()
    assert [m.spec.name for m in merge_methods.registered_methods()].count("frank_wolfe") == 1
