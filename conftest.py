"""pytest: the framework adapters' modules are doctest-collected only where their
framework imports."""

import importlib.util

collect_ignore = [f"cuflash/{name}.py" for name in ("torch", "jax")
                  if importlib.util.find_spec(name) is None]
