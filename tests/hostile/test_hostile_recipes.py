"""Recipes and JSON files built to break parsers: deep nesting, duplicate keys, unhashable keys,
huge files and numbers, bad encodings. One line through the CLI, exit 2, never a traceback."""

import json

import pytest

from transmiter_deploy.artifacts import read_json
from transmiter_deploy.cli import main
from transmiter_deploy.errors import IntegrityError
from transmiter_deploy.pipeline.recipe import MAX_RECIPE_BYTES

from conftest import SMALL_DEMO


def export(capsys, recipe, tmp_path) -> tuple[int, str]:
    status = main(["--quiet", "export", str(recipe), "--out", str(tmp_path / "out")])
    return status, capsys.readouterr().err.strip()


@pytest.mark.parametrize("text, message", [
    ("a: " + "[" * 5000 + "]" * 5000 + "\n", "nests deeper than 32 levels"),
    ("a: " + "{b: " * 3000 + "1" + "}" * 3000 + "\n", "nests deeper than 32 levels"),
    ("name: demo\n" + "".join(f"k{i}:\n" + "  " * 1 + "- x\n" for i in range(10)) + "name: again\n", "duplicate key 'name'"),
    (SMALL_DEMO.replace("head: {logit_width: 64}", "head: {logit_width: 64, logit_width: 32}"), "duplicate key 'logit_width'"),
    ("? [a, b]\n: 1\n", "found unhashable key"),
    ("name: [unclosed\n", "expected ',' or ']'"),
    ("x: &a [*a]\n", "x: unknown key"),  # a recursive alias: refused by the schema, not walked forever
    ("- just\n- a list\n", "must be a YAML mapping"),
    ("name: \udcff\n", "not valid YAML"),
])
def test_malformed_recipes_are_one_line(capsys, tmp_path, text, message):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(text.encode("utf-8", "surrogateescape"))
    status, err = export(capsys, recipe, tmp_path)
    assert status == 2, err
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_a_recipe_over_the_size_bound_is_refused_before_parsing(capsys, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("# " + "x" * MAX_RECIPE_BYTES + "\nname: demo\n")
    status, err = export(capsys, recipe, tmp_path)
    assert status == 2 and "a recipe is at most" in err


def test_a_recipe_with_too_many_nodes_is_refused(capsys, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("runtimes: [" + ", ".join(["a"] * 120_000) + "]\n")
    status, err = export(capsys, recipe, tmp_path)
    assert status == 2 and "more than 100000 YAML nodes" in err


@pytest.mark.parametrize("text, message", [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"format": "x", "format": "y"}', "duplicate key 'format'"),
    ('{"n": 1' + "0" * 5000 + "}", "integer of 5001 digits"),
    ('{"n": -1' + "0" * 45 + "}", "integer of 46 digits"),
    ('{"n": 1', "not valid JSON"),
    ("[1, 2]", "must hold a JSON object"),
    (b"\xff\xfe{}", "not valid JSON"),
])
def test_malformed_json_is_one_integrity_error(tmp_path, text, message):
    path = tmp_path / "manifest.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(IntegrityError, match=message) as caught:
        read_json(path, "manifest")
    assert "\n" not in str(caught.value)


def test_a_deeply_nested_cache_manifest_through_the_cli(flow, capsys, tmp_path):
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(flow / "c_src", cache)
    manifest = json.loads((cache / "cache.json").read_text())
    (cache / "cache.json").write_text(json.dumps(manifest)[:-1] + ', "x": ' + "[" * 50_000 + "]" * 50_000 + "}")
    status = main(["--quiet", "evaluate", "--cache", str(cache), "--head", str(flow / "h_src")])
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1 and "nested too deeply" in err, err
