"""docs/CONFIG.md is generated: StoreConfig's options, then `tiered serve`'s settings, each with its unit."""

from __future__ import annotations

from pathlib import Path

from runtime.serve.settings import ServeSettings
from tiered.config import reference

CONFIG_MD = Path(__file__).resolve().parents[2] / "docs" / "CONFIG.md"


def test_docs_config_holds_every_option_of_the_store_and_the_server():
    expected = reference() + "\n" + ServeSettings.reference()
    assert CONFIG_MD.read_text() == expected, (
        "regenerate it: python -c \"from tiered.config import reference; from runtime.serve.settings import "
        "ServeSettings; open('docs/CONFIG.md', 'w').write(reference() + '\\n' + ServeSettings.reference())\"")
    rows = {line.split("`")[1]: line.split(" | ") for line in ServeSettings.reference().splitlines()
            if line.startswith("| `")}
    assert list(rows) == list(ServeSettings.model_fields)
    assert rows["device_mib"][4] == "MiB" and rows["call_timeout_s"][4] == "seconds" and rows["workers"][3] == ">= 1"
    assert rows["workers"][1] == "`TIERED_WORKERS`"
    assert all(row[6].strip(" |") for row in rows.values())  # every setting says what it means
