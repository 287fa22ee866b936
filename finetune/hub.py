"""Pushing a run's output folder to the Hugging Face Hub (`hub.push_to_hub=true hub.model_id=me/name`).
Whether the Hub can be reached, and which names are Hub IDs, is finetune/offline.py."""

from __future__ import annotations

import logging
from pathlib import Path

from finetune.config.shared import HubConfig

log = logging.getLogger(__name__)

# Kept out of the upload: resumable training state, TensorBoard logs, the merged copy (its own repo if wanted).
NOT_UPLOADED = ["checkpoint-*", "runs/*", "merged/*"]


def push(hub: HubConfig, out: Path) -> None:
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(hub.model_id, private=hub.private, exist_ok=True)
    api.upload_folder(repo_id=hub.model_id, folder_path=str(out), ignore_patterns=NOT_UPLOADED)
    log.info("pushed %s to https://huggingface.co/%s", out, hub.model_id)
