"""Built-in merging methods, one module each; importing this package registers them all.

Adding a method is adding a module here that decorates a function with
:func:`epmq.merging.registry.register_method`.
"""

from __future__ import annotations

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")
