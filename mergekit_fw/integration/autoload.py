"""Start-up hook that registers ``frank_wolfe`` with mergekit.

mergekit has no plugin mechanism, so the package ships ``mergekit_fw_autoload.pth``
(and a ``.start`` entry point) that calls :func:`install` in every Python process.
That must cost next to nothing and must never break a process that does not use
mergekit, so this module imports only ``os`` and ``sys`` (``importlib.abc`` alone
costs ~27 ms) and defers all real work until mergekit's own modules are imported:

* after ``mergekit.merge_methods`` executes, the method is registered;
* after ``mergekit.merge`` executes, ``run_merge`` is wrapped so a Frank-Wolfe
  solve runs once, before planning, and its artefacts land in the output folder.

``MERGEKIT_FW_AUTOLOAD=0`` switches the hook off entirely.
"""

import os
import sys

ENV_SWITCH = "MERGEKIT_FW_AUTOLOAD"
_WATCHED = ("mergekit.merge_methods", "mergekit.merge")


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def _after_import(fullname: str, module) -> None:
    try:
        if fullname == "mergekit.merge_methods":
            from mergekit_fw.integration.method import register_method

            register_method()
        elif fullname == "mergekit.merge":
            from mergekit_fw.integration.mergekit_yaml import wrap_run_merge

            wrap_run_merge(module)
    except Exception as error:  # never break mergekit for anyone
        sys.stderr.write(f"mergekit-fw: start-up hook failed for {fullname}: {error!r}\n")


class _Loader:
    """Delegates to the real loader, then runs our post-import action."""

    def __init__(self, inner, fullname: str):
        self._inner = inner
        self._fullname = fullname

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self._inner.exec_module(module)
        _after_import(self._fullname, module)

    def __getattr__(self, name):
        return getattr(self._inner, name)


class _Finder:
    """A duck-typed meta-path finder (no importlib.abc import, see module doc)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _WATCHED:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader, fullname)  # type: ignore[assignment]  # duck-typed Loader
                return spec
        return None


_FINDER = _Finder()


def install() -> None:
    """Arm the hook (idempotent); act at once for modules already imported."""
    if not enabled():
        return
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _FINDER)
    for name in _WATCHED:
        module = sys.modules.get(name)
        if module is not None:
            _after_import(name, module)
