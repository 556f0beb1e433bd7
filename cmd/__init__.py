"""The ``cmd`` package of this repository, which must also be the standard library's ``cmd``.

``python -m cmd.kyb_device_plugin`` runs from the repository root, so this package comes
before the standard library on ``sys.path`` and wins the name ``cmd``. ``pdb`` and others
``import cmd`` and use ``cmd.Cmd``: so this package executes the standard library's
``cmd.py`` into its own namespace, keeping ``__path__`` so ``cmd.kyb_device_plugin`` still
resolves as a subpackage.
"""

import sysconfig as _sysconfig
from pathlib import Path as _Path

_STDLIB_CMD = _Path(_sysconfig.get_paths()["stdlib"]) / "cmd.py"
exec(compile(_STDLIB_CMD.read_text(encoding="utf-8"), str(_STDLIB_CMD), "exec"))
