"""One public name, one definition: no two modules export different objects under one name."""

import importlib
import pkgutil

import xnn_toolkit


def _modules():
    yield xnn_toolkit
    for info in pkgutil.walk_packages(xnn_toolkit.__path__, "xnn_toolkit."):
        if any(part.startswith("_") for part in info.name.split(".")):
            continue
        yield importlib.import_module(info.name)


def test_no_public_name_is_defined_twice():
    where: dict[str, dict[int, str]] = {}
    for mod in _modules():
        for name in getattr(mod, "__all__", ()):
            obj = getattr(mod, name)
            if isinstance(obj, str | int | float | tuple | frozenset):
                continue  # constants may share a name
            home = getattr(obj, "__module__", mod.__name__)
            where.setdefault(name, {})[id(obj)] = f"{home}.{name}"
    twice = {n: sorted(d.values()) for n, d in where.items() if len(d) > 1}
    assert not twice, twice
