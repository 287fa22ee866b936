"""Every recipe parses into the schema; overrides, inheritance and errors behave as documented."""

import os
import subprocess
import sys

import pytest
import yaml

from finetune import config
from finetune.config.pretrain import PretrainRecipe
from finetune.config.sft import SFTRecipe
from finetune.errors import RecipeError

from .conftest import REPO

SCHEMAS = {"pretrain": PretrainRecipe, "sft": SFTRecipe}
RECIPES = [(stage, name) for stage in SCHEMAS for name in config.available(stage)]


def load(*argv):
    return config.load(list(argv), SFTRecipe)


def test_the_documented_recipes_exist_in_their_stage_folders():
    assert set(config.available("sft")) >= {"alpaca", "alpaca-qlora", "dolly-ja", "oasst-ja", "quickstart"}
    assert set(config.available("pretrain")) >= {
        "pretrain-tiny",
        "pretrain-120m",
        "pretrain-340m",
        "tinyllama-1b",
        "cpt-ja",
    }
    assert sorted(p.name for p in (REPO / "recipes").iterdir()) == [
        "accelerate",
        "dpo",
        "eval",
        "pretrain",
        "sft",
        "study",
    ]


@pytest.mark.parametrize(("stage", "name"), RECIPES, ids=[f"{s}/{n}" for s, n in RECIPES])
def test_every_recipe_parses_into_its_stage_schema(stage, name):
    schema = SCHEMAS[stage]
    cfg, file = config.load([f"recipe={name}"], schema)
    assert isinstance(cfg, schema) and file.parent.name == stage
    assert cfg.data.corpora if schema is PretrainRecipe else cfg.data.datasets
    text = file.read_text(encoding="utf-8")
    assert text.startswith("#") and f"{config.SCRIPTS[stage]} recipe={name}" in text.split("\n\n")[0]
    assert "# Data" in text or "defaults:" in text


def test_the_logging_and_checkpoint_knobs_have_one_name_in_every_stage():
    knobs = {"output_dir", "log_every", "eval_every", "save_every", "keep_checkpoints", "seed", "precision"}
    for schema in SCHEMAS.values():
        assert knobs <= {k.split(".", 1)[1] for k in config.schema_keys(schema) if k.startswith("training.")}
    for stage, name in RECIPES:  # a `# Logging ...` comment sits over the keys it names, inside their section
        text = (REPO / "recipes" / stage / f"{name}.yaml").read_text()
        assert "\n# Logging" not in text, name
        if "log_every" in text:
            assert "  # Logging and checkpoints\n" in text, name


def test_a_recipe_of_another_stage_names_the_right_script():
    with pytest.raises(
        RecipeError,
        match=r"'pretrain-tiny' is a recipe of the pretrain stage .*finetune/pretrain.py recipe=pretrain-tiny",
    ):
        load("recipe=pretrain-tiny")
    with pytest.raises(RecipeError, match=r"finetune/sft.py recipe=quickstart"):
        config.load(["recipe=quickstart"], PretrainRecipe)


def test_an_old_knob_name_is_told_the_new_one():
    with pytest.raises(RecipeError, match=r"'training.save_steps': it is now 'training.save_every'"):
        load("recipe=quickstart", "training.save_steps=10")


def test_an_interpolation_follows_an_override(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(
        "data:\n  datasets:\n    - {path: x.jsonl, format: dolly}\n  max_length: 256\n"
        "training:\n  output_dir: outputs/len-${data.max_length}\n"
    )
    cfg, _ = load(f"recipe={path}", "data.max_length=512")
    assert cfg.training.output_dir == "outputs/len-512"
    with pytest.raises(RecipeError, match="could not resolve an interpolation"):
        load(f"recipe={path}", "training.output_dir=${data.nothing}")


@pytest.mark.parametrize("path", sorted((REPO / "recipes" / "accelerate").glob("*.yaml")), ids=lambda p: p.stem)
def test_accelerate_configs_are_valid(path):
    cfg = yaml.safe_load(path.read_text())
    assert cfg["distributed_type"] in {"NO", "MULTI_GPU", "FSDP", "DEEPSPEED"}
    assert cfg["num_processes"] >= 1


def test_accelerate_configs_cover_the_documented_setups():
    names = {p.stem for p in (REPO / "recipes" / "accelerate").glob("*.yaml")}
    assert {"single_gpu", "ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"} <= names


def test_inheritance_changes_only_what_the_child_sets():
    parent, _ = load("recipe=alpaca")
    child, _ = load("recipe=alpaca-qlora")
    assert child.quantization.load_in_4bit and not parent.quantization.load_in_4bit
    assert child.data == parent.data and child.lora == parent.lora
    assert child.training.output_dir == "outputs/alpaca-qlora"
    assert child.training.learning_rate == parent.training.learning_rate


def test_overrides_reach_nested_keys_and_list_items():
    cfg, _ = load(
        "recipe=quickstart",
        "training.learning_rate=1e-4",
        "data.datasets.0.max_samples=5",
        "lora.target_modules=[q_proj,v_proj]",
        "~training.eval_every",
    )
    assert cfg.training.learning_rate == pytest.approx(1e-4)
    assert cfg.data.datasets[0].max_samples == 5
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]


def test_misspelt_key_names_the_closest_valid_one():
    with pytest.raises(RecipeError, match=r"unknown key 'training.learning_rat'.*'training.learning_rate'"):
        load("recipe=quickstart", "training.learning_rat=1e-4")
    with pytest.raises(RecipeError, match=r"Did you mean 'training.micro_batch_size'"):
        load("recipe=quickstart", "micro_batch_sise=2")
    with pytest.raises(RecipeError, match=r"Did you mean 'data.datasets.0.max_samples'"):
        load("recipe=quickstart", "data.datasets.0.maxsamples=3")


def test_wrong_type_names_the_key_and_the_type_expected():
    with pytest.raises(RecipeError, match=r"'training.micro_batch_size' expects int, got 'four'"):
        load("recipe=quickstart", "training.micro_batch_size=four")
    with pytest.raises(RecipeError, match=r"'data.prompt_style' expects one of 'alpaca'"):
        load("recipe=quickstart", "data.prompt_style=vicuna")


def test_unknown_recipe_suggests_the_closest():
    with pytest.raises(RecipeError, match="Did you mean 'quickstart'"):
        load("recipe=quickstar")


def test_bad_values_are_refused_with_the_key():
    with pytest.raises(RecipeError, match="lora.r must be positive"):
        load("recipe=quickstart", "lora.r=0")
    with pytest.raises(RecipeError, match=r"warmup_ratio is a share of the steps"):
        load("recipe=quickstart", "training.warmup_ratio=100")
    with pytest.raises(RecipeError, match="needs lora.method=lora"):
        load("recipe=alpaca-qlora", "lora.method=full")


def test_a_recipe_file_path_works(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("data:\n  datasets:\n    - {path: x.jsonl, format: dolly}\ntraining:\n  num_epochs: 2\n")
    cfg, file = load(f"recipe={path}")
    assert cfg.data.datasets[0].format == "dolly" and cfg.training.num_epochs == 2.0 and file == path


def test_printed_recipe_round_trips_into_the_schema():
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run(
        [sys.executable, "-m", "finetune.sft", "recipe=alpaca-qlora", "lora.r=8", "print_recipe=true"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        check=True,
    ).stdout
    cfg = config.build(SFTRecipe, yaml.safe_load(out))
    assert cfg.lora.r == 8 and cfg.quantization.load_in_4bit and cfg.print_recipe


def accelerate_launch(*args, **env):
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    return subprocess.run(
        [accelerate, "launch", "--num_processes", "1", "finetune/sft.py", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        env=dict(os.environ, HF_HUB_OFFLINE="1", **env),
    )


def test_typo_through_accelerate_launch_is_one_clear_line():
    proc = accelerate_launch("recipe=quickstart", "training.learning_rat=1e-4")
    assert proc.returncode != 0
    assert "Did you mean 'training.learning_rate'" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_unreachable_hub_switches_to_the_cache_and_fails_fast(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # loopback, nothing listens: as unreachable as an offline machine
    proc = subprocess.run(
        [sys.executable, "-m", "finetune.sft", "recipe=alpaca", f"training.output_dir={tmp_path}"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Hub is unreachable; using the local cache only" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: could not load")


def test_hub_recipe_offline_fails_with_guidance_not_a_traceback(tmp_path):
    proc = accelerate_launch("recipe=alpaca", f"training.output_dir={tmp_path}")
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("error: could not load") and "Hugging Face Hub" in err
    assert "model.name_or_path=" in err and "data.datasets=" in err
    assert "Traceback" not in proc.stderr + proc.stdout
