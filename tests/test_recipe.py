import pytest

from debias.cli import main
from debias.errors import RecipeError
from debias.recipe import apply_overrides, load_recipe, parse_override, recipe_from_dict, recipe_to_toml

DEFAULT = "recipes/colored_digits.toml"


def test_default_recipe_loads_with_contract_keys():
    r = load_recipe(DEFAULT, ["seed=3", "data.classes=[1, 7]", 'data.colors=["blue", "yellow"]', "data.bias=0.5",
                              "model.name=resnet10t", "train.method=erm", "train.epochs=2"])
    assert (r.seed, r.data.classes, r.data.colors, r.data.bias) == (3, [1, 7], ["blue", "yellow"], 0.5)
    assert (r.model.name, r.train.method, r.train.epochs) == ("resnet10t", "erm", 2)


def test_concept_recipe_is_the_default_with_the_measured_settings():
    """recipes/colored_digits_concept.toml must stay the setting its figures were measured with: the default recipe
    run by tools/sweep.py with these overrides (docs/RESULTS.md, the three-term row)."""
    swept = load_recipe(DEFAULT, ["train.method=concept", "concept.source=graft", "data.bias=1.0", "concept.weight=1",
                                  "concept.adversary_weight=1", "concept.pseudo_label_weight=3", "train.epochs=16",
                                  "concept.unlabeled_batch_size=128", "concept.joint_decay=0.875",
                                  # the 8-epoch budget at batch 64, which these figures ran on
                                  "train.batch_size=64", "train.label_smoothing=0.0"])
    assert load_recipe("recipes/colored_digits_concept.toml") == swept


def test_default_recipe_is_the_swept_setting():
    """The default recipe's budget and `concept` section are the setting of docs/RESULTS.md section 2's sweep
    (its --method concept is recipes/colored_digits_concept_batch128.toml, the setting's thirty-seed runs)."""
    r = load_recipe(DEFAULT)
    assert (r.train.method, r.train.epochs, r.train.batch_size, r.train.label_smoothing) == ("erm", 32, 128, 0.05)
    c = r.concept
    assert (c.source, c.weight, c.adversary_weight, c.pseudo_label_weight, c.unlabeled_batch_size, c.joint_decay) == (
        "graft", 1.0, 1.0, 3.0, 40, 0.875)
    assert load_recipe(DEFAULT, ["train.method=concept"]) == load_recipe("recipes/colored_digits_concept_batch128.toml")


def test_batch128_concept_recipe_is_the_default_with_the_measured_settings():
    """recipes/colored_digits_concept_batch128.toml likewise: the sweep command of its figures (docs/RESULTS.md,
    "A training batch of 128"), the step goal's setting."""
    swept = load_recipe(DEFAULT, ["train.method=concept", "concept.source=graft", "data.bias=1.0", "concept.weight=1",
                                  "concept.adversary_weight=1", "concept.pseudo_label_weight=3",
                                  "concept.joint_decay=0.875", "concept.unlabeled_batch_size=40",
                                  "train.batch_size=128", "train.epochs=32", "train.label_smoothing=0.05"])
    assert load_recipe("recipes/colored_digits_concept_batch128.toml") == swept


def test_override_values_are_toml_literals():
    assert parse_override("data.bias=0.5") == (["data", "bias"], 0.5)
    assert parse_override('data.colors=["a", "b"]') == (["data", "colors"], ["a", "b"])
    assert parse_override("model.name=RN50-quickgelu") == (["model", "name"], "RN50-quickgelu")
    assert apply_overrides({"data": {"bias": 1.0}}, ["data.bias=0.2"]) == {"data": {"bias": 0.2}}


def test_resolved_recipe_round_trips(tmp_path):
    r = load_recipe(DEFAULT, ["data.bias=0.25", 'concepts.captions.color=["a red digit.", "a green digit."]'])
    path = tmp_path / "recipe.toml"
    path.write_text(recipe_to_toml(r))
    assert load_recipe(path) == r
    # strings with what TOML must escape (a newline, a tab, a quote, a backslash, another control character):
    # the saved recipe.toml a resumed run checks itself against must read back as the same recipe
    odd = load_recipe(DEFAULT, ['concepts.color_template="a photo of a\\n{color} \\"digit\\"\\t\\\\ \\u0001."'])
    assert "\n" in odd.concepts.color_template and "\x01" in odd.concepts.color_template
    path.write_text(recipe_to_toml(odd))
    assert load_recipe(path) == odd


@pytest.mark.parametrize("override, needle", [
    ("data.bias=1.5", "data.bias = 1.5"),
    ("data.bias=\"high\"", "data.bias = 'high'"),
    ("data.biass=0.5", "did you mean 'bias'"),
    ("train.epochs=0", "train.epochs = 0"),
    ('data.colors=["red", "grean"]', "'grean' is not in the palette"),
    ("data.classes=[5, 12]", "12 is not a digit"),
    ("concepts.spurious=[\"shape\"]", "concept 'shape' is not defined"),
    ("graft.stages=[\"layer5\"]", "'layer5' is not a CLIP stage"),
    ("matching.selection=\"best\"", "matching.selection = 'best'"),
    ("concepts.captions.color=[]", "concepts.captions.color = []"),
    ("data.split_fractions.train=0.9", "sum to"),
])
def test_bad_values_name_key_and_value(override, needle):
    with pytest.raises(RecipeError) as err:
        load_recipe(DEFAULT, [override])
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_syntax_error_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("seed = 0\n[data\nbias = 1\n")
    with pytest.raises(RecipeError, match=r"bad.toml.*line 2"):
        load_recipe(bad)


def test_cli_bad_recipe_exit_2_and_nothing_written(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", DEFAULT, "--set", "data.bias=2", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert "data.bias = 2" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_recipe_from_dict_defaults():
    r = recipe_from_dict({})
    assert r.data.classes == [5, 8] and r.data.colors == ["red", "green"] and r.data.bias == 1.0


def test_recipe_module_imports_no_torch():
    """``debias.recipe`` imports no torch or timm: the methods' sections come from their modules (through the
    registry in ``debias.methods``) only when a recipe is built."""
    import subprocess
    import sys

    code = ("import debias.recipe, debias.methods, sys; "
            "assert 'torch' not in sys.modules and 'timm' not in sys.modules, sorted(sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_method_sections_keep_their_keys_and_every_method_is_registered():
    """The methods' sections are defined in their modules and read back into the recipe under the same names; an
    unknown method names its key."""
    from debias.methods import METHODS, config_class

    r = load_recipe(DEFAULT, ["concept.weight=2", "jtt.upweight=5", "groupdro.eta=0.1", "augment.grayscale_p=0.5"])
    assert (r.concept.weight, r.jtt.upweight, r.groupdro.eta, r.augment.grayscale_p) == (2.0, 5.0, 0.1, 0.5)
    assert {name for name in METHODS if config_class(name) is not None} == {"concept", "groupdro", "jtt", "augment",
                                                                           "leace"}
    assert sorted(METHODS) == ["augment", "concept", "erm", "groupdro", "jtt", "leace", "reweight"]
    with pytest.raises(RecipeError, match=r"train.method = 'jt': expected one of .*did you mean 'jtt'"):
        load_recipe(DEFAULT, ["train.method=jt"])


def test_removed_concept_keys_load_at_the_value_every_run_has_and_refuse_any_other(tmp_path):
    """A run directory's recipe.toml written while ``[concept]`` still had graft_read, temperature, dependence,
    adversary_memory and stream_loss_rows loads as the same recipe when they hold the values every run now trains
    with; another value names the key."""
    from debias.recipe import recipe_differences, retired_keys

    recipe = load_recipe(DEFAULT)
    old = recipe_to_toml(recipe).replace("[concept]\n", "[concept]\n" + "".join(
        f"{key.split('.')[1]} = {value!r}\n".replace("'", '"') for key, value in retired_keys().items()))
    assert 'graft_read = "match"' in old and "stream_loss_rows = 0" in old
    (tmp_path / "recipe.toml").write_text(old)
    assert load_recipe(tmp_path / "recipe.toml") == recipe
    assert recipe_differences(tmp_path, recipe) == []
    for override, shown in (("concept.adversary_memory=7", "0"), ('concept.graft_read="step"', '"match"')):
        with pytest.raises(RecipeError, match=f"this key was removed from the recipe; only {shown}"):
            load_recipe(DEFAULT, [override])
