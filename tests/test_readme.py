"""The README, the Makefile, the recipes' headers and the entry scripts' docstrings name only what exists: every
`recipe=NAME` is a recipe of the stage its script reads and parses with the keys the command gives; every script,
module, benchmark, accelerate config and make target a command names exists; the README's layout is the tree."""

import ast
import re
import shlex

import pytest

from finetune import config
from finetune.config.dpo import DPORecipe
from finetune.config.eval import EvalRecipe
from finetune.config.loading import SCRIPTS, stage_of
from finetune.config.pretrain import PretrainRecipe
from finetune.config.sft import SFTRecipe
from finetune.config.study import StudyRecipe

from .conftest import REPO

SCHEMAS = {
    "pretrain": PretrainRecipe,
    "sft": SFTRecipe,
    "dpo": DPORecipe,
    "eval": EvalRecipe,
    "study": StudyRecipe,
}
STAGE_OF_SCRIPT = {script: stage for stage, script in SCRIPTS.items()}
PLACEHOLDERS = {"NAME", "path/to/file.yaml", "path/to.yaml"}


def _docstring(path):
    return ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""


def sources() -> dict[str, str]:
    """Every text a user copies commands from."""
    texts = {"README.md": (REPO / "README.md").read_text(encoding="utf-8"), "Makefile": (REPO / "Makefile").read_text()}
    scripts = sorted((REPO / "finetune").glob("*.py")) + sorted((REPO / "bench").glob("*.py"))
    for path in scripts + sorted((REPO / "eval").glob("*.py")):
        texts[str(path.relative_to(REPO))] = _docstring(path)
    for path in sorted((REPO / "recipes").glob("*/*.yaml")):
        if path.parent.name != "accelerate":  # a recipe's header: the comment lines before its first key
            header = "\n".join(line[1:] for line in path.read_text().splitlines() if line.startswith("#"))
            texts[str(path.relative_to(REPO))] = header
    return texts


def command_lines(text: str) -> list[str]:
    """Lines that run something, with shell continuations joined and comments dropped."""
    text = text.replace("\\\n", " ")
    found = []
    for line in text.splitlines():
        line = line.strip().strip("`")
        # `make X` where a command is written (a line's start, after a prompt, a comment mark, a backtick or an
        # opening parenthesis), not the verb in prose ("does a large set make continued pretraining unnecessary?")
        m = re.search(
            r"(accelerate launch|python3? |\$\(LAUNCH\)|\$\(BIN\)/python|(?:^|(?<=[#$`(])|(?<=[#$`(] ))make )", line
        )
        if m:
            found.append(line[m.start() :].split("  #")[0].split(" # ")[0])
    return found


COMMANDS = [(name, cmd) for name, text in sources().items() for cmd in command_lines(text)]


@pytest.mark.parametrize(("where", "command"), COMMANDS, ids=[f"{w}:{c[:60]}" for w, c in COMMANDS])
def test_every_command_names_what_exists_and_its_recipe_parses(where, command):
    try:
        words = shlex.split(command)
    except ValueError:  # an unbalanced quote in prose: take the words as they are
        words = command.split()
    for word in words:
        if re.fullmatch(r"(finetune|bench|eval)/[\w/]+\.py", word):
            assert (REPO / word).is_file(), f"{where}: {word} does not exist"
        if re.fullmatch(r"recipes/accelerate/[\w-]+\.yaml", word):
            assert (REPO / word).is_file(), f"{where}: {word} does not exist"
    if m := re.search(r"-m (finetune\.\w+)", command):
        assert (REPO / (m.group(1).replace(".", "/") + ".py")).is_file(), f"{where}: no module {m.group(1)}"
    if m := re.match(r"make ([\w-]+)", command):
        targets = re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), re.MULTILINE)
        assert m.group(1) in targets, f"{where}: no make target {m.group(1)}"
    script = next((w for w in words if w in STAGE_OF_SCRIPT), None)
    name = next((w.split("=", 1)[1] for w in words if w.startswith("recipe=")), None)
    if script and name and name not in PLACEHOLDERS:
        argv = [w for w in words[words.index(script) + 1 :] if "=" in w and not w.startswith("-")]
        argv = [w for w in argv if not w.startswith("model.name_or_path=/path")]
        cfg, file = config.load(argv, SCHEMAS[STAGE_OF_SCRIPT[script]])
        assert file.parent.name == STAGE_OF_SCRIPT[script], f"{where}: {command}"


def test_every_recipe_named_in_prose_exists():
    for where, text in sources().items():
        for name in re.findall(r"(?<!\w)recipe=([\w.-]+)", text):
            if name not in PLACEHOLDERS and not name.startswith("path"):
                assert stage_of(name), f"{where} names recipe={name}, which no stage folder holds"


def test_the_readme_layout_is_the_tree():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    layout = readme.split("## Layout", 1)[1].split("```")[1]
    modules = {p.name for p in (REPO / "finetune").glob("*.py") if not p.name.startswith("_")}
    modules |= {p.name + "/" for p in (REPO / "finetune").iterdir() if p.is_dir() and not p.name.startswith("_")}
    named = set(re.findall(r"\b([\w]+\.py|[\w]+/)", layout))
    missing = sorted(m for m in modules - {"__init__.py"} if m not in named)
    assert not missing, f"README layout does not mention {missing}"
    for module in sorted(n for n in named if n.endswith(".py")):
        found = [p for d in ("finetune", "eval", "bench") for p in REPO.glob(f"{d}/**/{module}")]
        assert found or (REPO / module).exists(), f"layout names {module}"
    for folder in ("recipes/", "data/", "eval/", "bench/", "tests/"):
        assert folder in layout and (REPO / folder).is_dir()
    stages = sorted(p.name for p in (REPO / "recipes").iterdir() if p.is_dir())
    assert all(f"{s}/" in layout for s in stages), stages
