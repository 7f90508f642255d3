"""The module names sdo had before its layers became packages (2026-12), kept for one release: importing one
warns (DeprecationWarning) and gives a module that reads its names from their new home."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

# old module -> the modules its names now live in (searched in order)
MOVED = {
    "sdo.strategies": ("sdo.gradients",),
    "sdo.adjoint": ("sdo.gradients.adjoint",),
    "sdo.reversible": ("sdo.gradients.reversible",),
    "sdo.clip": ("sdo.objectives.clip",),
    "sdo.rewards": ("sdo.objectives.rewards", "sdo.embedded.judge"),
    "sdo.bench": ("sdo.measure.profile",),
    "sdo.diagnostics": ("sdo.measure.fidelity",),
    "sdo.finetuning_config": ("sdo.finetuning.config",),
    "sdo.shortft": ("sdo.finetuning.shortft", "sdo.finetuning.run"),
    "sdo.lora": ("sdo.finetuning.lora", "sdo.finetuning.lora_files"),
    "sdo.checkpoints": ("sdo.finetuning.checkpoints",),
    "sdo.anchor": ("sdo.finetuning.anchor",),
    "sdo.guard": ("sdo.finetuning.guard",),
    "sdo.vae": ("sdo.backbones.vae", "sdo.backbones.conditioning"),
    "sdo.tasks": ("sdo.recipes.latent_tasks", "sdo.backbones.pipeline"),
    "sdo.reward_tasks": ("sdo.recipes.finetune_tasks",),
    "sdo.attack": ("sdo.recipes.attack",),
    "sdo.cli_finetune": ("sdo.cli.finetune",),
    "sdo.benchmark": ("sdo.cli.bench",),
    "sdo.demo": ("sdo.cli.demo",),
}

__all__ = ["MOVED", "install"]


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        return importlib.util.spec_from_loader(fullname, self) if fullname in MOVED else None

    def create_module(self, spec):
        return None  # a plain new module, filled by exec_module

    def exec_module(self, module: types.ModuleType) -> None:
        homes = MOVED[module.__name__]
        warnings.warn(f"{module.__name__} is now {' and '.join(homes)}; the old name goes away in the next release",
                      DeprecationWarning, stacklevel=2)
        targets = [importlib.import_module(home) for home in homes]

        def __getattr__(name):
            for target in targets:
                if hasattr(target, name):
                    return getattr(target, name)
            raise AttributeError(f"module {module.__name__!r} has no attribute {name!r}")

        module.__getattr__ = __getattr__
        module.__all__ = [n for target in targets for n in getattr(target, "__all__", ())]


def install() -> None:
    """Put the finder on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.append(_Finder())
