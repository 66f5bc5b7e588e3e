"""Selectors over labels and groups (``edge_fleet.domain.selector``)."""

from __future__ import annotations

import pytest

from edge_fleet.domain.selector import matches, normalize, parse
from edge_fleet.errors import FleetError


def test_terms_all_hold() -> None:
    terms = parse("region=north, hw=pi5")
    assert matches(terms, {"region": "north", "hw": "pi5", "shop": "17"}, "shop-17")
    assert not matches(terms, {"region": "north", "hw": "pi4"}, None)


def test_group_is_the_devices_group_not_a_label() -> None:
    terms = parse("group=shop-3")
    assert matches(terms, {}, "shop-3")
    assert not matches(terms, {"group": "shop-3"}, "shop-4")


def test_negation_and_presence() -> None:
    assert matches(parse("hw!=pi4,canary,!retired"), {"hw": "pi5", "canary": ""}, None)
    assert not matches(parse("!retired"), {"retired": "yes"}, None)
    assert not matches(parse("canary"), {}, None)


def test_one_spelling_for_ids() -> None:
    assert (
        normalize("hw=pi5,region=north") == normalize(" region=north ,hw=pi5,hw=pi5") == "hw=pi5,region=north"
    )


@pytest.mark.parametrize("bad", ["", ",", "region=no rth", "=x", "a/b=c"])
def test_bad_selectors_name_the_term(bad: str) -> None:
    with pytest.raises(FleetError, match="selector"):
        parse(bad)
