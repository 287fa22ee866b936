"""Hub pushes (finetune/hub.py, finetune/card.py, finetune/push.py): staged adapters and merged models load and give
the run's logits (LoRA and QLoRA), cards parse back and name the real base and data, uploads go through the real
huggingface_hub client to a local stand-in for the Hub (tests/hub_server.py), the token never leaves the
Authorization header, and offline a push is one clear message that leaves the run as it was."""

import hashlib
import json
import subprocess
import sys

import pytest
import torch

from finetune import hub, modeling, push, sft
from finetune.config.shared import HubConfig
from finetune.errors import HubError, RecipeError

from .conftest import REPO, sft_recipe, write_jsonl

TOKEN = "hf_plantedTokenXy7Qz0123456789abcdefABCDEF"  # not a real token: planted to be looked for


def numbers_file(folder):
    return write_jsonl(
        folder / "sft.jsonl",
        [{"instruction": f"Count to {i}.", "input": "", "output": " ".join(map(str, range(i)))} for i in range(2, 30)],
    )


@pytest.fixture(scope="module")
def lora_run(micro_base, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    sft.train(sft_recipe(micro_base, numbers_file(tmp), tmp / "run", "training.max_steps=4", "lora.dropout=0.0"))
    return tmp / "run"


@pytest.fixture(scope="module")
def qlora_run(micro_base, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qlora")
    sft.train(
        sft_recipe(micro_base, numbers_file(tmp), tmp / "run", "quantization.load_in_4bit=true", "training.max_steps=3")
    )
    return tmp / "run"


def ids():
    return torch.tensor([[1, 15, 27, 300, 42, 7, 99, 5]])


def logits_of(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids()).logits.float()


def unmerged_logits(base, adapter) -> torch.Tensor:
    """The fp32 base with the adapter applied by PEFT, not merged: what a merged model must reproduce."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return logits_of(PeftModel.from_pretrained(model, str(adapter)))


def tree_digest(folder) -> dict:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


@pytest.mark.parametrize("run_name", ["lora_run", "qlora_run"])
def test_staged_adapter_and_merged_model_load_and_give_the_runs_logits(run_name, micro_base, request):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = request.getfixturevalue(run_name)
    before = tree_digest(run)
    staged = dict(hub.stage(HubConfig(model_id="me/tiny", what="both"), run))
    assert set(staged) == {"me/tiny", "me/tiny-merged"}
    adapter, merged = staged["me/tiny"], staged["me/tiny-merged"]
    expected = unmerged_logits(micro_base, run)
    plain = logits_of(AutoModelForCausalLM.from_pretrained(micro_base, dtype=torch.float32))
    assert not torch.allclose(expected, plain, atol=1e-3)  # the adapter changes the logits: a lost merge would show

    base = AutoModelForCausalLM.from_pretrained(micro_base, dtype=torch.float32)
    assert torch.equal(logits_of(PeftModel.from_pretrained(base, str(adapter))), expected)
    assert not any(p.name.startswith("checkpoint") or p.name == "runs" for p in adapter.iterdir())

    model = AutoModelForCausalLM.from_pretrained(merged)
    assert not hasattr(model, "peft_config")  # a plain transformers model
    assert next(model.parameters()).dtype == torch.float32  # after QLoRA too: the base reloaded, not 4-bit
    torch.testing.assert_close(logits_of(model), expected, atol=1e-4, rtol=1e-4)
    assert (merged / "model.safetensors").is_file() and (merged / "generation_config.json").is_file()
    assert AutoTokenizer.from_pretrained(merged).eos_token == AutoTokenizer.from_pretrained(run).eos_token
    if run_name == "qlora_run":
        assert "reloaded in float32 (not 4-bit)" in (merged / "README.md").read_text()
    assert tree_digest(run) == before  # the run's own files are only read


def test_large_merged_models_are_sharded(lora_run, micro_base):
    from transformers import AutoModelForCausalLM

    staged = dict(hub.stage(HubConfig(model_id="me/tiny", what="merged", max_shard_size="200KB"), lora_run))
    folder = staged["me/tiny"]
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    torch.testing.assert_close(
        logits_of(AutoModelForCausalLM.from_pretrained(folder)),
        unmerged_logits(micro_base, lora_run),
        atol=1e-4,
        rtol=1e-4,
    )


def test_the_card_parses_back_and_names_the_real_base_and_data(lora_run, qlora_run, micro_base):
    from huggingface_hub import ModelCard, RepoCard

    cfg = HubConfig(model_id="me/tiny-lora", base_model_id="me/micro-llama", license="apache-2.0")
    folder = dict(hub.stage(cfg, lora_run))["me/tiny-lora"]
    # the staged adapter names its base by Hub ID (AutoPeftModel loads it from the Hub); the run's own file doesn't
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == "me/micro-llama"
    assert json.loads((lora_run / "adapter_config.json").read_text())["base_model_name_or_path"] == str(micro_base)
    card = ModelCard.load(folder / "README.md")
    assert RepoCard.load(folder / "README.md").data.to_dict() == card.data.to_dict()
    data = card.data
    assert data.base_model == "me/micro-llama" and data.license == "apache-2.0"
    assert data.library_name == "peft" and data.pipeline_tag == "text-generation"
    assert {"sft", "lora"} <= set(data.tags) and data.language == ["en"]
    recipe = modeling.run_recipe(lora_run)
    assert str(micro_base) in card.text and recipe.data.datasets[0].path in card.text  # the real base and data
    assert (
        "PeftModel.from_pretrained" in card.text and f"recipe={lora_run}/recipe.yaml hub.push_to_hub=false" in card.text
    )
    assert json.loads((folder / "lineage.json").read_text())["base"] == str(micro_base)

    # an evaluation beside the run that scored it goes in the card, one that scored something else does not
    for name, scored in (("eval-run", lora_run), ("eval-other", micro_base)):
        (lora_run.parent / name).mkdir()
        results = {"models": {"model": {"path": str(scored)}, "compare": {"path": "elsewhere"}}}
        (lora_run.parent / name / "results.json").write_text(json.dumps(results))
        (lora_run.parent / name / "results.md").write_text(f"# Evaluation: {name}\n\n## heldout\n\n| nll | 1.5 |\n")
    card = ModelCard.load(dict(hub.stage(cfg, lora_run))["me/tiny-lora"] / "README.md")
    assert "## Evaluation: eval-run" in card.text and "### heldout" in card.text and "eval-other" not in card.text

    merged = dict(hub.stage(HubConfig(model_id="me/tiny", what="merged"), qlora_run))["me/tiny"]
    data = ModelCard.load(merged / "README.md").data
    assert data.library_name == "transformers" and {"qlora", "merged"} <= set(data.tags)
    assert data.base_model is None  # a local base has no Hub ID unless hub.base_model_id gives one


def test_a_hub_base_and_hub_data_go_in_the_metadata(tmp_path):
    """The card of an adapter whose run names a Hub base and a Hub dataset (faked in the saved recipe: nothing is
    downloaded) lists both in its metadata, and a Japanese dataset makes the card's language ja."""
    from huggingface_hub import ModelCard

    from finetune import config
    from finetune.config.sft import SFTRecipe

    run = tmp_path / "run"
    run.mkdir()
    (run / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "TinyLlama/TinyLlama_v1.1"}))
    recipe = config.load(
        [
            "recipe=alpaca",
            "model.name_or_path=TinyLlama/TinyLlama_v1.1",
            "data.datasets=[{path: kunishou/databricks-dolly-15k-ja, format: dolly}]",
        ],
        SFTRecipe,
    )[0]
    (run / "recipe.yaml").write_text(config.to_yaml(recipe))
    folder = dict(hub.stage(HubConfig(model_id="me/tl-ja"), run))["me/tl-ja"]
    data = ModelCard.load(folder / "README.md").data
    assert data.base_model == "TinyLlama/TinyLlama_v1.1"
    assert data.datasets == ["kunishou/databricks-dolly-15k-ja"] and data.language == ["ja"]


def test_a_whole_model_is_pushed_as_it_is(micro_base):
    from transformers import AutoModelForCausalLM

    folder = dict(hub.stage(HubConfig(model_id="me/micro"), micro_base))["me/micro"]
    assert torch.equal(
        logits_of(AutoModelForCausalLM.from_pretrained(folder)),
        logits_of(AutoModelForCausalLM.from_pretrained(micro_base)),
    )
    with pytest.raises(HubError, match="holds a whole model"):
        hub.stage(HubConfig(model_id="me/micro", what="merged"), micro_base)


def test_push_takes_hub_keys_and_refuses_others(lora_run):
    folder, cfg = push.parse([str(lora_run), "hub.model_id=me/x", "hub.what=merged", "hub.revision=v1"])
    assert folder == lora_run and cfg.model_id == "me/x" and cfg.what == "merged" and cfg.revision == "v1"
    with pytest.raises(RecipeError, match="hub.* keys only"):
        push.parse([str(lora_run), "hub.model_id=me/x", "training.learning_rate=1"])
    with pytest.raises(RecipeError, match="hub.privat"):
        push.parse([str(lora_run), "hub.model_id=me/x", "hub.privat=false"])
    with pytest.raises(RecipeError, match="not a Hub repository ID"):
        push.parse([str(lora_run), "hub.model_id=not a repo"])


def test_dry_run_stages_and_lists_without_uploading(lora_run, capsys):
    staged = push.main([str(lora_run), "hub.model_id=me/tiny", "hub.dry_run=true"])
    out = capsys.readouterr().out
    ((repo, folder),) = staged
    assert f"dry run: {folder} would be uploaded to me/tiny" in out
    for name in ("README.md", "adapter_config.json", "adapter_model.safetensors", "recipe.yaml", "tokenizer.json"):
        assert f"  {name}  (" in out and (folder / name).is_file()


def test_offline_a_push_is_one_message_and_the_run_is_untouched(lora_run):
    import shutil

    shutil.rmtree(lora_run.parent / "run-hub", ignore_errors=True)  # an earlier test's staging
    before = tree_digest(lora_run)
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(lora_run.parent)}
    proc = subprocess.run(
        [sys.executable, "finetune/push.py", str(lora_run), "hub.model_id=me/tiny"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [lines[0]] and lines[0].startswith("error: cannot push to me/tiny: offline mode is on"), proc.stderr
    assert "hub.dry_run=true" in lines[0] and "Traceback" not in proc.stderr
    assert tree_digest(lora_run) == before and not (lora_run.parent / "run-hub").exists()  # refused before staging


def test_a_training_run_that_would_push_offline_is_refused_before_it_trains(micro_base, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    data = numbers_file(tmp_path)
    argv = [
        "recipe=quickstart",
        f"model.name_or_path={micro_base}",
        f"data.datasets=[{{path: '{data}', format: alpaca}}]",
        f"training.output_dir={tmp_path / 'run'}",
        "hub.push_to_hub=true",
        "hub.model_id=me/tiny",
    ]
    with pytest.raises(HubError, match="offline mode is on"):
        sft.main(argv)
    assert not (tmp_path / "run").exists()


def test_a_dpo_run_pushes_with_the_whole_chain(lora_run, micro_base, tmp_path):
    from huggingface_hub import ModelCard
    from transformers import AutoModelForCausalLM

    from finetune import dpo

    from .test_dpo import dpo_recipe, preference_records

    pairs = write_jsonl(tmp_path / "pairs.jsonl", preference_records(24))
    dpo.train(dpo_recipe(lora_run, pairs, tmp_path / "dpo", "training.max_steps=2", "data.eval_size=4"))
    staged = dict(hub.stage(HubConfig(model_id="me/tiny-dpo", what="both"), tmp_path / "dpo"))
    card = ModelCard.load(staged["me/tiny-dpo"] / "README.md")
    assert {"sft", "dpo"} <= set(card.data.tags)
    stages = [
        line.split("|")[2].strip()
        for line in card.text.splitlines()
        if line.startswith("| 1 ") or line.startswith("| 2 ") or line.startswith("| 3 ")
    ]
    assert stages == ["base model", "supervised fine-tuning", "DPO"]
    assert "held-out reward accuracy" in card.text and str(lora_run) in card.text
    # DPO trained the SFT adapter on the SFT run's base: the merged model is that base plus the DPO adapter
    merged = AutoModelForCausalLM.from_pretrained(staged["me/tiny-dpo-merged"])
    torch.testing.assert_close(logits_of(merged), unmerged_logits(micro_base, tmp_path / "dpo"), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(logits_of(merged), unmerged_logits(micro_base, lora_run))  # DPO moved it


@pytest.fixture
def fake_hub(monkeypatch):
    from .hub_server import FakeHub

    with FakeHub(token=TOKEN) as server:
        server.patch_client(monkeypatch)  # HF_TOKEN is the planted token; huggingface_hub's constants point here
        yield server


def files_of(folder) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def assert_token_only_in_authorization(server):
    for request in server.requests:
        for name, value in request.headers.items():
            assert (TOKEN in value) == (name.lower() == "authorization"), (request.method, request.path, name)
        assert TOKEN not in request.path and TOKEN.encode() not in request.body, (request.method, request.path)


def test_a_run_pushes_at_its_end_through_the_real_client(micro_base, tmp_path, fake_hub, caplog, capfd):
    data = numbers_file(tmp_path)
    cfg = sft_recipe(
        micro_base,
        data,
        tmp_path / "run",
        "training.max_steps=2",
        "training.report_to=[tensorboard]",
        "hub.push_to_hub=true",
        "hub.model_id=me/tiny-lora",
        "hub.private=true",
    )
    sft.train(cfg)
    run = tmp_path / "run"
    repo = fake_hub.repos["me/tiny-lora"]
    assert repo["private"] is True
    committed = repo["branches"]["main"]
    assert committed["adapter_model.safetensors"] == (run / "adapter_model.safetensors").read_bytes()
    assert committed["recipe.yaml"] == (run / "recipe.yaml").read_bytes()
    assert {"README.md", "adapter_config.json", "tokenizer.json", "lineage.json", "metrics.json"} <= set(committed)
    assert not any(name.startswith(("checkpoint-", "runs/")) or name.endswith(".bin") for name in committed)
    assert len(fake_hub.commits) == 1 and not fake_hub.unhandled and not fake_hub.errors and not fake_hub.blocked
    assert not (tmp_path / "run-hub").exists()  # uploaded: the staged copy is not kept

    # the planted token: in the Authorization header of the requests, nowhere else
    assert any(TOKEN in r.headers.get("authorization", "") for r in fake_hub.requests)
    assert_token_only_in_authorization(fake_hub)
    for name, content in {**files_of(run), **committed}.items():  # the run, its TensorBoard logs, the upload
        assert TOKEN.encode() not in content, name
    assert any(p.name.startswith("events.out.tfevents") for p in run.rglob("*"))
    out, err = capfd.readouterr()
    assert TOKEN not in caplog.text and TOKEN not in out and TOKEN not in err


def test_push_py_sends_a_merged_model_to_a_branch(lora_run, fake_hub):
    from transformers import AutoModelForCausalLM

    push.main([str(lora_run), "hub.model_id=me/tiny", "hub.what=merged", "hub.revision=v1", "hub.private=false"])
    repo = fake_hub.repos["me/tiny"]
    assert repo["private"] is False and not repo["branches"].get("main")
    files = repo["branches"]["v1"]
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "README.md"} <= set(files)
    assert "adapter_config.json" not in files
    (lora_run.parent / "download").mkdir()
    for name, content in files.items():
        (lora_run.parent / "download" / name).write_bytes(content)
    model = AutoModelForCausalLM.from_pretrained(lora_run.parent / "download")
    torch.testing.assert_close(logits_of(model), unmerged_logits(sft_base(lora_run), lora_run), atol=1e-4, rtol=1e-4)
    assert_token_only_in_authorization(fake_hub)


def sft_base(run) -> str:
    return modeling.run_recipe(run).model.name_or_path


def test_a_refused_push_is_one_line_without_the_token(lora_run, fake_hub, monkeypatch):
    before = tree_digest(lora_run)
    monkeypatch.setenv("HF_TOKEN", TOKEN[:-4] + "XXXX")  # the Hub refuses it
    with pytest.raises(HubError) as caught:
        push.main([str(lora_run), "hub.model_id=me/tiny"])
    message = str(caught.value)
    assert message.startswith("could not push to me/tiny: ") and "401" in message and "\n" not in message
    assert TOKEN[:-4] not in message and "me/tiny" not in fake_hub.repos
    assert tree_digest(lora_run) == before


def test_a_dry_run_writes_no_token_anywhere(lora_run, fake_hub, capsys):
    staged = push.main([str(lora_run), "hub.model_id=me/tiny", "hub.what=both", "hub.dry_run=true"])
    assert not fake_hub.requests  # nothing sent
    for _, folder in staged:
        for name, content in files_of(folder).items():
            assert TOKEN.encode() not in content, name
    assert TOKEN not in capsys.readouterr().out


def test_both_goes_to_two_repositories(lora_run, fake_hub):
    push.main([str(lora_run), "hub.model_id=me/tiny", "hub.what=both"])
    adapter, merged = (fake_hub.repos[r]["branches"]["main"] for r in ("me/tiny", "me/tiny-merged"))
    assert "adapter_model.safetensors" in adapter and "model.safetensors" not in adapter
    assert "model.safetensors" in merged and "adapter_config.json" not in merged
    assert (
        "library_name: peft" in adapter["README.md"].decode()
        and "library_name: transformers" in merged["README.md"].decode()
    )


def test_an_error_that_echoes_the_token_is_scrubbed(lora_run, fake_hub, monkeypatch):
    import shutil

    from huggingface_hub import HfApi

    def create_repo(self, *args, **kwargs):
        raise RuntimeError(f"request failed: headers {{'authorization': 'Bearer {TOKEN}'}}")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    shutil.rmtree(lora_run.parent / "run-hub", ignore_errors=True)  # an earlier test's staging
    with pytest.raises(HubError) as caught:
        push.main([str(lora_run), "hub.model_id=me/tiny"])
    assert TOKEN not in str(caught.value) and "Bearer <token>" in str(caught.value)
    assert not (lora_run.parent / "run-hub").exists()  # a failed upload leaves no staged copy behind


@pytest.mark.parametrize("stage", ["dpo", "pretrain"])
def test_dpo_and_pretraining_that_would_push_offline_are_refused_before_they_train(
    stage, lora_run, tmp_path, monkeypatch
):
    from huggingface_hub import constants

    from finetune import dpo, pretrain

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "run"
    common = [f"training.output_dir={out}", "hub.push_to_hub=true", "hub.model_id=me/tiny"]
    with pytest.raises(HubError, match="offline mode is on"):
        if stage == "dpo":
            dpo.main(["recipe=dpo-quickstart", f"model.name_or_path={lora_run}", *common])
        else:
            pretrain.main(["recipe=pretrain-tiny", *common])
    assert not out.exists()
