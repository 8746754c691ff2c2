"""Every setting is documented: a field description and a row in the README's settings table."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.config import RxSettings, TxSettings

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


@pytest.mark.parametrize("cls, prefix", [(RxSettings, "SPLITVLM_RX_"), (TxSettings, "SPLITVLM_TX_")])
def test_every_setting_has_a_description_and_a_readme_row(cls: type, prefix: str) -> None:
    for name, field in cls.model_fields.items():  # type: ignore[attr-defined]
        assert field.description, f"{cls.__name__}.{name} has no description"
        assert f"| `{prefix}{name.upper()}` |" in README, f"README lacks {prefix}{name.upper()}"
