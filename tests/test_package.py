"""The package's face: public names stay what they are after any submodule is imported."""

import importlib
import pkgutil
import types

import lorafit


def test_public_names_are_not_replaced_by_submodules_of_the_same_name():
    public = {name: getattr(lorafit, name) for name in lorafit.__all__}
    for info in pkgutil.walk_packages(lorafit.__path__, "lorafit."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)
    for name, value in public.items():
        assert getattr(lorafit, name) is value, f"lorafit.{name} was replaced by {getattr(lorafit, name)!r}"
        assert not isinstance(value, types.ModuleType), name
    for name in lorafit.lora.__all__:
        assert getattr(lorafit.lora, name) is public[name], f"lorafit.lora.{name} was replaced"
    assert callable(lorafit.generate) and callable(lorafit.evaluate) and callable(lorafit.load)
    submodules = {m.name for m in pkgutil.iter_modules(lorafit.__path__)}
    assert not submodules & set(lorafit.__all__), "a submodule shares its name with a public function"
