"""config.py: the recipes, the flags' resolution and --resume's steering."""
import pytest

import config


@pytest.mark.parametrize("recipe", sorted(config.RECIPES))
def test_each_recipe_sets_its_flags_and_the_command_line_wins(recipe):
    args = config.parse(["--recipe", recipe, "--data", "somewhere"])
    for k, v in config.RECIPES[recipe].items():
        assert getattr(args, k) == (v.split(",") if k.endswith("_stories") else v), k
    assert config.parse(["--recipe", recipe, "--data", "somewhere", "--lr", "0.123"]).lr == 0.123
