"""docs/CONFIG.md, generated: every option of the store (StoreConfig), of a Cluster and of
`tiered serve` (ServeSettings), with its environment variable, unit and default.

    python -m runtime.config_doc      # rewrites docs/CONFIG.md
"""

from __future__ import annotations

from pathlib import Path

from tiered.config import reference as store_reference

CONFIG_MD = Path(__file__).resolve().parents[1] / "docs" / "CONFIG.md"


def text() -> str:
    from .cluster import Cluster
    from .serve.settings import ServeSettings

    return "\n".join((store_reference(), Cluster.reference(), ServeSettings.reference()))


if __name__ == "__main__":
    CONFIG_MD.write_text(text(), encoding="utf-8")
