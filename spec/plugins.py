"""Plugins: Python modules a spec names under ``plugins``, imported before the spec is checked.

A plugin registers what a spec may then use (an op with
``keras_darts.compiler.register_op``, a search method, a cell kind). Naming a
plugin in a spec runs that module's code, as ``import`` would: only name
modules you trust. A module is looked up on the Python path, then in the
folder of the spec file that names it; every process that loads the spec
(the CLI, ``keras-darts estimate``'s measuring process, every worker)
imports it again, so user ops work wherever the spec goes.
"""

import contextlib
import importlib
import os
import re
import sys

from .errors import Problem, SpecError

MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


@contextlib.contextmanager
def _folders_on_path(folders):
    added = [f for f in folders if f not in sys.path]
    sys.path.extend(added)
    try:
        yield
    finally:
        for folder in added:
            sys.path.remove(folder)


def import_plugins(names, source, path="$.plugins", folders=()):
    """Import each module in ``names``; ``SpecError`` naming the entry of each one that fails.

    Modules are looked up on the Python path, then in ``folders`` and the
    folder of the file ``source``.
    """
    if not isinstance(names, (list, tuple)):
        return  # the schema reports it
    folders = list(folders)
    if os.path.isfile(str(source)):
        folders.append(os.path.dirname(os.path.abspath(source)))
    problems = []
    for index, name in enumerate(names):
        if not isinstance(name, str) or not MODULE_NAME.match(name):
            continue  # the schema reports it
        try:
            with _folders_on_path(folders):
                importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - whatever a plugin raises is reported against its entry
            problems.append(Problem(source, f"{path}[{index}]",
                                    f"cannot import plugin module '{name}': {type(exc).__name__}: {exc}"))
    if problems:
        raise SpecError(problems)


def plugin_folders(names):
    """The folders the imported plugin modules ``names`` were found in (to find them again from a copy of the spec)."""
    folders = []
    for name in names:
        module = sys.modules.get(name.split(".")[0])
        location = getattr(module, "__file__", None)
        if location is None:
            continue
        folder = os.path.dirname(os.path.abspath(location))
        if os.path.basename(location) == "__init__.py":
            folder = os.path.dirname(folder)
        if folder not in folders:
            folders.append(folder)
    return folders
