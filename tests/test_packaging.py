"""pyproject.toml declares what jaxad and its tests import, and nothing they do not."""

import ast
import importlib.metadata
import os
import re
import sys
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Declared but never imported, on purpose: the TensorBoard viewer for events/, and the
# pytest plugin that runs `make test` on every core.
NOT_IMPORTED = {"tensorboard", "pytest-xdist"}


def _norm(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> set[str]:
  project = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]
  reqs = project["dependencies"] + [r for extra in ("test", "nifti", "medmnist")
                                    for r in project["optional-dependencies"][extra]]
  names = {_norm(re.split(r"[ <>=!~;\[]", r, maxsplit=1)[0]) for r in reqs}
  return names | ({"tensorflow"} if "tensorflow-cpu" in names else set())


def _imported_modules() -> set[str]:
  """Top-level modules imported anywhere in jaxad/ and tests/ (not the standard
  library, not jaxad or the tests themselves)."""
  found = set()
  for folder in ("jaxad", "tests"):
    for d, _, names in os.walk(os.path.join(ROOT, folder)):
      for name in names:
        if name.endswith(".py"):
          tree = ast.parse(open(os.path.join(d, name)).read())
          for node in ast.walk(tree):
            if isinstance(node, ast.Import):
              found.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
              found.add(node.module.split(".")[0])
  local = {"jaxad", "conftest"} | {n[:-3] for n in os.listdir(os.path.join(ROOT, "tests"))}
  return {m for m in found if m not in sys.stdlib_module_names and m not in local}


def _distribution(module: str, installed: dict) -> str:
  dists = installed.get(module, [module])
  return "tensorflow" if dists[0].startswith("tensorflow_") else _norm(dists[0])


def test_every_import_is_declared_and_every_declaration_imported():
  declared = _declared()
  installed = importlib.metadata.packages_distributions()
  used = {_distribution(m, installed) for m in _imported_modules()}
  used.discard("jaxlib")  # comes with jax, never pinned alone
  assert used - declared == set(), "imported but not declared in pyproject.toml"
  unused = declared - used - NOT_IMPORTED - {"tensorflow-cpu"}
  assert unused == set(), "declared in pyproject.toml but never imported"
