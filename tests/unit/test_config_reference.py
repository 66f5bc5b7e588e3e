"""docs/configuration.md lists every key of the configuration as the code defines it."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent import config_reference
from agent.config import AgentConfig

PAGE = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_the_page_holds_the_reference_the_code_renders() -> None:
    text = PAGE.read_text()
    assert config_reference.replace_in(text) == text, (
        "docs/configuration.md is out of date: run `python -m agent.config_reference --write docs/configuration.md`"
    )


def test_every_section_and_key_is_in_the_reference() -> None:
    rendered = config_reference.render()
    for section in (
        "[mqtt]",
        "[mqtt.tls]",
        "[model]",
        "[jobs]",
        "[engine]",
        "[telemetry]",
        "[health]",
        "[update]",
    ):
        assert f"### `{section}`" in rendered
    for name, field in AgentConfig.model_fields["engine"].annotation.model_fields.items():  # type: ignore[union-attr]
        assert f"| `{name}` |" in rendered, name
        assert field.description is None or field.description.split(".")[0] in rendered


def test_a_changed_description_makes_the_page_stale(monkeypatch: pytest.MonkeyPatch) -> None:
    text = PAGE.read_text()
    field = AgentConfig.model_fields["device_id"]
    monkeypatch.setattr(field, "description", "Something else entirely.")
    assert config_reference.replace_in(text) != text


def test_a_page_without_markers_is_refused() -> None:
    with pytest.raises(ValueError, match="markers"):
        config_reference.replace_in("# no reference here\n")
