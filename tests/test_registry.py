from __future__ import annotations

import pytest

from afedge.registry import Registry, RegistryError


def test_duplicate_is_refused():
    reg: Registry[int] = Registry("thing")
    reg.register("a")(1)
    with pytest.raises(RegistryError, match="thing 'a' is already registered"):
        reg.register("a")(2)
    assert reg.get("a") == 1


def test_unknown_name_lists_the_known_ones():
    reg: Registry[int] = Registry("thing")
    reg.register("alpha")(1)
    with pytest.raises(RegistryError, match="unknown thing 'beta'; known: alpha"):
        reg.get("beta")
