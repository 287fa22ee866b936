"""Offline or not: which names are Hub IDs (one rule for models, datasets and corpora), whether the Hub answers (a
3-second probe), and one message for a Hub load that failed. Pushing to the Hub is finetune/hub.py."""

from __future__ import annotations

import glob
import logging
import os
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 3.0
# A name ending in a data file's suffix is a local file even when it is missing (so its error says "not found").
DATA_SUFFIXES = {".txt", ".md", ".text", ".json", ".jsonl", ".csv", ".parquet", ".gz", ".yaml", ".yml"}


def is_hub_id(name: str) -> bool:
    """The one rule, for models, tokenizers, datasets and corpora: a Hub ID is a name huggingface_hub accepts as
    a repo ID (`org/name`, or a legacy bare `gpt2`) that is not an existing path, a glob, a `builtin:` base, or
    a name ending in a data file's suffix."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not name or name.startswith(("builtin:", ".", "/", "~")) or glob.has_magic(name):
        return False
    if Path(name).expanduser().exists() or Path(name).suffix.lower() in DATA_SUFFIXES:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def hub_message(what: str, error: Exception) -> str:
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return (
        f"could not load {what} from the Hugging Face Hub ({type(error).__name__}: {first}). "
        "If this machine is offline, point the recipe at local copies, e.g. "
        "model.name_or_path=/path/to/llama-folder 'data.datasets=[{path: /path/to/data.jsonl, format: alpaca}]', "
        "or run the offline recipe: recipe=quickstart"
    )


def reachable() -> bool:
    """Can a TCP connection to the Hub endpoint be opened? Behind a proxy we can't tell, so we assume yes."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=PROBE_TIMEOUT_S).close()
        return True
    except OSError:
        return False


def go_offline_if_unreachable(hub_ids: list[str]) -> None:
    """If the run names Hub IDs and the Hub can't be reached, re-run this process with HF_HUB_OFFLINE=1.

    Offline mode makes transformers and datasets read the local cache (so cached models still load) and
    fail at once where nothing is cached, instead of retrying every file for about a minute. Re-running is
    the only reliable switch: both libraries read the flag once, at import time.
    """
    from huggingface_hub import constants  # reads HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE as the libraries do

    if not hub_ids or constants.HF_HUB_OFFLINE or reachable():
        return
    log.warning(
        "the Hugging Face Hub is unreachable; using the local cache only (HF_HUB_OFFLINE=1) for %s", ", ".join(hub_ids)
    )
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
