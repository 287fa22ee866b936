"""The localhost Hub stand-in (tests/hub_server.py) against the real huggingface_hub client: what a push sends is
what the stand-in stores, byte for byte, on the right branch, with the token where it belongs."""

import os

import pytest

from .hub_server import FakeHub

TEXT = b'{"architectures": ["LlamaForCausalLM"], "note": "\xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e"}\n'


@pytest.fixture
def hub(monkeypatch):
    # tests/conftest.py sets HF_HUB_OFFLINE=1 for the suite, and huggingface_hub copies it (and
    # HF_HUB_DISABLE_TELEMETRY, HF_ENDPOINT, the token file's path) into huggingface_hub.constants at import:
    # patch_client patches those constants, not only the environment, and blocks connections to other hosts.
    with FakeHub() as hub:
        hub.patch_client(monkeypatch)
        yield hub


@pytest.fixture
def run_folder(tmp_path):
    """An output folder as a run leaves it: a config, a ~3 MB binary, a nested file, and state not to upload."""
    out = tmp_path / "out"
    (out / "checkpoint-10").mkdir(parents=True)
    (out / "tokenizer").mkdir()
    (out / "config.json").write_bytes(TEXT)
    # Every byte value, repeated: a base64 or text-mode slip anywhere would change it.
    (out / "model.safetensors").write_bytes(os.urandom(1024) + bytes(range(256)) * 12_000)
    (out / "tokenizer" / "tokenizer.json").write_bytes(b'{"model": {"type": "BPE"}}')
    (out / "checkpoint-10" / "optimizer.pt").write_bytes(b"\0" * 100)
    return out


def folder_bytes(folder, skip=("checkpoint-",)):
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.relative_to(folder).as_posix().startswith(skip)
    }


def test_upload_folder_stores_exact_bytes_in_a_private_repo(hub, run_folder):
    from huggingface_hub import HfApi, constants

    assert constants.HF_HUB_OFFLINE is False and constants.HF_HUB_DISABLE_TELEMETRY is True
    api = HfApi(endpoint=hub.endpoint, token=hub.token)
    assert api.whoami()["name"] == hub.user

    api.create_repo("me/llama-lora", private=True, exist_ok=True, repo_type="model")
    api.create_repo("me/llama-lora", private=False, exist_ok=True)  # exists: no error, visibility kept
    info = api.upload_folder(
        repo_id="me/llama-lora", folder_path=run_folder, commit_message="Push run", ignore_patterns=["checkpoint-*"]
    )

    expected = folder_bytes(run_folder)
    assert len(expected["model.safetensors"]) > 3_000_000
    commit = hub.commits[-1]
    assert commit["files"] == expected
    assert (commit["repo_id"], commit["revision"], commit["message"]) == ("me/llama-lora", "main", "Push run")
    assert info.oid == commit["oid"]
    assert hub.repos["me/llama-lora"]["private"] is True
    assert hub.repos["me/llama-lora"]["branches"]["main"] == expected
    assert sorted(api.list_repo_files("me/llama-lora")) == sorted(expected)

    # Every request came here, with the token; none fell through to the unknown-endpoint 404.
    assert hub.unhandled == [] and hub.errors == [] and hub.blocked == []
    assert {r.headers.get("Authorization") for r in hub.requests} == {f"Bearer {hub.token}"}
    paths = [(r.method, r.path.split("?")[0]) for r in hub.requests]
    assert ("POST", "/api/models/me/llama-lora/preupload/main") in paths
    assert ("POST", "/api/models/me/llama-lora/commit/main") in paths


def test_upload_to_a_branch_lands_on_that_branch(hub, run_folder):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RevisionNotFoundError

    api = HfApi(endpoint=hub.endpoint, token=hub.token)
    api.create_repo("me/llama-lora", private=True, exist_ok=True)
    (run_folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# A card\n", encoding="utf-8")

    # A branch that doesn't exist is refused, as on the Hub; create_branch first.
    with pytest.raises(RevisionNotFoundError):
        api.upload_folder(repo_id="me/llama-lora", folder_path=run_folder, revision="exp/lr-1e-4")
    api.create_branch("me/llama-lora", branch="exp/lr-1e-4", exist_ok=True)
    api.create_branch("me/llama-lora", branch="exp/lr-1e-4", exist_ok=True)  # second time: no error
    api.upload_folder(
        repo_id="me/llama-lora",
        folder_path=run_folder,
        revision="exp/lr-1e-4",
        commit_message="Branch push",
        ignore_patterns=["checkpoint-*"],
    )

    expected = folder_bytes(run_folder)
    assert hub.commits[-1]["revision"] == "exp/lr-1e-4"
    assert hub.commits[-1]["files"] == expected
    branches = hub.repos["me/llama-lora"]["branches"]
    assert branches["exp/lr-1e-4"] == expected and branches["main"] == {}
    assert sorted(api.list_repo_files("me/llama-lora", revision="exp/lr-1e-4")) == sorted(expected)
    assert api.list_repo_files("me/llama-lora") == []
    # README.md makes the client validate its metadata first; the stand-in answered that too.
    assert any(r.path == "/api/validate-yaml" for r in hub.requests)
    assert hub.unhandled == [] and hub.errors == []

    # Pushing the same folder again commits only what changed, as the Hub's preupload oids allow.
    (run_folder / "config.json").write_bytes(TEXT + b"\n")
    api.upload_folder(
        repo_id="me/llama-lora", folder_path=run_folder, revision="exp/lr-1e-4", ignore_patterns=["checkpoint-*"]
    )
    assert hub.commits[-1]["files"] == {"config.json": TEXT + b"\n"}


def test_missing_or_wrong_token_is_a_401_from_the_client(hub, monkeypatch, run_folder):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    hub.patch_client(monkeypatch, with_token=False)  # no HF_TOKEN, no token file
    api = HfApi(endpoint=hub.endpoint)
    with pytest.raises(HfHubHTTPError, match="needs a token") as caught:
        api.create_repo("me/llama-lora", private=True, exist_ok=True)
    assert caught.value.response.status_code == 401
    assert hub.repos == {}

    # An existing repo and no token: the upload stops at the first write call, nothing is committed.
    HfApi(endpoint=hub.endpoint, token=hub.token).create_repo("me/llama-lora", private=True)
    with pytest.raises(HfHubHTTPError) as caught:
        api.upload_folder(repo_id="me/llama-lora", folder_path=run_folder)
    assert caught.value.response.status_code == 401
    assert hub.commits == []
    assert not any("authorization" in r.headers for r in hub.requests if r.path != "/api/repos/create")

    with pytest.raises(HfHubHTTPError, match="Invalid credentials") as caught:
        HfApi(endpoint=hub.endpoint, token="hf_wrong").upload_folder(repo_id="me/llama-lora", folder_path=run_folder)
    assert caught.value.response.status_code == 401
    assert hub.commits == []


def test_default_client_is_pointed_here_and_nothing_leaves_the_machine(hub):
    from huggingface_hub import HfApi

    # finetune/hub.py builds a bare HfApi(): the endpoint and the token come from patch_client.
    assert HfApi().whoami()["name"] == hub.user
    assert hub.requests[-1].headers["authorization"] == f"Bearer {hub.token}"

    with pytest.raises(Exception, match="blocked"):
        HfApi(endpoint="https://huggingface.co").whoami()
    assert hub.blocked and hub.blocked[0][0] == "huggingface.co"

    # An endpoint the stand-in doesn't know is a 404 that names itself, and is listed.
    HfApi().create_repo("me/x")
    with pytest.raises(Exception, match="no handler"):
        HfApi().list_repo_commits("me/x")
    assert hub.unhandled and hub.unhandled[-1][1].startswith("/api/models/me/x/commits/main")
