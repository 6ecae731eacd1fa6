"""The module paths of 0.1 (one flat package), kept importable for one release.

``from transmiter_deploy.adapter import AdapterConfig`` still works: each old module
name is served by a small alias module that warns once (DeprecationWarning) and looks
names up in the modules they moved to. Remove in 0.3.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

PACKAGE = "transmiter_deploy"

# old module -> the modules its names now live in (looked up in this order)
MOVED: dict[str, tuple[str, ...]] = {
    "adapter": ("method.adapter",), "extraction": ("method.extraction",), "transfer": ("method.transfer",),
    "plus": ("method.plus",), "evaluation": ("method.evaluation",), "training": ("method.training",),
    "eft": ("method.eft",),
    "models": ("features.models",), "datasets": ("features.datasets",), "cache": ("features.cache",),
    "heads": ("features.heads",), "templates": ("features.templates",), "vocabulary": ("features.vocabulary",),
    "adapter_artifact": ("features.adapter_artifact", "method.adapter"),
    "fusion": ("deploy.fusion",), "head_weights": ("deploy.head_weights",), "graph_cost": ("deploy.graph_cost",),
    "onnx_export": ("deploy.onnx_export", "runtimes.onnxruntime"),
    "parity": ("runtimes.compare",),
    "runners": ("runtimes.base", "runtimes.pytorch", "runtimes.onnxruntime", "runtimes.compare",
                "runtimes.tensorrt"),
    "tensorrt_engine": ("runtimes.tensorrt",),
    "recipe": ("pipeline.recipe",), "export_pipeline": ("pipeline.export", "pipeline.steps", "pipeline.report"),
    "phases": ("pipeline.phases",),
}
# names that changed as well as moved: old module -> {old name: "new.module:new name"}
RENAMED: dict[str, dict[str, str]] = {
    "onnx_export": {"to_mixed_fp16": "deploy.precisions.fp16:convert"},
    "runners": {"onnxruntime_providers": "runtimes.onnxruntime:available_providers"},
}


class _AliasModule(types.ModuleType):
    def __getattr__(self, name: str):
        old = self.__name__.rsplit(".", 1)[1]
        if name in RENAMED.get(old, {}):
            module, _, attribute = RENAMED[old][name].partition(":")
            return getattr(importlib.import_module(f"{PACKAGE}.{module}"), attribute)
        for target in MOVED[old]:
            module = importlib.import_module(f"{PACKAGE}.{target}")
            if hasattr(module, name):
                return getattr(module, name)
        raise AttributeError(f"module {self.__name__!r} (moved to {PACKAGE}.{MOVED[old][0]}) has no attribute {name!r}")


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        package, _, old = fullname.rpartition(".")
        if package == PACKAGE and old in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        return _AliasModule(spec.name)

    def exec_module(self, module) -> None:
        old = module.__name__.rsplit(".", 1)[1]
        warnings.warn(f"{module.__name__} is now {PACKAGE}.{MOVED[old][0]}; the old path will be removed in 0.3",
                      DeprecationWarning, stacklevel=2)


def install() -> None:
    if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
        sys.meta_path.append(_MovedModules())
