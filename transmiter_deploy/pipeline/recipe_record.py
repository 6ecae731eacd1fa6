"""The resolved recipe an export ran, recorded in its output directory (``recipe.json``).

An export directory outlives the recipe file that made it (the file is edited, moved, or was a
temporary one); what ``transmiter upgrade`` re-runs with a new target is what the export actually
ran. The record is the recipe as :func:`pipeline.recipe.load_recipe` resolved it: every path
absolute, every default filled in, a bank's tasks with their merged sections. It is written as
JSON, which the recipe reader parses like any YAML recipe, so reading it back goes through the
same validation (files that are gone are named).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ..artifacts import write_json
from ..errors import InputError
from .recipe import MERGED_SECTIONS, SHARED_KEYS, Recipe, load_recipe

RECORD = "recipe.json"


def _raw(value: Any) -> Any:
    """A recipe value as the YAML reader takes it back: dataclasses as mappings without their
    unset (None) fields, paths as strings, tuples as lists."""
    if dataclasses.is_dataclass(value):
        return {f.name: _raw(getattr(value, f.name)) for f in dataclasses.fields(value)
                if f.init and getattr(value, f.name) is not None}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (tuple, list)):
        return [_raw(item) for item in value]
    return value


def recipe_record(recipe: Recipe) -> dict[str, Any]:
    """The recipe as a mapping that :func:`load_recipe` reads back into an equal recipe."""
    record: dict[str, Any] = {"name": recipe.name, "device": recipe.device,
                              **{key: _raw(getattr(recipe, key)) for key in SHARED_KEYS}}
    if recipe.bank:  # the top level's sections too: they are what the recipe's tasks were merged over
        sections = {key: _raw(getattr(recipe, key)) for key in MERGED_SECTIONS if key != "data"}
        if recipe.finetuned is not None:
            sections["finetuned"] = _raw(recipe.finetuned)
        return {**record, **sections, "tasks": [_raw(task) for task in recipe.tasks]}
    task = _raw(recipe.tasks[0])
    del task["name"]  # a single-task recipe's task is its top level
    return {**record, **task}


def write_recipe_record(recipe: Recipe, out: Path) -> None:
    write_json(Path(out) / RECORD, recipe_record(recipe))


def read_recipe_record(out: Path, check_files: bool = True) -> Recipe:
    """The recipe an export in ``out`` ran; InputError when it has no record (made before
    exports recorded their recipe, or not an export directory)."""
    path = Path(out) / RECORD
    if not path.is_file():
        raise InputError(f"{out} has no recorded recipe ({RECORD}): it is not the output directory of "
                         "`transmiter export`, or an export made before 0.4 (run the export again to record it)")
    return load_recipe(path, check_files=check_files)
