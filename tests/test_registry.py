"""latent.registry.Registry, and the registries built on it (sampler parts, schedules, adapters)."""

import pytest

from latent.registry import Registry, UnknownNameError


def test_register_get_create_and_aliases():
    things = Registry("thing")

    @things.register("box", "crate")
    class Box:
        def __init__(self, size, colour="red"):
            self.size, self.colour = size, colour

    things.register("plain", obj=dict)
    assert things.get("box") is things.get("crate") is Box
    assert Box.registered_name == "box"  # the first name, not the alias
    made = things.create("crate", 3, colour="blue")
    assert isinstance(made, Box) and (made.size, made.colour) == (3, "blue")
    assert things.create("plain", a=1) == {"a": 1}
    assert things.names() == list(things) == ["box", "crate", "plain"]
    assert "box" in things and "bag" not in things
    things.unregister("crate")
    assert "crate" not in things and "box" in things


def test_duplicate_name_raises_and_leaves_no_trace():
    things = Registry("thing")
    things.register("box", obj=int)
    things.register("box", obj=int)  # the same object again is fine
    with pytest.raises(ValueError, match="thing named 'box' is already registered"):
        things.register("bag", "box", obj=float)
    assert "bag" not in things  # a refused registration adds none of its names
    with pytest.raises(ValueError, match="non-empty string"):
        things.register("", obj=float)


def test_unknown_name_names_close_matches_and_known_names():
    things = Registry("thing", hint="Add it with @register({name!r}).")
    for name in ("linear", "cosine", "sigmoid"):
        things.register(name, obj=object())
    with pytest.raises(UnknownNameError) as err:
        things.get("cosin")
    message = str(err.value)
    assert "Unknown thing 'cosin'; did you mean cosine?" in message
    assert "Known thing names: cosine, linear, sigmoid." in message and message.endswith("@register('cosin').")
    assert isinstance(err.value, KeyError) and isinstance(err.value, ValueError)  # either kind catches it
    with pytest.raises(ValueError, match="Unknown thing 'zzz'. Known"):  # nothing close: no guess
        things.create("zzz")


def test_on_miss_hook_runs_once_and_again_after_a_failure():
    calls = []

    def load():
        calls.append(1)
        if len(calls) == 1:
            raise ImportError("first try fails")
        things.register("late", obj=list)

    things = Registry("thing", on_miss=load)
    things.register("early", obj=tuple)
    assert things.get("early") is tuple and not calls  # a hit does not load anything
    with pytest.raises(ImportError):
        things.get("late")
    assert things.get("late") is list and len(calls) == 2
    assert things.names() == ["early", "late"] and len(calls) == 2


def test_name_attr():
    things = Registry("thing", name_attr="kind")

    @things.register("box")
    class Box:
        pass

    assert Box.kind == "box" and not hasattr(Box, "registered_name")


def test_project_registries_use_it():
    from latent.sampling import create_part, list_parts
    from latent.sampling.registry import REGISTRIES
    from latent.schedules import SCHEDULES, get_schedule
    from modalities.base import ADAPTERS, adapter_class, available_adapters

    assert isinstance(REGISTRIES["commit"], Registry) and "threshold" in REGISTRIES["commit"]
    assert list_parts("confidence") == REGISTRIES["confidence"].names()
    assert REGISTRIES["confidence"].get("low_confidence") is REGISTRIES["confidence"].get("probability")
    assert type(create_part("commit", "threshold", threshold=0.5)).name == "threshold"
    assert isinstance(SCHEDULES, Registry) and get_schedule("cosine").name == "cosine"
    assert isinstance(ADAPTERS, Registry) and {"vision", "audio", "driving"} <= set(available_adapters())
    assert adapter_class("vision").adapter_type == "vision"
    with pytest.raises(ValueError, match="Unknown adapter 'visoin'; did you mean vision"):
        adapter_class("visoin")
