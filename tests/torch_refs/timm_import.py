"""Imports timm in the PyTorch reference venv, where torchvision cannot be installed.

timm is installed there with --no-deps; its package import touches torchvision (FrozenBatchNorm2d,
transforms, datasets) and PIL (augmentations) although the VisionTransformer model uses neither.
torchvision has no wheel matching that torch. For each of them that is missing we register an inert
stand-in before importing timm: every attribute is a dummy class that raises when used, so a real use
would fail loudly instead of silently.
"""

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types


class _MissingMeta(type):
  """Any class attribute (e.g. `InterpolationMode.BICUBIC`) is another placeholder."""

  def __getattr__(cls, name):
    if name.startswith("__"):
      raise AttributeError(name)
    return _MissingMeta(name, (_Missing,), {})


class _Missing(metaclass=_MissingMeta):
  """Placeholder for any object of a stubbed package; calling it raises."""

  def __init__(self, *args, **kwargs):
    raise RuntimeError("torchvision is stubbed in the reference venv (tests/torch_refs/timm_import.py)")

  def __init_subclass__(cls, **kwargs):
    pass


class _StubModule(types.ModuleType):

  def __getattr__(self, name):
    if name.startswith("__"):
      raise AttributeError(name)
    return _MissingMeta(name, (_Missing,), {})


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):

  def __init__(self, roots):
    self.roots = tuple(roots)

  def find_spec(self, fullname, path=None, target=None):
    if fullname.split(".")[0] in self.roots:
      return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
    return None

  def create_module(self, spec):
    module = _StubModule(spec.name)
    module.__path__ = []
    module.__version__ = "99.0.0"  # Version checks at import time pass; nothing is used.
    return module

  def exec_module(self, module):
    pass


def import_timm():
  """Returns the real `timm` package, stubbing torchvision / PIL only where they are not installed."""
  missing = [m for m in ("torchvision", "PIL") if importlib.util.find_spec(m) is None]
  if missing:
    sys.meta_path.insert(0, _StubFinder(missing))
  import timm
  return timm
