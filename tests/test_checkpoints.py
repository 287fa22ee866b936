"""finetune/checkpoints.py on its own (no training): which checkpoints count, rotation, and the resume checks.
The stages' end-to-end behaviour (kill, resume, refuse) is tested in test_sft.py and test_pretrain.py."""

import pytest

from finetune import checkpoints
from finetune.errors import RecipeError

RECIPE = {"data": {"datasets": [{"path": "a.jsonl"}]}, "training": {"learning_rate": 1e-3, "log_every": 5}}


def make(out, step, complete=True, recipe=RECIPE):
    folder = out / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    if complete:
        checkpoints.mark_complete(folder, recipe, {"processes": 1})
    return folder


def test_only_marked_checkpoints_count_and_the_newest_is_by_step_not_by_name(tmp_path):
    make(tmp_path, 9)
    make(tmp_path, 10)
    make(tmp_path, 12, complete=False)
    assert [d.name for d in checkpoints.complete(tmp_path)] == ["checkpoint-9", "checkpoint-10"]
    assert checkpoints.latest(tmp_path).name == "checkpoint-10"


def test_rotation_keeps_the_newest_complete_and_clears_interrupted_saves(tmp_path):
    for step in (2, 4, 6):
        make(tmp_path, step)
    make(tmp_path, 5, complete=False)  # a save a kill interrupted, older than the newest complete one
    make(tmp_path, 8, complete=False)  # being written now: never touched
    checkpoints.rotate(tmp_path, keep=1)
    assert sorted(d.name for d in tmp_path.iterdir()) == ["checkpoint-6", "checkpoint-8"]
    checkpoints.rotate(tmp_path, keep=None)
    assert sorted(d.name for d in tmp_path.iterdir()) == ["checkpoint-6", "checkpoint-8"]


def test_start_refuses_a_used_folder_without_resume_and_resumes_the_newest(tmp_path):
    assert checkpoints.start(tmp_path / "new", resume=True, recipe=RECIPE) is None
    make(tmp_path, 4)
    with pytest.raises(RecipeError, match="already holds checkpoints .*add resume=true"):
        checkpoints.start(tmp_path, resume=False, recipe=RECIPE)
    assert checkpoints.start(tmp_path, resume=True, recipe=RECIPE, info={"processes": 1}).name == "checkpoint-4"


def test_start_names_every_changed_key_but_lets_logging_change(tmp_path):
    make(tmp_path, 4)
    changed = {"data": {"datasets": [{"path": "b.jsonl"}, {"path": "c.jsonl"}]}, "training": {"learning_rate": 1e-3}}
    with pytest.raises(RecipeError) as e:
        checkpoints.start(tmp_path, resume=True, recipe=changed, info={"processes": 1})
    assert "data.datasets.0.path was 'a.jsonl', now 'b.jsonl'" in str(e.value)
    assert "data.datasets.length was 1, now 2" in str(e.value)
    assert "log_every" not in str(e.value)
    with pytest.raises(RecipeError, match="processes was 1, now 2"):
        checkpoints.start(tmp_path, resume=True, recipe=RECIPE, info={"processes": 2})
    relogged = {**RECIPE, "training": {"learning_rate": 1e-3, "log_every": 1, "keep_checkpoints": 5}}
    assert checkpoints.start(tmp_path, resume=True, recipe=relogged, info={"processes": 1}) is not None


def test_checkpoints_of_an_older_layout_are_refused_not_silently_restarted(tmp_path):
    (tmp_path / "checkpoints" / "step-00000010").mkdir(parents=True)
    with pytest.raises(RecipeError, match="older version of the suite"):
        checkpoints.start(tmp_path, resume=True, recipe=RECIPE)
    other = tmp_path / "sft"
    (other / "checkpoint-3").mkdir(parents=True)
    (other / "checkpoint-3" / checkpoints.COMPLETE).touch()  # marked, but by a version that saved no recipe
    with pytest.raises(RecipeError, match="holds no recipe.yaml"):
        checkpoints.start(other, resume=True, recipe=RECIPE)


def test_train_loss_weights_each_logged_loss_by_the_steps_it_covers():
    history = [
        {"loss": 4.0, "step": 1},
        {"loss": 2.0, "step": 4},
        {"eval_loss": 9.0, "step": 4},
        {"loss": 1.0, "step": 5},
    ]
    assert checkpoints.train_loss(history) == pytest.approx((4.0 + 3 * 2.0 + 1.0) / 5)
    assert checkpoints.train_loss([]) is None
