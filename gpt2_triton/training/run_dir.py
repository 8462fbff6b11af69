"""The run folder: one run per folder, locked while the run lives; which checkpoint a resume continues."""
from pathlib import Path

from gpt2_triton.atomic import FolderLock, remove_stale_temps
from gpt2_triton.checkpoint import RUN_LOCK, latest_checkpoint, newest_verified_checkpoint, run_artifacts
from gpt2_triton.training.config import TrainConfig
from gpt2_triton.training.errors import ConfigError


def claim_run_dir(cfg: TrainConfig) -> tuple[FolderLock, Path | None]:
    """Rank 0, before anything is written: lock the run folder (a second train.py on it refuses while
    this one lives; the OS drops the lock when this process dies), sweep temp files left by killed
    saves, and check that this run may use the folder. Returns the held lock and the checkpoint this
    run resumes from (None for a new run)."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = FolderLock(run_dir / RUN_LOCK)
    if not lock.acquire():
        raise ConfigError(f"run folder {run_dir} is in use by another train.py ({lock.owner()}); wait for it "
                          f"to finish, or use another --run-dir")
    try:
        stale = remove_stale_temps(run_dir)
        if stale:
            print(f"removed {len(stale)} temp file(s) left in {run_dir} by killed saves: "
                  f"{', '.join(p.name for p in stale)}", flush=True)
        resume = resume_checkpoint(cfg)  # raises if this resume would mix two runs
        existing = run_artifacts(run_dir)
        if existing and not cfg.resume and not cfg.overwrite:
            latest = latest_checkpoint(run_dir)
            where = f"up to {latest.name}" if latest else "no checkpoint yet"
            raise ConfigError(
                f"run folder {run_dir} already holds a run ({where}; {', '.join(p.name for p in existing[-3:])}). "
                f"Continue it with --resume, start it over with --overwrite (deletes it), "
                f"or pick a new --run-dir")
    except BaseException:
        lock.release()
        raise
    return lock, resume


def resume_checkpoint(cfg: TrainConfig) -> Path | None:
    """The checkpoint this run resumes from (None for a new run). A bare --resume takes the folder's newest
    checkpoint that verifies (readable, checksum matching), printing each newer one it skips and why.
    Refuses a resume that would mix two runs in one folder: a checkpoint path must be that newest good
    checkpoint, or the folder must hold no run."""
    if not cfg.resume:
        return None
    run_dir = Path(cfg.run_dir)
    skipped = []
    good = newest_verified_checkpoint(run_dir, skipped)
    for path, why in skipped:
        print(f"--resume: skipping {path.name}: {why}", flush=True)
    if cfg.resume == "latest":
        if good is None and skipped:
            raise ConfigError(f"--resume: no checkpoint in {run_dir} verifies ({len(skipped)} tried); start the run "
                              f"over with --overwrite, or in another --run-dir")
        if good is None:
            held = run_artifacts(run_dir)
            raise ConfigError(f"--resume: no ckpt_<step>.pt in {run_dir}" + (
                " (the run there saved none: start it over with --overwrite)" if held else ""))
        if skipped:
            print(f"--resume: continuing from {good.name}, the newest checkpoint that verifies", flush=True)
        return good
    path = Path(cfg.resume)
    if run_artifacts(run_dir) and (good is None or path.resolve() != good.resolve()):
        raise ConfigError(
            f"--resume {path}: run folder {run_dir} holds another run's history (latest checkpoint: "
            f"{good.name if good else 'none'}); resuming here would mix the two. Resume into a new "
            f"--run-dir, or resume the folder's own latest checkpoint with a bare --resume")
    return path
