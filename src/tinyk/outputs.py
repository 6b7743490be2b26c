"""Writing outputs that are complete or absent.

Each is filled in a temporary sibling and renamed into place (`atomic_dir`, `atomic_file`); what a
killed run left beside it is put back or removed by the next, and a directory being worked in is locked.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from .errors import TinykError, first_line, is_terminal, not_found, shown, write_error


def plain_name(name: Any) -> bool:
    """Whether `name` (read from a file tinyk wrote, which may have been edited) names a file in a
    folder, not a path that leads elsewhere."""
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name


def put_back_interrupted(path: str | Path) -> None:
    """A missing output that a killed --force replace had moved aside (the new one not yet in place)
    goes back where it was, so a command reading it finds it rather than saying "not found". Only
    what a process of this machine that no longer runs left (see `remove_stale_temps`)."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        remove_stale_temps(path)


def refuse_unreadable_kind(path: Path, why: str) -> None:
    """One line for a path that is there but is no regular file (a pipe, a device, a folder), which
    "no such file" would misname."""
    if path.exists() and not path.is_file():
        kind = "a folder" if path.is_dir() else "a pipe" if path.is_fifo() else "not a regular file"
        raise TinykError(f"{path} is {kind}: {why}")


def marker_file(directory: str | Path, name: str, what: str) -> Path:
    """`directory/name`, the file that makes `directory` a `what` directory, or one line on what is wrong."""
    d = Path(directory)
    put_back_interrupted(d)
    if d.exists() and not d.is_dir():
        raise TinykError(f"{what} directory {d} is a file, not a directory")
    if not d.is_dir():
        raise not_found(d, f"{what} directory")
    refuse_unreadable_kind(d / name, f"a {what} directory holds it as a file")
    if not (d / name).is_file():
        # A run directory (its final/ model holds the tokenizer), a checkpoint, or a data split's folder.
        near = next((p for p in (d / "final", d / "model", d.parent) if (p / name).is_file()), None)
        raise TinykError(f"not a {what} directory (no {name}): {d}" + (f"; {near} is one" if near else ""))
    return d / name


def remove_path(p: Path, ignore_errors: bool = False) -> None:
    """A file, link or directory tree; a link is removed, never followed."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=ignore_errors)
    else:
        p.unlink(missing_ok=ignore_errors)


def delete_via(path: Path, leftover: Path) -> None:
    """Deletes directory `path` by renaming it to `leftover` first: a kill mid-delete leaves a leftover
    (which the next run removes), never a part of `path` that looks whole."""
    os.replace(path, leftover)
    shutil.rmtree(leftover, ignore_errors=True)


def check_output(out: str | Path, inputs: Iterable[str | Path | None], flag: str = "--out") -> None:
    """Refuses an output path that is an input, holds one, or lies inside an input directory:
    writing there (or --force replacing it) would destroy or change what the output is made from.
    Also one under a file, which no directory can be made in, and one starting with a `~` the shell
    left as it is (`--out=~/x`), which would make a folder named `~` here."""
    first = Path(out).parts[0] if Path(out).parts else ""
    if first.startswith("~") and not Path(first).exists():
        raise TinykError(f"{flag} {out}: {first} was not expanded to a home directory (a shell does so only at the "
                         f"start of a word: {flag} ~/x, not {flag}=~/x); give the path in full, or ./{out} for a "
                         f"folder named so")
    o = Path(out).resolve()
    for i in inputs:
        if i is None:
            continue
        p = Path(i).resolve()
        if any(same_path(o, a) for a in (p, *p.parents)):
            raise TinykError(f"{flag} {out} would replace the input {i}; choose another output path")
        if any(same_path(a, p) for a in o.parents):
            raise TinykError(f"{flag} {out} lies inside the input {i}; inputs are never written to")
    nearest = next((a for a in Path(out).absolute().parents if a.exists() or a.is_symlink()), None)
    if nearest is not None and nearest.is_symlink() and not nearest.exists():  # runs -> /mnt/disk/runs, unmounted
        raise TinykError(f"{flag} {out}: {dangling_link(nearest, 'create its target or remove the link')}")
    if nearest is not None and not nearest.is_dir():
        raise TinykError(f"{flag} {out}: {nearest} is a file, not a directory")


def same_path(a: Path, b: Path) -> bool:
    """The same file or folder: by name, or by identity where the names differ only in case (macOS's
    and Windows' file systems ignore it), or by a hard link or bind mount."""
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):  # either is missing
        return False


def check_output_file(out: str | Path, inputs: Iterable[str | Path | None], *, force: bool,
                      replaces: tuple[str, Callable[[Path], bool]] | None = None, flag: str = "--out",
                      holds: str = "the JSON results") -> None:
    """Refuses an output file that could not be written, or whose writing would destroy something:
    checked before the work, so a mistake costs nothing. With `replaces` (what this kind of output is
    called, and a check that a file is one) --force replaces only such a file. `flag` and `holds` name
    the option and what it writes, for the messages."""
    path = Path(out)
    if str(out) == "-":  # as --prompt-file - reads stdin, it would seem to print on stdout
        raise TinykError(f"{flag} - would name a file '-': give a file name for {holds}")
    if path.is_dir():  # first: a folder holding an input (--out /tmp) is no file name, not that input
        raise TinykError(f"{flag} {out} is a directory; give a file name for {holds}")
    check_output(out, inputs, flag)
    if str(out).endswith(("/", os.sep)):  # Path() drops the slash: x.json/ would be written as the file x.json
        raise TinykError(f"{flag} {out} ends in '/', which names a directory; give a file name for {holds}")
    if path.is_symlink() and not path.exists():
        raise TinykError(f"{flag} {dangling_link(path, 'remove the link or choose another path')}")
    # What --force would not replace either is said first. (Past here a link's target exists.)
    if path.exists() and not path.is_file():  # /dev/null, a pipe
        raise TinykError(f"{flag} {out} is not a regular file, so it is not replaced; choose another path")
    if path.is_symlink():  # the file is written beside it and renamed over the link: /dev/stdout became a file
        raise TinykError(f"{flag} {out} is a symbolic link (to {os.readlink(path)}), which a new file would replace; "
                         f"give the path it points to, or another")
    if path.exists() and replaces is not None and not replaces[1](path):
        raise TinykError(f"{flag} {out} exists and is not {replaces[0]}, so it is not replaced; remove it yourself "
                         f"or choose another path")
    if path.exists() and not force:
        raise TinykError(f"{flag} {out} exists (use --force to replace it)")
    parent = path.parent
    if not parent.is_dir():
        raise TinykError(f"{flag} {out}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise TinykError(f"{flag} {out}: directory {parent} is not writable")
    try:  # a real write: root passes the access check where nothing can be written (/sys, /proc, read-only)
        fd, probe = tempfile.mkstemp(prefix=f".{_stem(path.name)}.tmp-probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise write_error(path, e) from e


def without_dotdot(path: Path) -> Path:
    """`path` with a '..' before its name resolved: out/../out names its siblings through itself, a way
    that is gone once it is moved aside to be replaced."""
    return path.parent.resolve() / path.name if ".." in path.parent.parts else path


@contextlib.contextmanager
def atomic_dir(out: str | Path, force: bool = False, inputs: Iterable[str | Path | None] = (),
               replaces: tuple[str, Callable[[Path], bool]] | None = None,
               partial: bool = False, durable: bool = False) -> Iterator[Path]:
    """Yields a temporary sibling of `out` to fill; renames it into place only on success.

    An existing `out` is refused unless `force`, and is replaced only once the new one is complete;
    with `replaces` (what this kind of output is called, and a check that a directory is one) only
    an empty directory or such an output is replaced, so a mistyped --out never deletes someone's
    files. `out` may not overlap any of `inputs`. The temporary is named
    `.{name}.tmp-{host}-{pid}-XXXX`, so a later run can remove one left by a killed process (see
    `remove_stale_temps`). With `partial`, the temporary is `partial_sibling(out)` instead, made if
    missing and left in place on failure, for the caller to continue or remove. With `durable`, the
    output is on the disk (`sync_tree`) before it is renamed into place, and the rename once it is:
    what the caller deletes next (older checkpoints) is never the only copy that survives a power cut.
    """
    out = Path(out)
    if out.name in ("", ".", ".."):
        raise TinykError(f"output directory {str(out)!r} must be named (e.g. data/pretrain), not '.' or '..'")
    out = without_dotdot(out)
    check_output(out, inputs)
    remove_stale_temps(out)  # first: an output a killed replace had moved aside is back, and checked below
    _check_replace(out, force, replaces)
    was = _identity(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if partial:
            tmp = partial_sibling(out)
            _refuse_odd_partial(tmp)
            tmp.mkdir(exist_ok=True)
        else:
            tmp = Path(tempfile.mkdtemp(prefix=f".{_stem(out.name)}.tmp-{_owner()}-", dir=out.parent))
    except OSError as e:  # said of the output, not of a hidden temporary the user never named
        raise write_error(out, e) from e
    kept: Path | None = None
    try:
        yield tmp
        _share_like_umask(tmp)
        if durable:
            sync_tree(tmp)
        try:  # again: something may have been put there meanwhile (another run, the user)
            _check_replace(out, force, replaces)
            if _identity(out) not in (was, None):  # --force replaces what was there, not another run's newer output
                raise TinykError(f"output directory {out} is not replaced")
        except TinykError as e:
            kept = _keep_aside(tmp, out)  # complete, partial or not
            raise TinykError(f"{e} ({out} appeared or changed while this ran; the new output is kept as {kept})") \
                from None
        if out.exists() or out.is_symlink():
            # Its own name: an aside this process left earlier (a carry-over that failed) may be there.
            old = out.with_name(f".{_stem(out.name)}.old-{_owner()}-{secrets.token_hex(4)}")
            try:
                os.replace(out, old)
            except OSError as e:  # the work is done, so it is kept: a bind mount ismount() did not see, a
                kept = _keep_aside(tmp, out)  # folder made immutable (chattr +i) or another user's in /tmp
                why = _mount_point(out) if e.errno == errno.EBUSY else \
                    f"cannot replace {shown(out)}: {e.strerror or first_line(e)}"
                raise TinykError(f"{why} (this output is kept as {kept})") from e
            if old.is_symlink() and old.is_dir():
                print(f"tinyk: note: {shown(out)} was a link to {shown(old.readlink())}; it is now a folder of its "
                      f"own here, and the folder it pointed to is left as it was", file=sys.stderr)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old, out)  # the earlier output stays where it was
                raise
            try:
                _carry_over(old, out)
            except OSError as e:  # the new output is in place: the rest stays aside, for a later run to move
                print(f"tinyk: warning: {shown(old)} keeps files of the replaced {shown(out)} that could not be "
                      f"moved into the new one ({first_line(e)})", file=sys.stderr)
            else:
                remove_path(old, ignore_errors=True)  # --force on a link replaces the link, not what it points to
        else:
            os.replace(tmp, out)
        if durable:
            sync_folder(out.parent)
    except BaseException:
        if not partial and kept is None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _refuse_odd_partial(tmp: Path) -> None:
    """A link or a file where a stopped run leaves its folder: what a link points to would be emptied
    and made the output, and a file was reported as the output itself existing."""
    if tmp.is_symlink():
        raise TinykError(f"{shown(tmp)} is a link, where a stopped run of this command leaves its folder; remove the "
                         f"link (what it points to is left as it is) or move that folder itself there")
    if tmp.exists() and not tmp.is_dir():
        raise TinykError(f"{shown(tmp)} is not a folder, where a stopped run of this command leaves one; remove it "
                         f"or give another --out")


def sync_tree(root: Path) -> None:
    """Puts every file under `root`, and the folder entries naming them, on the disk. Renaming a
    folder into place orders nothing: after a power cut it could be there in name with its files empty."""
    for folder, _, names in os.walk(root):
        for name in names:
            sync_file(Path(folder, name))
        sync_folder(Path(folder))


def sync_file(path: Path) -> None:
    """Puts a file's contents on the disk."""
    fd = os.open(path, os.O_RDWR if os.name == "nt" else os.O_RDONLY)  # Windows flushes only a handle open for writing
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_folder(folder: Path) -> None:
    """Puts a folder's entries (a file renamed into it) on the disk, where the system can."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows opens no folders
        return
    try:
        with contextlib.suppress(OSError):  # some file systems take no fsync of a folder (EINVAL)
            os.fsync(fd)
    finally:
        os.close(fd)


def _identity(path: Path) -> tuple[int, int] | None:
    """Which directory (or file, or link) is at `path` now: its device and inode, None for none."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _check_replace(out: Path, force: bool, replaces: tuple[str, Callable[[Path], bool]] | None) -> None:
    """Refuses to replace an existing `out` without `force`, or (with `replaces`) one that is not this
    kind of output: a mistyped --out never deletes someone's files. A mount point cannot be renamed,
    so it is refused before the work rather than after."""
    if out.is_dir() and not out.is_symlink() and os.path.ismount(out):
        raise TinykError(_mount_point(out))
    if out.exists() and not out.is_dir() and replaces is not None:  # not "use --force", which refuses it too
        raise TinykError(f"output {out} is a file, not a directory; remove it yourself or choose another path")
    if out.is_symlink() and not out.exists() and not force:
        raise TinykError("output " + dangling_link(out, "remove the link, or use --force to replace it with a folder"))
    if out.exists() and replaces is not None:  # first: --force would not replace it either
        what, is_one = replaces
        held = sorted(p.name for p in out.iterdir())
        if held and not is_one(out):
            raise TinykError(f"{out} exists and is not {what}, so it is not replaced (it holds "
                             f"{', '.join(held[:3])}{', ...' if len(held) > 3 else ''}); remove it yourself or "
                             "choose another path")
    if out.exists() and not force:  # a dangling link was said above
        raise TinykError(f"output directory exists: {out} (use --force to replace it)")


def dangling_link(out: Path, fix: str) -> str:
    """A symbolic link whose target is missing (a disk not mounted, a folder moved) is no existing
    output: say where it points, so the user can restore the target."""
    return f"{out} is a symbolic link to {os.readlink(out)}, which does not exist (a disk not mounted?); {fix}"


def _mount_point(out: Path) -> str:
    return (f"output {out} is a mount point (a volume, a Docker -v folder), which cannot be replaced: tinyk "
            f"writes a new folder beside an output and renames it into place; give a folder inside it instead")


def _keep_aside(tmp: Path, out: Path) -> Path:
    """Where a finished output that cannot replace `out` is kept: `out.new` (or `out.new-2`, ...), else `tmp`."""
    kept = _unused_name(out.with_name(f"{_stem(out.name)}.new"))
    try:
        os.replace(tmp, kept)
    except OSError:
        return tmp
    return kept


def _unused_name(path: Path) -> Path:
    """`path`, or `path-2`, `path-3`, ...: the first that does not exist."""
    candidate, n = path, 1
    while candidate.exists() or candidate.is_symlink():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


# The files that describe a model, tokenizer or dataset, by the exact names tinyk and transformers'
# save_pretrained give them (it adds some tinyk does not write, chat_template.jinja first among them,
# which outranks the template the new output carries): they go with the output they described. Any
# other name is the user's (notes, vocab_study/, training_args.bin) and stays.
_OUTPUT_FILES = re.compile(r"config\.json|generation_config\.json|model(-\d+-of-\d+)?\.safetensors|"
                           r"pytorch_model(-\d+-of-\d+)?\.bin|(model\.safetensors|pytorch_model\.bin)\.index\.json|"
                           r"tokenizer\.json|tokenizer_config\.json|special_tokens_map\.json|added_tokens\.json|"
                           r"chat_template\.jinja|vocab\.(json|txt)|merges\.txt|tokenizer\.model|"
                           r"meta\.json|progress\.json")


def is_output_file(name: str) -> bool:
    """A name that a model, tokenizer or dataset file has (`_OUTPUT_FILES`), not one of the user's."""
    return bool(_OUTPUT_FILES.fullmatch(name))


def _carry_over(old: Path, new: Path) -> None:
    """Moves into a new output the entries of the one it replaced that it lacks and that do not describe
    a model (`_OUTPUT_FILES`): the user's own (an eval's results in a demo folder, notes beside a
    model). --force replaces what tinyk made, only. A folder inside both (the demo's chat/, runs/) is
    gone through the same way, but not a dataset or a training run (meta.json, config.yaml): their shards,
    checkpoints and best/ went with the data and the run they held, and are replaced as a whole."""
    if old.is_symlink() or not old.is_dir():
        return
    for p in old.iterdir():
        target = new / p.name
        if is_output_file(p.name):
            continue
        if not target.exists() and not target.is_symlink():
            os.replace(p, target)
        elif p.is_dir() and not p.is_symlink() and target.is_dir() and not target.is_symlink() and not any(
                (p / name).is_file() for name in ("meta.json", "config.yaml")):
            _carry_over(p, target)


def partial_sibling(out: str | Path) -> Path:
    """`.{name}.partial` beside `out`: where a run that can be continued keeps its work until done."""
    out = Path(out)
    return out.with_name(f".{_stem(out.name)}.partial")


class DirLock:
    """An exclusive advisory lock on a directory while a process works in it. The kernel drops it when
    the process dies, so a killed run never leaves a stale lock behind; where locks are unsupported
    (not POSIX, some network filesystems) it always succeeds."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.fd: int | None = None

    def acquire(self) -> bool:
        """True when this process now holds the lock; False when another one does."""
        try:
            import fcntl
        except ImportError:
            return True
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except OSError:
            os.close(fd)
            return True
        self.fd = fd
        return True

    @property
    def held(self) -> bool:
        """Whether this process holds the lock: not where locks are unsupported, though `acquire` said True."""
        return self.fd is not None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    __del__ = release

    def holders(self) -> list[str]:
        """The processes holding the lock, as "pid (command line)", where the kernel lists them (Linux's
        /proc/locks; nothing elsewhere, or for a process in another PID namespace or on another machine)."""
        try:
            st = self.path.stat()
            locks = Path("/proc/locks").read_text(encoding="ascii", errors="replace").splitlines()
        except OSError:
            return []
        where = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        found = []
        for fields in (line.split() for line in locks):  # "1: FLOCK ADVISORY WRITE <pid> <maj:min:inode> 0 EOF"
            if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == where and fields[4].isdigit():
                try:
                    args = Path(f"/proc/{fields[4]}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
                    command = " ".join(b" ".join(args).decode(errors="replace").split())  # one line
                except OSError:  # gone: the lock is held through a descriptor a child of it inherited
                    command = "exited; a process it started holds the lock"
                if len(command) > 100:  # cut between arguments: a flag cut short reads as another flag
                    command = command[:101].rsplit(" ", 1)[0] + " ..."
                found.append(f"{fields[4]} ({command})")
        return found


def _host() -> str:
    """This machine's name as it may appear in a file name. A pid says whether a process is alive
    only on the machine that issued it, and outputs can live on a filesystem several machines share."""
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())[:64] or "localhost"


def _owner() -> str:
    """`{host}-{pid}`: who made a temporary, as `remove_stale_temps` reads it back."""
    return f"{_host()}-{os.getpid()}"


def _stem(name: str) -> str:
    """`name` as temporaries beside it carry it: cut short, and told apart by a hash, where
    `.{name}.tmp-{host}-{pid}-XXXXXXXX` would pass the 255-byte limit filesystems put on a name (a
    legal output name must get a legal temporary)."""
    raw = os.fsencode(name)
    room = 255 - len(f"..tmp-{_host()}-{'9' * 7}-{'X' * 8}".encode())  # pids have at most 7 digits
    if len(raw) <= room:
        return name
    digest = hashlib.sha256(raw).hexdigest()[:8]
    cut = room - len(digest) - 1
    # Not inside a UTF-8 character (before a continuation byte), so the temporary's name stays text
    # wherever it is shown or handed to a library.
    while cut and raw[cut] & 0xC0 == 0x80:
        cut -= 1
    return os.fsdecode(raw[:cut]) + "." + digest


def _pid_running(pid: int) -> bool:
    """False only when no process `pid` exists on this machine; in doubt, True."""
    if os.name == "nt":
        return _windows_pid_running(pid)
    if os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # PermissionError: someone else's process
        return True
    return True


def _windows_pid_running(pid: int) -> bool:
    """`_pid_running` on Windows, where os.kill(pid, 0) would end the process: asks the kernel."""
    import ctypes

    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]
    handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return ctypes.get_last_error() != 87  # ERROR_INVALID_PARAMETER: no such process (else: not ours to ask)
    try:
        code = ctypes.c_ulong()
        return not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)) or code.value == 259  # STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)


def remove_stale_temps(out: str | Path) -> list[Path]:
    """Removes what a killed `atomic_dir` left beside `out`: `.{name}.tmp-{host}-{pid}-XXXX` and
    `.{name}.old-{host}-{pid}-XXXXXXXX` directories made on this machine by a process that no longer runs; an
    `.old-` one is put back instead when `out` itself is missing. Returns what was removed.

    Anything else is left alone: a directory whose process is alive, one made on another machine
    sharing the filesystem, and temporaries named by older versions, whose owner cannot be told.
    """
    out = Path(out)
    host = re.escape(_host())
    pattern = re.compile(rf"\.{re.escape(_stem(out.name))}\.(?:tmp-{host}-([0-9]+)-[A-Za-z0-9_]+|"
                         rf"old-{host}-([0-9]+)(?:-[0-9a-f]{{8}})?)")
    try:
        siblings = list(out.parent.iterdir())
    except OSError:
        return []
    removed = []
    for p in siblings:
        m = pattern.fullmatch(p.name)
        if not m:
            continue
        pid = int(m.group(1) or m.group(2))
        if pid <= 0 or pid == os.getpid() or _pid_running(pid):
            continue
        if m.group(2):
            if restore_aside(p, out):
                removed.append(p)
        elif p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def restore_aside(aside: Path, out: Path) -> bool:
    """What a replace killed midway (`atomic_dir`) left in `aside`, the output it replaced: put back where
    it was if nothing took its place, else its user's entries carried into what did and the rest removed.
    Whether it is gone (not where it cannot be moved, nor a folder's carry-over that failed: kept for a
    later run)."""
    if not (out.exists() or out.is_symlink()):
        with contextlib.suppress(OSError):  # another process may be cleaning up too
            os.replace(aside, out)  # killed between moving the old output aside and the new one in
        return False
    if aside.is_symlink() or not aside.is_dir():
        return False
    if out.is_dir() and not out.is_symlink():  # killed after the new output went in
        try:
            _carry_over(aside, out)
        except OSError:
            return False
    shutil.rmtree(aside, ignore_errors=True)
    return True


def _share_like_umask(root: Path) -> None:
    """Gives a finished output the permissions a plain `mkdir`/`open` would have: `mkdtemp` makes the
    directory private (0700) and safetensors writes 0600, which would hide a model from other users."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(root, 0o777 & ~mask)
    for parent, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(parent, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(parent, name), 0o666 & ~mask)


def _remove_stale_temp_files(path: Path, suffix: str) -> None:
    """Removes the temporaries of `path` that `atomic_file` in a killed process on this machine left."""
    pattern = re.compile(rf"\.{re.escape(_stem(path.name))}\.tmp-{re.escape(_host())}-([0-9]+){re.escape(suffix)}")
    with contextlib.suppress(OSError):
        for p in path.parent.iterdir():
            m = pattern.fullmatch(p.name)
            if m and int(m[1]) != os.getpid() and not _pid_running(int(m[1])) and p.is_file() \
                    and not p.is_symlink():
                p.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_file(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """A temporary sibling to write: it replaces `path` when the block succeeds and is removed when
    it fails, so readers never see half a file and a failed write (a full disk) leaves nothing behind.
    It is put on the disk before the rename: else a power cut could leave `path` renamed but empty.
    `suffix` keeps an extension that the writer reads the format from (matplotlib's .png)."""
    path = Path(path)
    tmp = path.with_name(f".{_stem(path.name)}.tmp-{_owner()}{suffix}")
    _remove_stale_temp_files(path, suffix)
    try:
        yield tmp
        sync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def rust_path(path: str | Path) -> Iterator[str]:
    """`path` (a file or directory) as a str that Rust libraries (safetensors, tokenizers) open as the
    same one. They encode str paths as UTF-8, while the name is in the locale's encoding (GBK) or raw
    bytes (an unpacked Windows zip): such a path is reached through this process's descriptor for it."""
    s = str(path)
    try:
        same = os.fsencode(s) == s.encode("utf-8")
    except UnicodeEncodeError:  # a surrogate-escaped byte
        same = False
    if same or not os.path.isdir("/proc/self/fd"):
        yield s
        return
    fd = os.open(s, os.O_RDONLY)
    try:
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Writes `obj` as JSON, complete or not at all (see `write_text_atomic`)."""
    write_text_atomic(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


def write_text_atomic(path: str | Path, text: str) -> None:
    """Writes `text` as UTF-8, complete or not at all (see `atomic_file`). Paths in it whose bytes are not
    UTF-8 (a GBK folder name) are written as `shown` prints them."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(shown(text).encode("utf-8"))


PROGRESS_LINE_S = 60.0  # without a terminal (a log, a batch job) a line this often instead of a bar


def shows_a_bar(stream: Any) -> bool:
    """A terminal with room for a progress bar: one that reports 0 rows (some containers' and CI's)
    gets tqdm's bar hidden, and so nothing at all, unless it gets plain lines instead."""
    try:
        return is_terminal(stream) and fd_shows_a_bar(stream.fileno())
    except (OSError, ValueError, AttributeError):  # no file descriptor (a test's capture), or not a terminal
        return False


def fd_shows_a_bar(fd: int) -> bool:
    """`shows_a_bar` for a file descriptor (the `tokenizers` library draws its bar on 1, past sys.stdout)."""
    try:
        return os.isatty(fd) and os.get_terminal_size(fd).lines > 0
    except OSError:
        return False
