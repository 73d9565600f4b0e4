"""Where the rewards that ship as single checkpoint files (`hps`, `imagereward`) find them: a local file, a local
directory holding the file, or a Hugging Face hub repository whose file is downloaded once into huggingface_hub's
cache. Every failure is a one-line `UsageError` naming the option to change.

Only imported inside the rewards' `load`.
"""

from __future__ import annotations

import re
from pathlib import Path

from ddpo.core.configuration.errors import UsageError

HUB_REPOSITORY_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def pretrained_file(pretrained: str, filename: str, option: str) -> Path:
    """The local path of `filename` from `pretrained`: `pretrained` itself when it is a file, `pretrained/filename`
    when it is a directory, else the file of that name in the hub repository `pretrained` (downloaded through
    `huggingface_hub.hf_hub_download`, which reuses its cache and honours HF_HUB_OFFLINE). `option` is the
    reward option that holds `pretrained`, for the error message."""
    local = Path(pretrained).expanduser()
    if local.is_file():
        return local
    if local.is_dir():
        if not (local / filename).is_file():
            raise UsageError(f"reward.{option}={pretrained} holds no {filename}")
        return local / filename
    if not HUB_REPOSITORY_ID.match(pretrained):
        raise UsageError(f"reward.{option}={pretrained} is neither a local file or directory nor a Hugging Face hub "
                         "repository id (owner/name)")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id=pretrained, filename=filename))
    except Exception as error:  # offline, no such repository or file, or a network failure
        reason = " ".join(str(error).split())[:200] or type(error).__name__
        raise UsageError(f"reward.{option}={pretrained}: cannot get {filename} from the Hugging Face hub ({reason}); "
                         f"download it and set reward.{option} to the file or its directory") from None
