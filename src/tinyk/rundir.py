"""A training run's directory: which entries are the run's own (and which a user put there), its
checkpoints, and the set-aside dance that lets `--force` replace a run yet put it back when the new
one fails to start, even after a kill at any moment.

    OUT/config.yaml  metrics.jsonl  summary.json  checkpoints/step_0001000/  final/
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from .checkpoint import is_model_dir, model_dir_hint, unfinished_hint
from .errors import TinykError, signal_handlers
from .monitor import TRACKERS
from .outputs import delete_via, is_output_file, put_back_interrupted, remove_path

CKPT_RE = re.compile(r"^step_(\d{7,})$")


def checkpoints(out: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (incomplete ones still carry their temporary name)."""
    root = Path(out) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := CKPT_RE.match(p.name))
             and (p / "state.json").is_file()]
    return [p for _, p in sorted(found)]


def is_run_dir(path: Path) -> bool:
    """A training run's directory, finished or not: its config and its checkpoints folder."""
    return (path / "config.yaml").is_file() and (path / "checkpoints").is_dir()


def resolve_init(path: str | Path) -> Path:
    """--init: a model directory, or a run directory meaning its final model."""
    p = Path(path)
    put_back_interrupted(p)
    if not p.exists():
        raise TinykError(f"--init {p} not found{unfinished_hint(p)}")
    if is_model_dir(p):
        return p
    if is_model_dir(p / "final"):
        return p / "final"
    if is_run_dir(p):
        newest = checkpoints(p)
        raise TinykError(f"--init {p} is a run directory without final/ (unfinished); pass one of its checkpoints' "
                         f"model directories instead" + (f", e.g. the newest, {newest[-1] / 'model'}" if newest
                                                         else ", once it has saved one"))
    raise TinykError(f"--init {p} is not a model directory (no config.json + model.safetensors) "
                     f"nor a run directory with final/{model_dir_hint(p)}")


RUN_ENTRIES = {"config.yaml", "checkpoints", "final", "metrics.jsonl", "summary.json", "loss.png", ".tracker_id",
               *TRACKERS}


_LEFTOVER = re.compile(r"^\.(.+?)\.(?:tmp|old)-")


def _is_leftover(p: Path) -> bool:
    """A temporary (`.name.tmp-...`) or a replaced output not yet deleted (`.name.old-...`) that a killed
    write of the run left, named after one of its entries (a user's `.env.old-backup` is not one)."""
    m = _LEFTOVER.match(p.name)
    return bool(m) and not ASIDE.match(p.name) and (
        m[1] in RUN_ENTRIES or m[1] in ("forced", "shared-check") or bool(CKPT_RE.match(m[1])))


def made_by_a_run(p: Path) -> bool:
    """A run's own entry. Others (a log the shell opened there, an eval's results, notes) are the
    user's: no start, --force or failed start moves or deletes them."""
    return p.name in RUN_ENTRIES or _is_leftover(p) or bool(ASIDE.match(p.name))


CHECKPOINT_ENTRIES = {"model", "optimizer.pt", "rng.pt", "config.yaml", "state.json"}


def users_files_in_run(out: Path) -> list[str]:
    """Files a user put in a run's final/ or checkpoints/ (a model card, an eval's results), which
    --force, replacing the run's own entries whole, would delete with them. A checkpoint another run
    rotates away meanwhile is no news here: that run's lock refuses this one next."""

    def foreign(folder: Path, ours: Callable[[str], bool]) -> list[Path]:
        try:
            if folder.is_symlink() or not folder.is_dir():
                return []
            return [p for p in folder.iterdir() if not ours(p.name)]
        except OSError:
            return []

    found = foreign(out / "final", is_output_file)
    found += foreign(out / "checkpoints", lambda n: bool(CKPT_RE.match(n)) or _is_leftover(Path(n)))
    with contextlib.suppress(OSError):
        for step in checkpoints(out):
            found += foreign(step, CHECKPOINT_ENTRIES.__contains__) + foreign(step / "model", is_output_file)
    return sorted(str(p.relative_to(out)) for p in found)


def another_output(out: Path) -> str | None:
    """What a directory given as --out holds when it is another tinyk output: a run's files mixed into
    it would spoil it, and a checkpoint is resumed through its run."""
    if (out / "state.json").is_file() and is_model_dir(out / "model"):
        return (f"one of a run's checkpoints (to resume from it, delete the newer ones and resume "
                f"--out {out.parent.parent})")
    if is_model_dir(out):
        return "a model directory"
    if (out / "meta.json").is_file() and (out / "train").is_dir():
        return "a tinyk data directory"
    return "a tokenizer directory" if (out / "tokenizer.json").is_file() else None


# --force keeps the run it replaces in a hidden folder of the run directory until the new run has
# started, so a start that fails puts it back. The folder's name says whose the directory's other
# entries are, so a start killed at any moment, even while putting the old run back, is undone by the
# next one:  .forced.moving-*  being filled: the directory's other entries are the old run's;
#            .forced.old-*     filled: they are the new run's;
#            .forced.back-*    being emptied: they are the old run's.
ASIDE = re.compile(r"^\.forced\.(moving|old|back)-(.+)$")


def set_aside(out: Path) -> Path:
    """Moves the run's entries in `out` into a `.forced.old-*` folder there (the directory itself stays:
    the run's lock is on it); a failure midway puts back what had moved."""
    token = f"{os.getpid()}-{time.time_ns()}"
    moving = out / f".forced.moving-{token}"
    moving.mkdir()
    try:
        for p in out.iterdir():
            if p != moving and made_by_a_run(p):
                p.rename(moving / p.name)
        aside = out / f".forced.old-{token}"
        os.replace(moving, aside)
    except BaseException:
        put_back(out, moving)
        raise
    return aside


def put_back(out: Path, aside: Path) -> None:
    """Returns a set-aside run to `out`; a new run's entries there go first (into a leftover)."""
    phase, token = ASIDE.match(aside.name).groups()
    with signals_held():
        trash = None
        if phase == "old":
            trash = out / f".forced.tmp-{token}-{time.time_ns()}"
            trash.mkdir()
            for p in out.iterdir():
                if p != trash and not ASIDE.match(p.name) and made_by_a_run(p):
                    p.rename(trash / p.name)
            back = out / f".forced.back-{token}"
            os.replace(aside, back)
            aside = back
        for p in aside.iterdir():
            p.rename(out / p.name)
        aside.rmdir()
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)


def drop_aside(aside: Path) -> None:
    """Deletes the run --force replaced, once the new one has started: renamed to a leftover first,
    so a kill mid-delete never leaves part of it looking like a run to put back."""
    delete_via(aside, aside.with_name(f".forced.tmp-{ASIDE.match(aside.name).group(2)}"))


@contextlib.contextmanager
def signals_held(deliver: bool = True) -> Iterator[None]:
    """Holds Ctrl-C and SIGTERM (delivered afterwards, unless not `deliver`) while files move, so moving
    back is not cut short. Python handlers rather than a signal mask: a mask holds a signal only from
    the thread that set it."""
    caught: list[int] = []
    stops = [s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None]
    try:
        with signal_handlers({s: lambda signum, _frame: caught.append(signum) for s in stops}):
            yield
    finally:
        for s in dict.fromkeys(caught if deliver else ()):  # each once; one ignored before stays ignored
            signal.raise_signal(s)


def clean_partial(out: Path) -> None:
    """Removes what a run killed while writing left behind (the run's directory is its own alone)."""
    for parent in (out, out / "checkpoints"):
        if parent.is_dir():
            for p in parent.iterdir():
                if _is_leftover(p):
                    remove_path(p, ignore_errors=True)


def config_copy(out: Path) -> str:
    """How to put back a run's lost or emptied config.yaml, when one of its checkpoints keeps a copy."""
    ckpts = checkpoints(out) if out.is_dir() else []
    copy = ckpts[-1] / "config.yaml" if ckpts else None
    return f"; each checkpoint keeps a copy: cp {copy} {out / 'config.yaml'}" if copy and copy.is_file() else ""


def saved_config(out: Path) -> Path:
    """The run's config.yaml; where a killed --force start left the run set aside, the config of the run
    the trainer keeps: the set-aside one, unless the new run got as far as a checkpoint."""
    if out.is_dir():
        for p in out.iterdir():
            m = ASIDE.match(p.name)
            if m and not (m.group(1) == "old" and checkpoints(out)) and (p / "config.yaml").is_file():
                return p / "config.yaml"
    return out / "config.yaml"
