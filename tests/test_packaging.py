"""The wheel is what a user installs: the package's folders, the start-up hook's
``.pth`` and ``.start`` files at the root of site-packages, and nothing of the
repository's own tools (``testbed/``, ``evals/``, ``tests/``)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import subprocess_env

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    from hatchling.builders.wheel import WheelBuilder

    out = tmp_path_factory.mktemp("wheel")
    return Path(next(iter(WheelBuilder(str(ROOT)).build(directory=str(out), versions=["standard"]))))


def test_wheel_holds_the_package_and_the_hook_files_only(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert {"mergekit_fw", "mergekit_fw_autoload.pth", "mergekit_fw.start"} <= tops
    assert not tops & {"testbed", "evals", "tests", "examples", "startup", "src"}
    packages = {str(p.parent.relative_to(ROOT)) for p in (ROOT / "mergekit_fw").rglob("__init__.py")}
    assert packages <= {n.rsplit("/", 1)[0] for n in names if n.endswith("/__init__.py")}


def test_the_hook_files_point_at_a_module_in_the_wheel(wheel, tmp_path):
    zipfile.ZipFile(wheel).extractall(tmp_path)
    pth = (tmp_path / "mergekit_fw_autoload.pth").read_text().strip()
    start = (tmp_path / "mergekit_fw.start").read_text().strip()
    module, function = start.split(":")
    assert pth == f"import {module} as _m; _m.{function}()"
    code = (
        f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import importlib; "
        f"m = importlib.import_module({module!r}); print(m.__file__); print(callable(getattr(m, {function!r})))"
    )
    done = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, env=subprocess_env(),
                          check=True)
    where, is_callable = done.stdout.split()
    assert Path(where).is_relative_to(tmp_path) and is_callable == "True"


def test_ci_runs_exactly_the_readmes_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Set-up: the two commands") : readme.index("## Use")]
    commands = [block.split("```")[0].strip() for block in section.split("```bash\n")[1:]]
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()[-1]
    assert len(commands) == 2 and ci == commands[1]
