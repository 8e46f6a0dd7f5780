"""config.py: the recipes, the flags' resolution and --resume's steering."""
import pytest

import config
import flags
import preflight


@pytest.mark.parametrize("recipe", sorted(flags.RECIPES))
def test_each_recipe_sets_its_flags_and_the_command_line_wins(recipe):
    args = config.parse(["--recipe", recipe, "--data", "somewhere"])
    recorded = config.flags_record(args)  # the flags as config.json keeps them
    for k, v in flags.RECIPES[recipe].items():
        assert recorded[k] == (v.split(",") if k.endswith("_stories") else v), k
    assert config.parse(["--recipe", recipe, "--data", "somewhere", "--lr", "0.123"]).lr == 0.123


# every value a recipe sets, as docs/training.md's table names it (the authors' code by file and
# line, or braintune's own choice)
NAMED = {
    "moussa2025": dict(model="hubert_base", layer="12", history=5, lora_rank=0, loss="mse", l2=0.0,
                       lr=5e-5, head_lr=1e-4, batch_size=128, epochs=21, patience=30, warmup=5,
                       schedule="moussa2025", clip=0.0, backbone_dropout=0.0, pool="mean",
                       roi="nc0.4", val_stories=["stagefright"], protocol="moussa2025",
                       select="6,11,21", tune="feature-projection", head_input="raw",
                       precision="fp32",
                       train_stories=("souls howtodraw alternateithicatom hangtime "
                                      "swimmingwithastronauts eyespy itsabox "
                                      "myfirstdaywiththeyankees legacy theclosetthatateeverything "
                                      "haveyoumethimyet thatthingonmyarm undertheinfluence avatar "
                                      "tildeath naked fromboyhoodtofatherhood adollshouse "
                                      "odetostepfather adventuresinsayingyes sloth exorcism buck "
                                      "inamoment").split()),
    "brainwavlm": dict(model="wavlm_base_plus", layer="9", history=4, lora_rank=4, lora_alpha=4.0,
                       lora_dropout=0.0, lora_targets="qkv", loss="corr", lr=1e-4, head_lr=1e-4,
                       epochs=20, patience=20, warmup=0.0, clip=0.0, select="refit",
                       bottleneck=100, val_stories=["fromboyhoodtofatherhood", "stagefright"],
                       protocol="brainwavlm", frame="first", test_skip=0, lag=1,
                       mask_time_prob=0.05, mask_time_length=10, mask_time_min_masks=2,
                       layer_drop=0.05, precision="fp32"),
}


@pytest.mark.parametrize("recipe", sorted(NAMED))
def test_a_papers_recipe_sets_what_the_docs_table_names(recipe):
    import os
    args = config.parse(["--recipe", recipe, "--data", "somewhere"])
    recorded = config.flags_record(args)  # the flags as config.json keeps them
    assert {k: recorded[k] for k in NAMED[recipe]} == NAMED[recipe]
    assert set(flags.RECIPES[recipe]) == set(NAMED[recipe])  # nothing set that is not named
    assert args.patience >= args.epochs  # never stopped before the paper's epoch count
    docs = open(os.path.join(os.path.dirname(__file__), "..", "docs", "training.md")).read()
    table = docs[docs.index("Where each recipe's values come from"):]
    rows = [line for line in table.splitlines() if line.startswith(f"| `{recipe}` | `--")]
    for k in NAMED[recipe]:
        assert any(f"`--{k.replace('_', '-')}" in row for row in rows), k
    if recipe == "moussa2025":
        assert len(args.train_stories) == 24 and "stagefright" not in args.train_stories
        assert args.protocol.frame == "last"
    else:
        assert args.protocol.frame == "first" and args.protocol.test_skip == 0


def test_clip_0_means_none_and_a_negative_clip_is_refused(capsys):
    assert config.parse(["--clip", "0"]).clip == 0 and config.parse(["--clip", "2"]).clip == 2
    assert config.parse(["--recipe", "li2024"]).clip == 1.0  # the flag's default
    assert config.parse([]).clip == 0  # the demo recipe's: tiny's steps unclipped
    with pytest.raises(SystemExit):
        config.parse(["--clip", "-1"])
    assert capsys.readouterr().err == ("error: argument --clip: must be a finite number >= 0 (got "
                                       "'-1')\n")


def test_the_new_flags_default_to_what_ran_before_and_bad_values_are_refused(tmp_path):
    args = config.parse([])
    assert (args.pool, args.schedule, args.select, args.protocol.frame, args.train_stories) == (
        "bins", "warmup", "val", "last", None)
    listed = tmp_path / "stories.txt"
    listed.write_text("souls\n\navatar\n")
    assert config.parse(["--train-stories", str(listed)]).train_stories == ["souls", "avatar"]
    assert config.parse(["--train-stories", "souls,avatar"]).train_stories == ["souls", "avatar"]
    for given, message in (
            (["--roi", "nc1.5"], "--roi nc1.5: expected ncT with a noise-ceiling threshold"),
            (["--roi", "nc0.4.1"], "--roi nc0.4.1: expected ncT"),
            (["--train-stories", "souls,souls"], "--train-stories souls,souls: expected stories"),
            (["--frame", "first"], "--frame: a setting of moussa2025 or brainwavlm")):
        with pytest.raises(ValueError, match=message):
            config.parse(given)
    assert config.parse(["--protocol", "brainwavlm", "--frame", "first"]).protocol.frame == "first"


def test_the_dataset_is_listed_and_read_under_the_runs_own_timing(demo):
    """train and eval list and read a run's subjects through one place, with its --tr,
    --trim-start and --sound-start (eval once checked a run's dataset under the defaults)."""
    late = config.parse(["--data", demo, "--sound-start", "400"])
    with pytest.raises(ValueError, match="before the audio starts"):
        preflight.list_subjects(late, ["S01"])
    args = config.parse(["--data", demo, "--trim-start", "9"])
    (listing,) = preflight.list_subjects(args, ["S01"])
    ds, _ = config.load_subjects(args, ["S01"])
    assert ds[0].windows["train"].timing["trim_start"] == 9
    assert listing.stories["train"] == ds[0].stories["train"]
