"""docs/CONFIG.md is generated: StoreConfig's options, a Cluster's, then `tiered serve`'s settings, each
with its unit."""

from __future__ import annotations

from pathlib import Path

from runtime import config_doc
from runtime.cluster.cluster import FILE_OPTIONS, Cluster
from runtime.serve.settings import ServeSettings

CONFIG_MD = Path(__file__).resolve().parents[2] / "docs" / "CONFIG.md"


def test_docs_config_holds_every_option_of_the_store_the_cluster_and_the_server():
    assert CONFIG_MD.read_text() == config_doc.text(), "regenerate it: python -m runtime.config_doc"
    cluster_rows = [line.split("`")[1] for line in Cluster.reference().splitlines() if line.startswith("| `")]
    assert cluster_rows == list(FILE_OPTIONS)
    rows = {line.split("`")[1]: line.split(" | ") for line in ServeSettings.reference().splitlines()
            if line.startswith("| `")}
    assert list(rows) == list(ServeSettings.model_fields)
    assert rows["device_mib"][4] == "MiB" and rows["call_timeout_s"][4] == "seconds" and rows["workers"][3] == ">= 1"
    assert rows["workers"][1] == "`TIERED_WORKERS`"
    assert all(row[6].strip(" |") for row in rows.values())  # every setting says what it means
