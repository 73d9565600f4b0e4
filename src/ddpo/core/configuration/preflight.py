"""Checks of a run's input that need no weights: they run before anything loads or is written, so a mistake
costs seconds, not a model load (or a GPU allocation) followed by a crash."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any

from ddpo.core.configuration.errors import UsageError

FIXED_ON_RESUME = ("algorithm.name", "model.name", "model.pretrained", "model.use_lora", "model.lora_rank",
                   "sample.batch_size", "sample.batches_per_epoch", "sample.num_steps",
                   "train.batch_size", "train.grad_accum")
"""Keys a resumed run must keep: the checkpoint's weights, optimizer and algorithm state are shaped by them."""


def check_output_file(path: str | Path, fix: str) -> None:
    """`path` must be a file that can be written: not a directory, in a directory that can be created and
    written in (`check_output_directory`), under a name the filesystem takes."""
    path = Path(os.path.abspath(path))
    if os.path.isdir(path):  # False for a path whose stat fails, where Path.is_dir raises on a name too long
        raise UsageError(f"output file {path} is a directory; {fix}")
    check_output_directory(path.parent, "output directory", fix, file_name=path.name)


def check_output_directory(path: str | Path, role: str, fix: str, file_name: str = "probe") -> None:
    """`path` must be a directory a file can be written in, or one that can be created. Only the attempt tells (a
    pseudo-filesystem answers ENOENT, a read-only mount EROFS, a full disk ENOSPC, a long name ENAMETOOLONG), so
    the missing directories are created (under a private folder, see `_try_writing`) with a byte written to a file
    in the deepest, and removed again. A failure is a UsageError naming `role`, the path, the OS's reason and `fix`
    (what to give instead). `file_name` is the name of the file written (the file a command will write there, if
    it is known)."""
    path = Path(os.path.abspath(path))
    existing, is_directory, missing = _nearest_existing(path)
    if not is_directory:
        raise UsageError(f"{role} {path} is a file; {fix}" if existing == path
                         else f"cannot create {role} {path}: {existing} is a file; {fix}")
    try:
        _try_writing(existing, missing, path, file_name)
    except OSError as error:
        raise UsageError(_refusal(path, role, fix, bool(missing), error, existing)) from None


def _nearest_existing(path: Path) -> tuple[Path, bool, list[Path]]:
    """The nearest of `path` and its parents that exists, whether it is a directory, and the directories below it
    down to `path` (outermost first). A path whose stat fails counts as missing: creating it then tells why (a name
    too long, no access)."""
    missing = []
    while True:
        try:
            return path, stat.S_ISDIR(path.stat().st_mode), missing
        except OSError:
            missing.insert(0, path)
            path = path.parent


def _try_writing(existing: Path, missing: list[Path], path: Path, file_name: str) -> None:
    """Create the `missing` directories' names, and a file with a byte in the deepest, inside a private directory
    in `existing`, then remove it all. The same filesystem answers for the same names, and another process
    checking the same new path at the same moment neither sees nor removes them (the folder's name makes the paths
    27 bytes longer than the real ones, less than a run's files add below its directory). An OSError names the
    directory it arose at (`filename`): the first missing one if nothing could be created in `existing`."""
    at = missing[0] if missing else path
    private = None
    try:
        private = Path(tempfile.mkdtemp(prefix=".ddpo-write-check-", dir=existing))
        deepest = private
        for directory in missing:
            at, deepest = directory, deepest / directory.name
            deepest.mkdir()
        at = path / file_name if file_name != "probe" else path
        (deepest / file_name).write_bytes(b"\0")  # a full tmpfs still creates files and folders, and refuses data
    except OSError as error:
        raise OSError(error.errno, error.strerror, str(at)) from None
    finally:
        if private is not None:
            shutil.rmtree(private)


def _refusal(path: Path, role: str, fix: str, creating: bool, error: OSError, existing: Path) -> str:
    """The error line: what could not be done to `path`, the OS's reason, where it arose if not at `path` itself."""
    at = Path(error.filename)
    notes = [f"at {at}"] if at != path else []
    if error.errno == errno.ENAMETOOLONG:
        notes.append(f"names here are at most {os.pathconf(existing, 'PC_NAME_MAX')} bytes, paths "
                     f"{os.pathconf(existing, 'PC_PATH_MAX')}")
    where = f" ({'; '.join(notes)})" if notes else ""
    return f"cannot {'create' if creating else 'write in'} {role} {path}: {error.strerror}{where}; {fix}"


def check_run_directory(logdir: str, run_name: str | None, resume_dir: Path | None) -> None:
    """The directory `ddpo run` writes must be writable: the resumed one, or {logdir}/{run_name} (the log directory
    alone while the run name is left to the trainer's default, which holds the start time)."""
    if resume_dir is not None:
        check_output_directory(resume_dir, "run directory", "give --resume a run directory you can write to")
        return
    check_output_directory(logdir, "log directory", "give --logdir a directory you can write to")
    if run_name:
        check_output_directory(Path(logdir) / run_name, "run directory", "choose another --run-name")


def _value(config: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        config = config.get(part, {}) if isinstance(config, dict) else {}
    return config


def check_resume(saved: dict[str, Any], resolved: dict[str, Any]) -> None:
    """A resumed run's config must keep FIXED_ON_RESUME as the saved run had them."""
    for key in FIXED_ON_RESUME:
        before, now = _value(saved, key), _value(resolved, key)
        if before != now:
            raise UsageError(f"'{key}' cannot change when resuming: the run has {before!r}, this command gives "
                             f"{now!r}; drop the flag, or start a new run")


PROBE_IMAGES = 2


def probe_rewards(model, rewards: list, prompt_set, registry) -> None:
    """Score a few images of the model's shape (its decoded initial noise) with each reward, before the run
    writes anything: a reward that raises, answers with the wrong shape or with non-finite values stops the run
    here, named with its package, rather than after the first epoch's sampling."""
    import random

    import torch

    from ddpo.core.engine.multireward import MultiReward
    from ddpo.core.engine.rollout import score

    with torch.no_grad():
        images = model.decode(model.initial_noise(PROBE_IMAGES, torch.Generator().manual_seed(0)))
    drawn = [prompt_set.sample(random.Random(index)) for index in range(PROBE_IMAGES)]
    prompts = [prompt if model.conditional else "" for prompt, _ in drawn]
    metadata = [dict(meta) for _, meta in drawn]
    scorers = [part for reward in rewards
               for part in (reward.rewards.values() if isinstance(reward, MultiReward) else [reward])]
    for reward in scorers:
        try:
            score(reward, images, prompts, metadata)
        except Exception as error:
            info = registry.plugins["rewards"].get(reward.name)
            package = info.package if info is not None else "unknown"
            raise UsageError(f"reward '{reward.name}' (package {package}) failed on a probe batch of "
                             f"{PROBE_IMAGES} images: {type(error).__name__}: {' '.join(str(error).split())}") from None
