"""The export directory's format: its manifest's name and format tag, and its graphs' stems.

Shared by what writes an export (deploy/onnx_export.py), what adds or removes a precision's
graphs in one (deploy/precision_edits.py) and what reads one (deploy/bank.py, the runners).
"""

from __future__ import annotations

from ..artifacts import MANIFESTS

FORMAT = "transmiter-deploy/onnx-export"
FORMAT_VERSION = 1
MANIFEST = MANIFESTS["export"]
GRAPHS = ("model", "head")  # pixels -> logits, features -> logits: one file each per precision
