"""A training run's directory: which entries are the run's own (and which a user put there), its
checkpoints, and the set-aside dance that lets `--force` replace a run yet put it back when the new
one fails to start, even after a kill at any moment. `RunDir` is the trainer's handle on it.

    OUT/config.yaml  metrics.jsonl  summary.json  checkpoints/step_0001000/  final/  best/ (keep_best)
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from .checkpoint import CKPT_RE, is_model_dir, model_dir_hint, unfinished_hint
from .errors import TinykError, shown, signals_held, typo_hint, writing
from .monitor import TRACKER_ID, TRACKER_STEP, TRACKERS
from .outputs import (
    DirLock,
    atomic_file,
    check_output,
    dangling_link,
    delete_via,
    is_output_file,
    put_back_interrupted,
    remove_path,
    restore_aside,
)

if TYPE_CHECKING:
    from .train import Dist

SHARED_WAIT_S = 60.0  # NFS's longest default attribute cache (acdirmax)


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


def model_name(model_dir: Path) -> str:
    """What a model is called where a client or tool shows it (serve's model id, GGUF's general.name):
    the directory's name, but the run's for a model a run made (`runs/chat` and its final/ are 'chat',
    its best/ 'chat-best', a checkpoint's 'chat-step_0000100'). A link keeps its own name."""
    path = Path(os.path.abspath(model_dir))
    run = path.parents[2] if len(path.parents) > 2 else path
    if path.name == "final" and is_run_dir(path.parent):
        name = path.parent.name
    elif path.name == "best" and is_run_dir(path.parent):
        name = f"{path.parent.name}-best"
    elif path.name == "model" and CKPT_RE.match(path.parent.name) and is_run_dir(run):
        name = f"{run.name}-{path.parent.name}"
    else:
        name = path.name
    return shown(name)  # a GBK folder name is not UTF-8, which JSON and GGUF strings are


def resolve_init(path: str | Path) -> Path:
    """--init: a model directory, or a run directory meaning its final model."""
    p = Path(path)
    put_back_interrupted(p)
    if not p.exists():
        raise TinykError(f"--init {p} not found{unfinished_hint(p) or typo_hint(p)}")
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


RUN_ENTRIES = {"config.yaml", "checkpoints", "final", "best", "metrics.jsonl", "summary.json", "loss.png", TRACKER_ID,
               TRACKER_STEP, *TRACKERS}


_LEFTOVER = re.compile(r"^\.(.+?)\.(?:tmp|old)-")
# A final/ or best/ that a replace (`atomic_dir`) moved aside: `.final.old-HOST-PID-XXXXXXXX`.
_MODEL_ASIDE = re.compile(r"^\.(final|best)\.old-.+-[0-9]+(?:-[0-9a-f]{8})?$")


def _is_leftover(p: Path) -> bool:
    """A temporary (`.name.tmp-...`) or a replaced output not yet deleted (`.name.old-...`) that a killed
    write of the run left, named after one of its entries (a user's `.env.old-backup` is not one)."""
    m = _LEFTOVER.match(p.name)
    return bool(m) and not ASIDE.match(p.name) and (
        m[1] in RUN_ENTRIES or m[1] in ("forced", "shared-check", "write-check") or bool(CKPT_RE.match(m[1])))


def made_by_a_run(p: Path) -> bool:
    """A run's own entry. Others (a log the shell opened there, an eval's results, notes) are the
    user's: no start, --force or failed start moves or deletes them."""
    return p.name in RUN_ENTRIES or _is_leftover(p) or bool(ASIDE.match(p.name))


CHECKPOINT_ENTRIES = {"model", "optimizer.pt", "rng.pt", "config.yaml", "state.json"}


def users_files_in_run(out: Path) -> list[str]:
    """Files a user put in a run's final/, best/ or checkpoints/ (a model card, an eval's results), which
    --force, replacing the run's own entries whole, would delete with them. A checkpoint another run
    rotates away meanwhile is no news here: that run's lock refuses this one next."""

    def foreign(folder: Path, ours: Callable[[str], bool]) -> list[Path]:
        try:
            if folder.is_symlink() or not folder.is_dir():
                return []
            return [p for p in folder.iterdir() if not ours(p.name)]
        except OSError:
            return []

    found = foreign(out / "final", is_output_file) + foreign(out / "best", is_output_file)
    found += foreign(out / "checkpoints", lambda n: bool(CKPT_RE.match(n)) or _is_leftover(Path(n)))
    with contextlib.suppress(OSError):  # a linked checkpoints/ is replaced as a link, what it points to kept
        for step in [] if (out / "checkpoints").is_symlink() else checkpoints(out):
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


def clean_partial(out: Path) -> None:
    """Removes what a run killed while writing left behind (the run's directory is its own alone). A
    final/ or best/ it was replacing goes back if the new one had not taken its place, and otherwise
    leaves the user's files in it (a model card, an eval's results) to the new one."""
    for parent in (out, out / "checkpoints"):
        if parent.is_dir():
            for p in parent.iterdir():
                if not _is_leftover(p):
                    continue
                aside = _MODEL_ASIDE.match(p.name) if parent == out else None
                # Put back, or its user's files carried over; a link or file left where a model now is goes.
                if aside is None or (not restore_aside(p, out / aside[1]) and (p.is_symlink() or p.is_file())):
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


class RunDir:
    """The directory a training run writes: the checks before it is taken, its lock (one run per
    directory), the run --force replaces kept until the new one has trained a step, and the undoing of a
    start that failed. Under torchrun rank 0 writes, and every rank takes part in each decision."""

    def __init__(self, out: Path, dist: Dist):
        self.out, self.dist = out, dist
        self.lock = DirLock(out)
        self.aside: Path | None = None  # the run --force replaces, kept until the new one has trained a step
        self.stillborn = False  # holds a run killed before it logged or saved anything (see _check)
        self.existed = False  # whether the directory was there when open() looked

    def open(self, *, force: bool, resume: bool, resumed_from: Path | None, inputs: list[Path | str | None],
             config: str) -> bool:
        """Creates or reopens the run directory, writing `config` where the run is new; True when it
        holds nothing of an earlier run."""
        out, main = self.out, self.dist.main
        self.existed = out.is_dir()
        exists = self._check(force, resume, inputs)
        self._lock()
        try:
            # A run that was still finishing (its lock not yet released) when this one listed the
            # checkpoints may have saved another since: resuming from the older would redo its steps.
            moved_on = main and resume and (checkpoints(out) or [None])[-1] != resumed_from
            if self.dist.sum_host([int(moved_on)])[0]:
                raise TinykError(f"{out} gained a checkpoint while this run started (another run was finishing "
                                 f"there); run the command again")
            # Where the filesystem has no locks, a stillborn-looking run may be one still setting up.
            unsure = main and self.stillborn and not self.lock.held and not (force or resume)
            if self.dist.sum_host([int(unsure)])[0]:
                raise TinykError(f"run directory {out} exists (use --resume to continue it or --force to start "
                                 f"over)")
            self.check_shared()
            if self.dist.sum_host([self._put_back_set_aside() if main else 0])[0]:
                raise TinykError(f"put back the run in {out} that a killed --force start had set aside; "
                                 f"run the command again")
            if main:
                clean_partial(out)
                if exists and force and not resume:
                    with writing(out):
                        self.aside = set_aside(out)
                    if (linked := self.aside / "checkpoints").is_symlink():  # another disk, say
                        print(f"tinyk: note: {shown(out / 'checkpoints')} was a link to {shown(linked.readlink())}; "
                              f"this run keeps its checkpoints in a folder of its own in the run, and the folder the "
                              f"link pointed to is left as it was", file=sys.stderr)
                with writing(out / "checkpoints"):
                    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
                if not exists or not resume:  # a new run: its directory is a run's from the start
                    self.write_config(config)
            self.dist.barrier()
        except BaseException:
            try:
                if main and (self.aside is not None or not exists):  # no earlier run's files are touched
                    with contextlib.suppress(OSError):  # what cannot be put back now, the next start puts back
                        self.undo_start()
            finally:
                self.lock.release()
            raise
        return not exists or not resume

    def _check(self, force: bool, resume: bool, inputs: list[Path | str | None]) -> bool:
        """Refuses an --out this run may not write (a file, one of `inputs`, another tool's output, inside
        another run, someone's files, a run not asked to be resumed or replaced); True when it holds an
        earlier run's files."""
        out = self.out
        if out.is_symlink() and not out.exists():  # a run fills its --out in place: it needs the target
            raise TinykError(f"--out {dangling_link(out, 'create its target or remove the link')}")
        if out.exists() and not out.is_dir():
            raise TinykError(f"--out {out} is a file, not a run directory")
        check_output(out, inputs)
        ours = sorted(p.name for p in out.iterdir() if made_by_a_run(p)) if out.is_dir() else []
        # A run killed before it logged or saved anything left its config.yaml and an empty checkpoints/:
        # nothing to resume or to lose, so the same command starts again, as after any killed command.
        self.stillborn = ours == ["checkpoints", "config.yaml"] and (out / "checkpoints").is_dir() \
            and not checkpoints(out) and not users_files_in_run(out)
        exists = bool(ours) and not self.stillborn  # an earlier run's files
        # A run writes its config.yaml and checkpoints/ at once: a config.yaml alone is a file of the user's.
        # Wider than is_run_dir: a run whose checkpoints/ is gone (deleted to save space, or a --force
        # start killed with it set aside) is still a run, to resume or replace, not to refuse.
        is_run = ("config.yaml" in ours and len(ours) > 1) or any(ASIDE.match(n) for n in ours)
        if out.is_dir() and not is_run and (other := another_output(out)):
            raise TinykError(f"--out {out} is {other}, not a run directory; choose another --out")
        # Inside another run (its checkpoints/ or final/), its --force and rotation would reach this one.
        host = next((p for p in out.resolve().parents if is_run_dir(p)), None)
        if host is not None:
            raise TinykError(f"--out {out} is inside the run directory {host}; give a path outside it")
        if exists and not is_run:
            copy = config_copy(out)
            if copy:
                raise TinykError(f"run directory {out} has no config.yaml{copy}")
            raise TinykError(f"--out {out} holds {', '.join(ours[:3])} but is not a tinyk run (a run has a "
                             f"config.yaml and checkpoints/): its files would be overwritten; choose another "
                             f"directory")
        if exists and not resume and not force:
            if self.held_elsewhere():  # a run training there now (one started a moment ago): not a hint to --force
                raise self.in_use()
            raise TinykError(f"run directory {out} exists (use --resume to continue it or --force to start over)")
        if exists and force and not resume and (mine := users_files_in_run(out)):
            raise TinykError(f"--force would delete {', '.join(mine[:3])}{', ...' if len(mine) > 3 else ''} in {out} "
                             f"with the run, and tinyk did not write them; move them out of the run first")
        return exists

    def _lock(self) -> None:
        """Makes the run directory and takes its lock. One run per directory: a second writer (a job
        script's --resume while the first still runs, or workers that outlived a killed torchrun) would
        interleave metrics and rotate away checkpoints."""
        out, main = self.out, self.dist.main
        if main:
            with writing(out):
                out.mkdir(parents=True, exist_ok=True)
        try:
            busy = main and not self.lock.acquire()
            in_use = self.dist.sum_host([int(busy)])[0]  # under torchrun, waits for the slowest rank to start
        except BaseException:  # a Ctrl-C while waiting: no empty directory is left behind
            self.lock.release()
            if main and not self.existed:
                with contextlib.suppress(OSError):
                    out.rmdir()
            raise
        if in_use:
            raise self.in_use()

    def in_use(self) -> TinykError:
        holders = DirLock(self.out).holders()
        which = f"process {', '.join(holders)}: " if holders else ""
        return TinykError(f"run directory {self.out} is in use by another tinyk run ({which}still training, or its "
                          f"processes outlived a killed launcher); stop that one first")

    def held_elsewhere(self) -> bool:
        """Whether another run holds the directory (this one has not taken it, or could not)."""
        if not self.dist.main or self.lock.held or not self.out.is_dir():
            return False
        probe = DirLock(self.out)
        if not probe.acquire():
            return True
        probe.release()
        return False

    def _put_back_set_aside(self) -> int:
        """A start killed while --force had the old run set aside never began the new run: puts the old
        one back (the command is then run again on the directory as it was); returns how many were."""
        restored = 0
        for aside in [p for p in self.out.iterdir() if ASIDE.match(p.name)]:
            if ASIDE.match(aside.name).group(1) == "old" and checkpoints(self.out):
                drop_aside(aside)  # the new run got as far as a checkpoint: it is the one to keep
            else:
                put_back(self.out, aside)
                restored += 1
        if restored:
            clean_partial(self.out)  # the new run's files, moved out of the way
        return restored

    def undo_start(self) -> None:
        """Removes what a start that failed wrote, and puts back the run --force set aside."""
        if self.aside is not None:
            aside, self.aside = self.aside, None
            put_back(self.out, aside)
        elif not self.existed:
            shutil.rmtree(self.out, ignore_errors=True)
        else:  # a stillborn run's config.yaml and checkpoints/ stay, for the next start (or --resume) to read
            for p in self.out.iterdir():
                if made_by_a_run(p) and not (self.stillborn and p.name in ("config.yaml", "checkpoints")):
                    remove_path(p, ignore_errors=True)

    def drop_replaced(self) -> None:
        """Deletes the run --force replaced, once this one has trained a step (or ended without error)."""
        if self.aside is not None:
            aside, self.aside = self.aside, None
            with contextlib.suppress(OSError):  # a replaced run not deleted now, the next start deletes
                drop_aside(aside)

    def write_config(self, config: str) -> None:
        """The run's config.yaml, whole or as it was: it is what --resume starts from."""
        with writing(self.out / "config.yaml"), atomic_file(self.out / "config.yaml") as tmp:
            tmp.write_text(config, encoding="utf-8")

    def check_writable(self) -> None:
        """Rank 0's, before the first step: a checkpoints/ or run directory it cannot write in (chmod, a
        disk remounted read-only) was found at the first save, --save-every steps of training later."""
        for folder in (self.out / "checkpoints", self.out):
            with writing(folder / ".write-check"):
                fd, name = tempfile.mkstemp(dir=folder, prefix=".write-check.tmp-")  # a leftover is cleaned
                os.close(fd)
                os.unlink(name)

    def check_shared(self) -> None:
        """Every rank must see the directory rank 0 writes, as it reads the checkpoints there on resume;
        on machines that each have their own disk, the ranks would otherwise resume from different steps."""
        d = self.dist
        if d.world == 1:
            return
        token = d.sum_host([int.from_bytes(os.urandom(7), "big") if d.main else 0])[0]
        probe = self.out / f".shared-check.tmp-{token:014x}"  # a new name: no cached lookup can answer
        if d.main:
            with writing(probe):
                probe.write_text(f"{d.world}\n")
        d.barrier()
        # An NFS client may keep answering "no such directory" for --out (looked up before rank 0
        # made it) until its attribute cache expires, so ranks look again, deciding together.
        deadline = time.monotonic() + SHARED_WAIT_S
        while True:
            blind, late = d.sum_host([int(not probe.is_file()), int(time.monotonic() >= deadline)])
            if not blind or late:
                break
            time.sleep(1.0)
        if d.main:
            probe.unlink()
        if blind:
            raise TinykError(f"run directory {self.out} is not shared: {blind} of {d.world} processes do not see what "
                             f"rank 0 writes there; with several machines, every node's --out must be the same "
                             f"directory on a shared filesystem")
