"""Training checkpoints on disk (`<output_dir>/checkpoint-<step>`): saving, resuming, rotating, and their background
upload to the Hub."""

from __future__ import annotations

import json
import logging
import re
import shutil
from concurrent.futures import Future
from pathlib import Path

from accelerate.logging import get_logger

logger = logging.getLogger(__name__)
run_logger = get_logger("diffews.train")  # the training script's log (main process only)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")

# Settings that define the episode stream and the schedule: a resumed run must keep them to match an uninterrupted one.
RESUME_SETTINGS = ("dataset", "fold", "split", "max_steps", "batch_size", "gradient_accumulation_steps", "max_shots",
                   "resolution", "seed", "learning_rate", "lr_end", "processes", "mix_dataset", "mix_share")


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"checkpoint-{step}"


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """`(step, folder)` of every `checkpoint-<step>` folder of `output_dir`, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for path in output_dir.iterdir():
        match = CHECKPOINT_PATTERN.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def resolve_resume(resume: str | None, output_dir: str | Path) -> tuple[int, Path] | None:
    """`--resume` -> `(step, folder)`, or None to start from scratch.

    resume: None, "latest" (the newest `checkpoint-<step>` of `output_dir`; None when there is none) or the path of a
    `checkpoint-<step>` folder.
    """
    if resume is None:
        return None
    if resume == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    folder = Path(resume)
    match = CHECKPOINT_PATTERN.match(folder.name)
    if not folder.is_dir() or match is None:
        raise ValueError(f"--resume must be 'latest' or a checkpoint-<step> folder, got {resume!r}.")
    return int(match.group(1)), folder


class CheckpointUploader:
    """Uploads folders to a Hub model repository in a background thread, one after the other.

    Failures never stop training and never touch local files: they are logged, and the folder is reported as not
    uploaded (`uploaded(folder)` is False), so checkpoint rotation keeps it.
    """

    def __init__(self, repo_id: str, token: str | None = None, private: bool | None = None):
        from huggingface_hub import HfApi

        self.repo_id = repo_id
        self.api = HfApi(token=token)
        self._futures: dict[Path, Future] = {}
        self._repo = self.api.run_as_future(self.api.create_repo, repo_id, private=private, exist_ok=True)

    def submit(self, folder: str | Path, path_in_repo: str | None = None, **upload_kwargs) -> Future:
        """Queues the upload of `folder` to `path_in_repo` (default: the folder's name) and returns at once."""
        folder = Path(folder)
        path_in_repo = folder.name if path_in_repo is None else path_in_repo
        future = self.api.run_as_future(self._upload, folder, path_in_repo, upload_kwargs)
        self._futures[folder] = future
        return future

    def _upload(self, folder: Path, path_in_repo: str, upload_kwargs: dict):
        self._repo.result()  # raises if the repository could not be created
        return self.api.upload_folder(
            repo_id=self.repo_id,
            folder_path=folder,
            path_in_repo=path_in_repo or None,
            commit_message=upload_kwargs.pop("commit_message", f"Upload {folder.name}"),
            **upload_kwargs,
        )

    def uploaded(self, folder: str | Path) -> bool:
        """True once the upload of `folder` has finished without error."""
        future = self._futures.get(Path(folder))
        return future is not None and future.done() and future.exception() is None

    def wait(self) -> list[tuple[Path, BaseException]]:
        """Waits for every queued upload; returns the failed ones as `(folder, error)` (each also logged)."""
        failures = []
        for folder, future in self._futures.items():
            error = future.exception()
            if error is not None:
                logger.error("Upload of %s to %s failed (the local copy is kept): %s", folder, self.repo_id, error)
                failures.append((folder, error))
        return failures


def rotate_checkpoints(
    output_dir: str | Path, keep: int | None, uploader: CheckpointUploader | None = None
) -> list[Path]:
    """Deletes the oldest checkpoints so that `keep - 1` remain (room for the next one). Returns the deleted folders.

    With an uploader, a checkpoint whose upload is still running or has failed is never deleted (a warning names it).
    """
    if keep is None:
        return []
    checkpoints = list_checkpoints(output_dir)
    excess = len(checkpoints) - (keep - 1)
    deleted = []
    for _, folder in checkpoints[: max(excess, 0)]:
        if uploader is not None and not uploader.uploaded(folder):
            logger.warning("Keeping %s: its upload to %s is pending or failed.", folder, uploader.repo_id)
            continue
        shutil.rmtree(folder)
        deleted.append(folder)
    return deleted


def check_resume(args, accelerator, resume) -> int:
    """The step to start from; warns when the checkpoint was made with settings that change the episode stream."""
    if resume is None:
        if args.resume:
            run_logger.info(f"No checkpoint in {args.output_dir}: starting a new run.")
        return 0
    step, folder = resume
    if step > args.max_steps:
        raise ValueError(f"{folder} is at step {step}, beyond --max-steps {args.max_steps}.")
    info = folder / "diffews_training.json"
    if info.is_file():
        saved = json.loads(info.read_text())
        now = {**vars(args), "processes": accelerator.num_processes}
        changed = [k for k in RESUME_SETTINGS if saved.get("args", {}).get(k) != now.get(k)]
        if changed:
            run_logger.warning(f"Resuming with other {', '.join(changed)} than {folder}: the run will differ from an "
                               "uninterrupted one.")
    return step


def save_checkpoint(accelerator, args, step: int, uploader) -> None:
    """`accelerator.save_state` to `<output_dir>/checkpoint-<step>` (all processes), keeping the last K."""
    if accelerator.is_main_process:
        rotate_checkpoints(args.output_dir, args.checkpoints_total_limit or None, uploader)
    accelerator.wait_for_everyone()
    folder = checkpoint_dir(args.output_dir, step)
    accelerator.save_state(str(folder))
    if accelerator.is_main_process:
        info = {"step": step, "args": {**vars(args), "processes": accelerator.num_processes}}
        (folder / "diffews_training.json").write_text(json.dumps(info, indent=2))
        run_logger.info(f"Saved {folder}")
        if uploader is not None:
            uploader.submit(folder, f"checkpoints/{folder.name}")
    accelerator.wait_for_everyone()
