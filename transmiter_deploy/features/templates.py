"""Prompt templates for zero-shot heads, as plain format strings ("a photo of a {}.").

Strings rather than lambdas so the templates used for a head can be stored in
its manifest and reproduced exactly.
"""

from __future__ import annotations

from pathlib import Path

from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

from ..errors import InputError

BUILTIN_TEMPLATES: dict[str, tuple[str, ...]] = {
    # open_clip's 7-template subset of CLIP's ImageNet ensemble: a good default cost/quality.
    "simple": tuple(t("{}") for t in SIMPLE_IMAGENET_TEMPLATES),
    # CLIP's full 80-template ImageNet ensemble.
    "openai": tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES),
    "photo": ("a photo of a {}.",),
}


def resolve_templates(name_or_path: str) -> tuple[str, ...]:
    """A built-in set by name, or a text file with one template per line."""
    if name_or_path in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[name_or_path]
    path = Path(name_or_path)
    if not path.is_file():
        raise InputError(
            f"templates '{name_or_path}' is neither a built-in set ({', '.join(BUILTIN_TEMPLATES)}) nor a file"
        )
    templates = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    return validate_templates(templates, str(path))


def validate_templates(templates: tuple[str, ...], where: str) -> tuple[str, ...]:
    if not templates:
        raise InputError(f"{where}: no templates")
    for template in templates:
        if template.count("{}") != 1:
            raise InputError(f"{where}: template {template!r} must contain exactly one '{{}}'")
    return templates
