"""bench/ scripts imported by path for their tests (bench/ is not a package)."""

import importlib.util
import sys
from pathlib import Path


def load_bench(name: str):
    """bench/<name>.py as the module bench_<name> (registered, so dataclasses and pickling work)."""
    path = Path(__file__).parent.parent / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
