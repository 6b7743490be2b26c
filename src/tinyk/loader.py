"""Reading prepared datasets for training and evaluation: memory-mapped, deterministic, resumable.

All ranks compute the same global sample order (a seeded permutation per epoch) and keep the
same global cursor; each call consumes one group of `micro_batch * world_size` samples and
rank r takes the r-th slice. The cursor is therefore independent of how the global batch is
divided, so a run can resume with another world size and the same sample stream (SFT's order
also depends on the global batch size, which a resume must keep).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .data import FORMAT_VERSION, SPLITS, data_files
from .errors import TinykError
from .inputs import read_json, sha256_file
from .outputs import marker_file, plain_name
from .tokenizer import IM_END_ID
from .units import is_number

if TYPE_CHECKING:
    import torch

PAD_ID = IM_END_ID
IGNORE = -100
SFT_BUCKET = 1024
# SFT batches are padded to a multiple of this: every new sequence length costs the CPU backend
# new kernels and cached buffers (measured on the demo's SFT: 15% faster, half the memory).
PAD_MULTIPLE = 16
_LOSS_COUNT_CHUNK = 1 << 24


class UnusableSplit(TinykError):
    """A split with nothing to read at this seq_len (empty, too short, no answer within the window):
    a run without validation data, not damaged data, which stops a run."""


def open_dataset(data_dir: str | Path) -> dict[str, Any]:
    """Reads and validates meta.json; every loader starts here."""
    f = marker_file(data_dir, "meta.json", "tinyk data")
    try:
        meta = read_json(f)
    except ValueError as e:  # not JSON, not UTF-8, nested too deeply
        raise TinykError(f"invalid {f}: {e}") from e
    problem = _meta_problem(meta)
    if problem:
        raise TinykError(f"invalid {f}: {problem}")
    return meta


def _meta_problem(meta: Any) -> str | None:
    if not isinstance(meta, dict):
        return "not a JSON object"
    kind = meta.get("kind")
    if kind not in ("pretrain", "sft"):
        return f"unknown kind {kind!r}"
    if meta.get("format_version") != FORMAT_VERSION:
        return f"format_version {meta.get('format_version')!r}; this tinyk reads {FORMAT_VERSION} (re-run tinyk data)"
    if meta.get("dtype") not in ("uint16", "uint32"):
        return f"unknown dtype {meta.get('dtype')!r}"
    if not isinstance(meta.get("tokenizer_hash"), str) or not _count(meta.get("vocab_size")):
        return "missing or wrong tokenizer_hash or vocab_size"
    if kind == "sft" and not (_count(meta.get("max_len")) and isinstance(meta.get("system_prompt") or "", str)):
        return "missing or wrong max_len or system_prompt"
    if not _skips_ok(meta.get("skipped", {})):
        return "skipped is not an object of counts, places and hints by reason"
    if kind == "sft" and not _counts_ok(meta.get("truncated", {})):
        return "truncated is not an object of counts"
    fraction = meta.get("val_fraction")
    if fraction is not None and not (is_number(fraction) and 0 <= fraction < 1):
        return "val_fraction is not a share from 0 to 1"
    inputs = meta.get("inputs", [])
    if not (isinstance(inputs, list) and all(
            isinstance(i, dict) and isinstance(i.get("path"), str) and _count(i.get("bytes")) for i in inputs)):
        return "inputs is not a list of {path, bytes}"
    if not isinstance(meta.get("command", ""), str):
        return "command is not a string"
    seconds = meta.get("seconds", 0)
    if not (is_number(seconds) and seconds >= 0):
        return "seconds is not a number of seconds"
    need = ("documents", "tokens", "bytes", "shards" if kind == "pretrain" else "loss_tokens")
    splits = meta.get("splits")
    for split in SPLITS:
        s = splits.get(split) if isinstance(splits, dict) else None
        if not isinstance(s, dict) or any(k not in s for k in need):
            return f"split {split!r} is missing or lacks one of {', '.join(need)}"
        shards = s.get("shards", [])
        if not (all(_count(s[k]) for k in need if k != "shards") and _count(s.get("longest", 0)) and isinstance(
                shards, list) and all(
                isinstance(x, dict) and isinstance(x.get("file"), str) and _count(x.get("tokens")) for x in shards)):
            return f"split {split!r} has counts that are not whole numbers"
        if any(x["tokens"] == 0 for x in shards):  # tinyk writes none, and an empty file cannot be mapped
            return f"split {split!r} lists an empty shard"
        # A name, not a path: a damaged or hand-edited meta.json must not make a run read files elsewhere.
        outside = next((x["file"] for x in shards if not plain_name(x["file"])), None)
        if outside is not None:
            return f"split {split!r} names a shard {outside!r} outside its folder"
    return None


def _count(value: Any) -> bool:
    return type(value) is int and value >= 0


def _counts_ok(value: Any) -> bool:
    return isinstance(value, dict) and all(_count(n) for n in value.values())


def _skips_ok(skipped: Any) -> bool:
    """What `Skips.to_json` writes, as the summary reads it: a count, its first places and any hint per reason."""
    if not isinstance(skipped, dict):
        return False
    counts, first, hints = (skipped.get(k, {}) for k in ("by_reason", "first", "hints"))
    return (_counts_ok(counts) and isinstance(first, dict) and isinstance(hints, dict)
            and all(isinstance(first.get(r), list) and all(isinstance(w, str) for w in first[r]) for r in counts)
            and all(isinstance(h, str) for h in hints.values()))


def _split_folder(data_dir: str | Path, meta: dict[str, Any], split: str) -> Path:
    if split not in SPLITS:
        raise TinykError(f"unknown split {split!r} (use {' or '.join(SPLITS)})")
    if not meta["splits"][split]["tokens"]:
        raise UnusableSplit(f"the {split} split of {data_dir} is empty")
    return Path(data_dir) / split


def _memmap(path: Path, dtype: str, count: int) -> np.memmap:
    expected = count * np.dtype(dtype).itemsize
    if not path.is_file() or path.stat().st_size != expected:
        raise TinykError(f"{path} is missing or not {expected} bytes as meta.json says (re-run tinyk data)")
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


def check_files(data_dir: str | Path, meta: dict[str, Any]) -> None:
    """Every file meta.json names is there, of the size it says (what `tinyk data info` vouches for)."""
    for split in SPLITS:
        s, folder = meta["splits"][split], Path(data_dir) / split
        if not s["tokens"]:
            continue
        if meta["kind"] == "pretrain":
            for shard in s["shards"]:
                _memmap(folder / shard["file"], meta["dtype"], shard["tokens"])
        else:
            _memmap(folder / "tokens.bin", meta["dtype"], s["tokens"])
            _memmap(folder / "mask.bin", "uint8", s["tokens"])
            _load_offsets(folder / "offsets.npy", s["documents"], s["tokens"])


def verify_files(data_dir: str | Path, meta: dict[str, Any]) -> int:
    """Each file's SHA-256 against the one meta.json recorded when the data was made (a copy, an old
    disk, a file edited since); returns how many files were read."""
    where = Path(data_dir) / "meta.json"
    recorded, names = meta.get("sha256"), data_files(meta)
    if recorded is None:
        raise TinykError(f"{where} records no checksums to verify against (the data was made by a tinyk from "
                         f"before 2026-12-04); training still checks its sizes and token ids, and data made again "
                         f"records them")
    if not (isinstance(recorded, dict) and set(recorded) == set(names)
            and all(isinstance(v, str) for v in recorded.values())):
        raise TinykError(f"invalid {where}: its checksums do not list the files it describes")
    bad = [n for n in names if sha256_file(Path(data_dir) / n) != recorded[n]]
    if bad:
        raise TinykError(f"{len(bad)} of {len(names)} files in {data_dir} differ from the checksums meta.json "
                         f"recorded ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}): damaged or changed "
                         f"since; make the data again")
    return len(names)


def _load_offsets(path: Path, documents: int, tokens: int) -> np.ndarray:
    """The conversation boundaries: documents + 1 increasing integers from 0 to `tokens`."""
    if not path.is_file():
        raise TinykError(f"{path} is missing (re-run tinyk data)")
    try:
        offsets = np.load(path, allow_pickle=False)
    except (ValueError, EOFError, OSError) as e:  # not .npy, pickled, truncated, unreadable
        raise TinykError(f"{path} is damaged or not a NumPy array file (re-run tinyk data)") from e
    if (offsets.dtype.kind not in "iu" or offsets.shape != (documents + 1,) or offsets[0] != 0
            or offsets[-1] != tokens or np.any(offsets[1:] <= offsets[:-1])):  # np.diff wraps on unsigned ids
        raise TinykError(f"{path} does not match meta.json (re-run tinyk data)")
    return offsets.astype(np.int64, copy=False)


def _check_ids(ids: np.ndarray, vocab: int, folder: Path) -> None:
    """A damaged shard's ids past the vocabulary: one line here, not an IndexError from the embedding
    (on CUDA a device-side assert that kills the process). A max over a batch costs next to nothing."""
    top = int(ids.max(initial=0))
    if top >= vocab:
        raise TinykError(f"{folder} holds token id {top}, past the tokenizer's vocabulary of {vocab}: the data is "
                         f"damaged; re-run tinyk data")


def _room_to_open(n: int, folder: Path) -> None:
    """Makes room for `n` more open files: each memory-mapped shard keeps one, and a data directory of
    many small shards passes the usual soft limit of 1024. The soft limit is raised toward the hard
    one, as any process may; past the hard one, one line says what to do."""
    try:
        import resource
    except ImportError:  # Windows: no such limit to raise
        return
    fds = next((p for p in (Path("/proc/self/fd"), Path("/dev/fd")) if p.is_dir()), None)  # Linux, macOS
    open_now = len(list(fds.iterdir())) if fds else 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = open_now + n + 64  # and room for what opens files later (checkpoints, logs, compilers)
    if soft == resource.RLIM_INFINITY or need <= soft:
        return
    limit = "the system's limit per process" if hard == resource.RLIM_INFINITY else f"ulimit -n allows {hard:,}"
    too_many = TinykError(f"{folder} has {n:,} shard files, more than this process may keep open ({limit}); "
                          "raise that limit, or remake the data with a larger --shard-tokens")
    if hard != resource.RLIM_INFINITY and need > hard:
        raise too_many
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    except (ValueError, OSError):  # macOS: an unlimited hard limit still stops at kern.maxfilesperproc
        raise too_many from None


class _Windows:
    """Windows of seq_len + 1 tokens starting every seq_len tokens over the concatenated shards."""

    def __init__(self, data_dir: str | Path, meta: dict[str, Any], split: str, seq_len: int):
        folder = _split_folder(data_dir, meta, split)
        _room_to_open(len(meta["splits"][split]["shards"]), folder)
        self.shards = [_memmap(folder / s["file"], meta["dtype"], s["tokens"]) for s in meta["splits"][split]["shards"]]
        self.bounds = np.cumsum([0] + [len(s) for s in self.shards])
        self.seq_len, self.folder, self.vocab = seq_len, folder, meta["vocab_size"]
        total = int(self.bounds[-1])
        self.size = (total - 1) // seq_len
        if self.size < 1:
            fits = f" (--seq-len {total - 1} or less fits)" if total > 1 else ""
            raise UnusableSplit(f"the {split} split of {data_dir} has {total} tokens, fewer than seq_len + 1 = "
                                f"{seq_len + 1}{fits}")

    def _read(self, start: int, length: int) -> np.ndarray:
        i = int(np.searchsorted(self.bounds, start, side="right")) - 1
        parts = []
        while length:
            offset = start - int(self.bounds[i])
            piece = self.shards[i][offset:offset + length]
            parts.append(piece)
            length -= len(piece)
            start += len(piece)
            i += 1
        return np.concatenate(parts)

    def fetch(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.stack([self._read(int(w) * self.seq_len, self.seq_len + 1) for w in idx]).astype(np.int64)
        _check_ids(rows, self.vocab, self.folder)
        return _tensors(np.ascontiguousarray(rows[:, :-1]), np.ascontiguousarray(rows[:, 1:]))


def _tensors(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """torch is imported only here, where batches are made, so that `tinyk data info` starts in a moment."""
    import torch

    return torch.from_numpy(x), torch.from_numpy(y)


def _loss_counts(mask: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Loss tokens among each conversation's targets (positions 1..length-1), in bounded chunks."""
    out = np.empty(len(starts), np.int64)
    i = 0
    while i < len(starts):
        j = max(i + 1, int(np.searchsorted(starts, starts[i] + _LOSS_COUNT_CHUNK)))
        lo, hi = int(starts[i]), int(starts[j - 1] + lengths[j - 1])
        cs = np.concatenate([[0], np.cumsum(mask[lo:hi], dtype=np.int64)])
        s = starts[i:j] - lo
        out[i:j] = cs[s + lengths[i:j]] - cs[s + 1]
        i = j
    return out


class _Conversations:
    """Conversations cut to seq_len + 1 tokens; those left without a loss token are dropped."""

    def __init__(self, data_dir: str | Path, meta: dict[str, Any], split: str, seq_len: int):
        folder = _split_folder(data_dir, meta, split)
        s = meta["splits"][split]
        self.tokens = _memmap(folder / "tokens.bin", meta["dtype"], s["tokens"])
        self.mask = _memmap(folder / "mask.bin", "uint8", s["tokens"])
        offsets = _load_offsets(folder / "offsets.npy", s["documents"], s["tokens"])
        whole = np.diff(offsets)
        starts, lengths = offsets[:-1], np.minimum(whole, seq_len + 1)
        usable = _loss_counts(self.mask, starts, lengths) > 0
        self.starts, self.lengths = starts[usable], lengths[usable]
        self.size = len(self.starts)
        self.seq_len, self.folder, self.vocab = seq_len, folder, meta["vocab_size"]
        self.dropped = int((~usable).sum())
        # Kept, but with loss tokens past the window (not only the newline after a last <|im_end|>).
        long = usable & (whole > seq_len + 1)
        self.cut = int((_loss_counts(self.mask, starts[long] + seq_len, whole[long] - seq_len) > 0).sum())
        if not self.size:
            raise UnusableSplit(f"no conversation in the {split} split of {data_dir} has an assistant token within "
                                f"seq_len {seq_len}")

    def fetch(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded with <|im_end|> to the longest in the batch, rounded up to a multiple of
        PAD_MULTIPLE; no loss on padding or prompts."""
        lens = self.lengths[idx]
        width = min(-(-(int(lens.max()) - 1) // PAD_MULTIPLE) * PAD_MULTIPLE, self.seq_len)
        x = np.full((len(idx), width), PAD_ID, np.int64)
        y = np.full_like(x, IGNORE)
        for row, (s, n) in enumerate(zip(self.starts[idx].tolist(), lens.tolist(), strict=True)):
            t = self.tokens[s:s + n].astype(np.int64)
            x[row, :n - 1] = t[:-1]
            y[row, :n - 1] = np.where(self.mask[s + 1:s + n] != 0, t[1:], IGNORE)
        for ids in (x, y):  # every token the model reads or is scored on
            _check_ids(ids, self.vocab, self.folder)
        return _tensors(x, y)


SplitData = _Windows | _Conversations  # a split as `open_split` opens it


def open_split(data_dir: str | Path, split: str, seq_len: int, kind: str | None = None) -> SplitData:
    """A split ready to read: its shards opened and their sizes checked, and refused with one line when
    it cannot fill `seq_len` (too few tokens, no SFT conversation with an answer token within it)."""
    if seq_len < 1:
        raise TinykError(f"seq_len must be positive, got {seq_len}")
    meta = open_dataset(data_dir)
    if kind is not None and meta["kind"] != kind:
        raise TinykError(f"{data_dir} holds {meta['kind']} data, not {kind} data")
    return (_Windows if meta["kind"] == "pretrain" else _Conversations)(data_dir, meta, split, seq_len)


def _check_layout(micro_batch: int, rank: int, world_size: int) -> None:
    if micro_batch < 1:
        raise TinykError(f"micro_batch must be positive, got {micro_batch}")
    if not 0 <= rank < world_size:
        raise TinykError(f"rank {rank} is outside world size {world_size}")


class ResumeMismatch(TinykError):
    """A resume with settings that would repeat some samples of the epoch and skip others."""


class _Loader:
    """A rank's view of an endless, seeded, per-epoch sample order addressed by (epoch, cursor)."""

    ORDER = 1  # how samples are ordered: a new way gets a new number, so an old (epoch, cursor) is refused

    def __init__(self, data: SplitData, micro_batch: int, rank: int, world_size: int, seed: int):
        _check_layout(micro_batch, rank, world_size)
        self.data, self.micro_batch, self.rank, self.world_size, self.seed = data, micro_batch, rank, world_size, seed
        self.num_windows = data.size
        self._epoch = self._cursor = 0
        self._order: tuple[int, np.ndarray] | None = None

    def _epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng((self.seed, epoch)).permutation(self.num_windows)

    def _take(self, k: int) -> np.ndarray:
        out = []
        while k:
            if self._order is None or self._order[0] != self._epoch:
                self._order = (self._epoch, self._epoch_order(self._epoch))
            piece = self._order[1][self._cursor:self._cursor + k]
            out.append(piece)
            k -= len(piece)
            self._cursor += len(piece)
            if self._cursor == self.num_windows:
                self._epoch, self._cursor = self._epoch + 1, 0
        return np.concatenate(out)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's slice of the next global group; epochs roll over on their own."""
        group = self._take(self.micro_batch * self.world_size)
        return self.data.fetch(group[self.rank * self.micro_batch:(self.rank + 1) * self.micro_batch])

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def epochs_done(self) -> float:
        """Epochs so far, with the part of the current one: what a loss curve by epoch plots."""
        return self._epoch + self._cursor / self.num_windows

    def order_settings(self) -> dict[str, int]:
        """What the sample order depends on besides the data: a resume must keep them."""
        return {"seed": self.seed, "seq_len": self.data.seq_len}

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "cursor": self._cursor, "num_windows": self.num_windows, "order": self.ORDER,
                **self.order_settings()}

    def _saved_order(self, state: dict[str, Any]) -> int:
        return state.get("order", 1)  # the first order was not recorded

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self._saved_order(state) != self.ORDER:
            raise ResumeMismatch("this run was saved by an older tinyk, which put the samples in another order: "
                                 "resuming where it stopped would repeat some samples of the epoch and skip others; "
                                 "resume it with that version")
        for name, value in self.order_settings().items():
            saved = state.get(name, value)  # absent from checkpoints written before it was recorded
            if saved != value:
                raise ResumeMismatch(f"this run was saved with {name} {saved}; resume it with the same {name} "
                                     f"(which samples come next depends on it)")
        if state.get("num_windows", self.num_windows) != self.num_windows:
            raise ResumeMismatch(f"this run was saved with {state['num_windows']:,} samples per epoch, the data now "
                                 f"gives {self.num_windows:,} (the data or seq_len changed); resume it with the "
                                 f"data and seq_len it was saved with")
        epoch, cursor = int(state["epoch"]), int(state["cursor"])
        if epoch < 0 or not 0 <= cursor < self.num_windows:
            # a damaged checkpoint's: ValueError, which the trainer reports as one, with the way out
            raise ValueError(f"its data loader is at epoch {epoch}, window {cursor:,} of {self.num_windows:,}")
        self._epoch, self._cursor = epoch, cursor


class PretrainLoader(_Loader):
    """Shuffled (x, y) windows over memory-mapped pretraining shards; every token is trained on."""

    def __init__(self, data_dir: str | Path, split: str, seq_len: int, micro_batch: int, *, rank: int = 0,
                 world_size: int = 1, seed: int = 0):
        super().__init__(open_split(data_dir, split, seq_len, "pretrain"), micro_batch, rank, world_size, seed)


class SFTLoader(_Loader):
    """Padded conversation batches of similar lengths, in random order.

    Each epoch's order is shuffled, length-sorted within buckets (so a batch pads little), then cut
    into optimizer steps of `batch_size` conversations whose order is shuffled again (so training does
    not run short to long through every bucket). Buckets and steps count global samples, so the order
    does not depend on how the global batch is split across ranks and micro-batches.
    """

    ORDER = 2  # 2: steps shuffled whole after bucketing (2026-12-02)

    def __init__(self, data_dir: str | Path, split: str, seq_len: int, micro_batch: int, *, rank: int = 0,
                 world_size: int = 1, seed: int = 0, bucket: int = SFT_BUCKET, batch_size: int | None = None):
        data = open_split(data_dir, split, seq_len, "sft")
        super().__init__(data, micro_batch, rank, world_size, seed)
        self.bucket = bucket
        self.batch_size = batch_size or micro_batch * world_size
        self.dropped, self.cut = data.dropped, data.cut

    def _epoch_order(self, epoch: int) -> np.ndarray:
        order = super()._epoch_order(epoch)
        lengths = self.data.lengths
        order = np.concatenate([c[np.argsort(lengths[c], kind="stable")]
                                for c in np.split(order, range(self.bucket, len(order), self.bucket))])
        # Steps run on across epochs: the first `head` samples finish the step the last epoch began.
        head = min(len(order), -epoch * len(order) % self.batch_size)
        n_steps = (len(order) - head) // self.batch_size
        steps = order[head:head + n_steps * self.batch_size].reshape(n_steps, self.batch_size)
        shuffled = steps[np.random.default_rng((self.seed, epoch, 1)).permutation(n_steps)]
        return np.concatenate([order[:head], shuffled.ravel(), order[head + n_steps * self.batch_size:]])

    def order_settings(self) -> dict[str, int]:
        """Steps are shuffled whole, so the order also depends on the global batch."""
        return {**super().order_settings(), "batch_size": self.batch_size}

    def _saved_order(self, state: dict[str, Any]) -> int:
        return state.get("order", 2 if "batch_size" in state else 1)  # batch_size came with order 2


def eval_batches(data_dir: str | Path, split: str, seq_len: int, micro_batch: int, max_batches: int | None = None,
                 *, rank: int = 0, world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """A sequential, unshuffled pass over a split, sharded across ranks like the training loaders.

    `max_batches` counts global groups, so every rank stops after the same number of steps.
    """
    return split_batches(open_split(data_dir, split, seq_len), micro_batch, max_batches, rank=rank,
                         world_size=world_size)


def split_batches(data: SplitData, micro_batch: int, max_batches: int | None = None, *, rank: int = 0,
                  world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """`eval_batches` of a split already opened: opening an SFT split reads its whole loss mask."""
    _check_layout(micro_batch, rank, world_size)
    return _sequential(data.size, micro_batch, rank, world_size, max_batches, data.fetch)


def _sequential(size: int, micro_batch: int, rank: int, world_size: int, max_batches: int | None,
                fetch: Callable[[np.ndarray], tuple[torch.Tensor, torch.Tensor]]
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    group = micro_batch * world_size
    for n, start in enumerate(range(0, size, group)):
        if max_batches is not None and n >= max_batches:
            return
        lo = start + rank * micro_batch
        idx = np.arange(lo, min(lo + micro_batch, size))
        if len(idx):
            yield fetch(idx)
