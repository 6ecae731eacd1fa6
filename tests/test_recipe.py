"""Recipe validation: every shipped recipe parses; every mistake names its key."""

from pathlib import Path

import pytest

from transmiter_deploy.pipeline.recipe import RecipeError, load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "export" / "recipes"

MINIMAL = """\
name: t
source: {name: TM-Demo-Source, demo_weights: TM-Demo-Source}
finetuned: {name: TM-Demo-Source, demo_weights: TM-Demo-Source-ft-colours-tinted}
target: {name: TM-Demo-Target, demo_weights: TM-Demo-Target}
data: {demo_task: colours-tinted}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_the_default_recipe_loads_with_its_settings():
    recipe = load_recipe(RECIPES / "demo.yaml")
    assert recipe.name == "demo" and recipe.data.demo_task == "colours-tinted"
    assert recipe.finetuned.demo_weights == "TM-Demo-Source-ft-colours-tinted"
    assert recipe.head.logit_width == 128 and recipe.adapter.latent_dim == 128
    assert recipe.export.precisions == ("fp32", "fp16", "int8") and recipe.export.batch.max == 32
    assert recipe.extraction.epochs == 10 and recipe.transfer.regularisation == 500.0  # reference defaults


@pytest.mark.parametrize("name", ["vit-b-16_to_vit-l-14", "vit-b-32_to_vit-b-16", "rn50_to_vit-b-16"])
def test_real_pair_recipes_are_valid_apart_from_their_placeholder_paths(name):
    recipe = load_recipe(RECIPES / f"{name}.yaml", check_files=False)
    assert recipe.source.pretrained and recipe.target.pretrained and recipe.finetuned.checkpoint
    with pytest.raises(RecipeError, match=r"finetuned\.checkpoint: file not found"):
        load_recipe(RECIPES / f"{name}.yaml")


def test_relative_paths_resolve_against_the_recipe_file(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "classes.txt").write_text("a\nb\n")
    recipe = load_recipe(write(tmp_path, MINIMAL.replace("data: {demo_task: colours-tinted}",
                                                         "data: {train: train, classes_file: classes.txt}\n"
                                                         "plus: {enabled: false}")))
    assert recipe.data.train == tmp_path / "train" and recipe.plus.enabled is False


@pytest.mark.parametrize("edit, message", [
    (("data: {demo_task: colours-tinted}", "data: {demo_task: colours-tinted, trian: x}"),
     r"data\.trian: unknown key \(did you mean 'train'\?\)"),
    (("name: t", "name: t\nextration: {epochs: 3}"), r"extration: unknown key \(did you mean 'extraction'\?\)"),
    (("name: t", "name: t\nextraction: {epochs: ten}"), r"extraction\.epochs: must be an integer, got 'ten'"),
    (("name: t", "name: t\nplus: {enabled: 1}"), r"plus\.enabled: must be true or false"),
    (("name: t", "name: t\nexport: {batch: {min: 4, opt: 2, max: 8}}"), r"export\.batch: need 1 <= min <= opt <= max"),
    (("name: t", "name: t\nexport: {precisions: [fp32, int4]}"), r"unknown precision 'int4' \(known: fp32, fp16, int8\)"),
    (("name: t", "name: t\nexport: {precisions: [fp16]}"), r"must include fp32"),
    (("name: t", "name: t\nexport: {precisions: [fp32, fp16, fp16]}"),
     r"export\.precisions: 'fp16' is listed twice \(give each precision once\)$"),
    (("name: t", "name: t\nexport: {precisions: [fp32, fp32]}"), r"export\.precisions: 'fp32' is listed twice"),
    (("data: {demo_task: colours-tinted}", "data: {demo_task: colours-tinted, engine: ray, workers: 0}"),
     r"data\.workers: must be positive, got 0$"),
    (("name: t", "name: t\nruntimes: [tensorflow]"), r"unknown runtime 'tensorflow'"),
    (("name: t", "name: t\nhead: {templates: nope.txt}"), r"head\.templates: 'nope.txt' is neither"),
    (("name: TM-Demo-Target, demo", "name: ViT-L-41, demo"), r"target\.name: open_clip does not know model 'ViT-L-41' \(close: .*ViT-L-14"),
    (("{name: TM-Demo-Target, demo_weights: TM-Demo-Target}", "{name: TM-Demo-Target}"),
     r"target: give exactly one of pretrained, checkpoint, demo_weights, init_seed"),
    (("{name: TM-Demo-Target, demo_weights: TM-Demo-Target}", "{name: TM-Demo-Target, init_seed: 0, pretrained: x}"),
     r"target: give exactly one .* \(got pretrained, init_seed\)"),
    (("{name: TM-Demo-Target, demo_weights: TM-Demo-Target}", "{name: TM-Demo-Target, checkpoint: gone.safetensors}"),
     r"target\.checkpoint: file not found"),
    (("TM-Demo-Source-ft-colours-tinted}", "TM-Demo-Source-ft-cars}"),
     r"finetuned\.demo_weights: not a shipped demo model: 'TM-Demo-Source-ft-cars' \(known: .*colours-tinted"),
    (("demo_task: colours-tinted", "demo_task: cars"), r"data\.demo_task: unknown demo task 'cars'"),
    (("data: {demo_task: colours-tinted}", "data: {}"), r"data: give data\.demo_task or data\.train"),
    (("source: {name: TM-Demo-Source, demo_weights: TM-Demo-Source}\n", ""), r"source: missing key"),
    (("source: {name: TM-Demo-Source, demo_weights: TM-Demo-Source}", "source: [TM-Demo-Source]"),
     r"source: must be a mapping, got list"),
    (("source: {name: TM-Demo-Source, demo_weights: TM-Demo-Source}", "source: {demo_weights: TM-Demo-Source}"),
     r"source: missing key 'name'"),
])
def test_each_mistake_is_reported_with_its_key(tmp_path, edit, message):
    old, new = edit
    assert old in MINIMAL
    with pytest.raises(RecipeError, match=message):
        load_recipe(write(tmp_path, MINIMAL.replace(old, new, 1)))


def test_unreadable_recipes_are_refused(tmp_path):
    with pytest.raises(RecipeError, match="recipe not found"):
        load_recipe(tmp_path / "missing.yaml")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(write(tmp_path, "name: [unclosed"))
    with pytest.raises(RecipeError, match="must be a YAML mapping"):
        load_recipe(write(tmp_path, "- a\n- b\n"))


def test_own_data_needs_classes_and_fewshot_images(tmp_path):
    (tmp_path / "train").mkdir()
    own = MINIMAL.replace("data: {demo_task: colours-tinted}", "data: {train: train, classes: [a, b]}")
    with pytest.raises(RecipeError, match=r"data\.fewshot: missing: plus\.enabled needs"):
        load_recipe(write(tmp_path, own))
    with pytest.raises(RecipeError, match="exactly one of data.classes and data.classes_file"):
        load_recipe(write(tmp_path, own.replace("classes: [a, b]", "classes: [a], classes_file: c.txt")))


def test_a_repeated_precision_is_one_line_and_exit_2_at_check(tmp_path, capsys):
    from transmiter_deploy.cli import main

    path = write(tmp_path, MINIMAL + "export: {precisions: [fp32, int8, fp16, int8]}\n")
    assert main(["export", "--check", str(path)]) == 2
    err = capsys.readouterr().err
    assert err == f"transmiter: error: recipe {path}: export.precisions: 'int8' is listed twice (give each precision once)\n"


def test_zero_ray_workers_in_a_bank_task_is_refused_naming_the_task(tmp_path):
    from conftest import bank_recipe_text

    text = bank_recipe_text().replace("data: {demo_task: textures-foggy}",
                                      "data: {demo_task: textures-foggy, engine: ray, workers: 0}")
    with pytest.raises(RecipeError, match=r"tasks\.textures_foggy\.data\.workers: must be positive, got 0$"):
        load_recipe(write(tmp_path, text))
    assert load_recipe(write(tmp_path, text.replace("workers: 0", "workers: 1"))).tasks[1].data.workers == 1
