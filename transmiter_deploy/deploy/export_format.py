"""The export directory's format: its manifest's name and format tag, and its graphs' stems.

Shared by what writes an export (deploy/onnx_export.py), what adds or removes a precision's
graphs in one (deploy/precision_edits.py) and what reads one (deploy/bank.py, the runners).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..artifacts import MANIFESTS
from ..errors import IntegrityError

FORMAT = "transmiter-deploy/onnx-export"
FORMAT_VERSION = 1
MANIFEST = MANIFESTS["export"]
GRAPHS = ("model", "head")  # pixels -> logits, features -> logits: one file each per precision

# An upgraded export's manifest (single-task or bank) records where it came from under this key
# (docs/upgrade.md): the previous export's manifest sha256, directory and target, and its generation.
LINEAGE = "lineage"
FIRST_GENERATION = 1  # an export that no upgrade made
# the upgrade's judgement, beside the new export's onnx/ (upgrade/run.py writes it): a server is not
# switched to an upgrade it held (serving/triton_generations.py)
UPGRADE_REPORT, UPGRADE_REPORT_FORMAT = "upgrade.json", "transmiter-deploy/upgrade-report"


@dataclass(frozen=True)
class Lineage:
    """What an upgrade records of the export it was made from."""

    generation: int  # the previous export's generation + 1
    parent_manifest_sha256: str
    parent_directory: str
    parent_target: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"generation": self.generation, "parent_manifest_sha256": self.parent_manifest_sha256,
                "parent_directory": self.parent_directory, "parent_target": dict(self.parent_target)}

    @classmethod
    def from_dict(cls, record: Any, where: str) -> "Lineage":
        if not isinstance(record, dict):
            raise IntegrityError(f"{where}: '{LINEAGE}' must be a mapping")
        generation, digest = record.get("generation"), record.get("parent_manifest_sha256")
        if isinstance(generation, bool) or not isinstance(generation, int) or generation <= FIRST_GENERATION:
            raise IntegrityError(f"{where}: {LINEAGE}.generation must be an integer above {FIRST_GENERATION}, "
                                 f"got {generation!r}")
        if not isinstance(digest, str) or len(digest) != 64:
            raise IntegrityError(f"{where}: {LINEAGE}.parent_manifest_sha256 must be a sha256, got {digest!r}")
        directory, target = record.get("parent_directory"), record.get("parent_target")
        if not isinstance(directory, str) or not isinstance(target, dict):
            raise IntegrityError(f"{where}: {LINEAGE} needs parent_directory (a string) and parent_target (a mapping)")
        return cls(generation, digest, directory, target)


def lineage_of(manifest: dict[str, Any], where: str) -> Lineage | None:
    """The lineage an export's manifest records (None: no upgrade made it)."""
    return None if manifest.get(LINEAGE) is None else Lineage.from_dict(manifest[LINEAGE], where)


def generation_of(manifest: dict[str, Any], where: str) -> int:
    lineage = lineage_of(manifest, where)
    return FIRST_GENERATION if lineage is None else lineage.generation
