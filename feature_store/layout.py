"""Where each store lives under the data folder (DESIGN.md, section 7)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from velox.config import VeloxConfig


@dataclass(frozen=True)
class DataLayout:
    """The data folder: the RocksDB online store, the Parquet offline store, the registry."""

    root: Path

    @classmethod
    def from_config(cls, config: VeloxConfig) -> DataLayout:
        return cls(Path(config.data.dir))

    @classmethod
    def around(cls, online: Path) -> DataLayout | None:
        """The data folder whose online store is at ``online``; None for a store on its own."""
        return cls(online.parent) if online.name == "online" else None

    @property
    def online(self) -> Path:
        return self.root / "online"

    @property
    def offline(self) -> Path:
        return self.root / "offline"

    @property
    def registry(self) -> Path:
        return self.root / "registry"

    @property
    def parts(self) -> dict[str, Path]:
        """Each store by name, in the order backups copy them."""
        return {"online": self.online, "offline": self.offline, "registry": self.registry}
