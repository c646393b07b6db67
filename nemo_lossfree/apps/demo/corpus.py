"""Byte-level text corpus for the demo, with a held-out validation split.

Every machine that runs Python has the standard library's source files, so the
default corpus needs no download. Files are read in a fixed hashed order and a file
belongs to the validation split when a hash of its relative path says so:
the split is the same on every machine with the same Python version, and no
validation text is seen in training (no window straddles the two splits).

Training windows are drawn from ``numpy.random.default_rng((seed, step))``:
the data of step ``n`` depends on nothing but the seed and ``n``, so the data
position of a checkpoint is just its step, and every arm of the demo sees the
same tokens in the same order.
"""

from __future__ import annotations

import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

VOCAB_SIZE = 256  # bytes
TOKENIZERS = ("bytes", "bpe")
# One file in VAL_EVERY goes to the validation split (by path hash).
VAL_EVERY = 20
# Cap on the bytes read, so start-up stays fast (the stdlib is ~38 MB).
DEFAULT_MAX_BYTES = 24 * 1024 * 1024


@dataclass
class Corpus:
    train_tokens: np.ndarray  # uint8 (bytes) or uint16 (BPE ids) [N]
    val_tokens: np.ndarray  # [M]
    source: str
    vocab_size: int = VOCAB_SIZE


def default_corpus_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_root(path: Optional[str]) -> Path:
    """The file or directory ``load_corpus`` reads; ValueError when there is none.

    Also called before the workers start (``demo.settings.check_run``), so a
    wrong ``--corpus`` is one line, not a traceback from every rank.
    """
    root = Path(path) if path else default_corpus_root()
    if not (root.is_file() or root.is_dir()):
        raise ValueError(f"corpus: must be a text file or a directory of text files, got {str(root)!r}")
    return root


def _text_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    suffixes = (".py", ".txt", ".md", ".rst")
    files = [
        p for p in root.rglob("*")
        if p.is_file() and p.suffix in suffixes and "site-packages" not in p.parts
    ]
    # Hash order, not path order: any prefix (see max_bytes) is a sample of the
    # whole tree, with both splits in proportion.
    return sorted(files, key=lambda p: (zlib.crc32(str(p.relative_to(root)).encode()), str(p)))


def _is_validation(relative: str) -> bool:
    # adler32, independent of the crc32 that orders the files.
    return zlib.adler32(relative.encode()) % VAL_EVERY == 0


def load_corpus(path: Optional[str] = None, *, max_bytes: int = DEFAULT_MAX_BYTES,
                tokenizer: str = "bytes", vocab_size: int = VOCAB_SIZE) -> Corpus:
    """Read ``path`` (a text file or a directory of text files; default: the stdlib).

    A single file is split by position instead: its last 1/VAL_EVERY is validation.
    ``tokenizer="bpe"``: byte-level BPE with ``vocab_size`` ids, trained on the
    training split only (``bpe_corpus``).
    """
    root = corpus_root(path)
    files = _text_files(root)
    train: list[bytes] = []
    val: list[bytes] = []
    total = 0
    for file in files:
        data = file.read_bytes()
        if root.is_file():
            cut = len(data) - len(data) // VAL_EVERY
            train.append(data[:cut])
            val.append(data[cut:])
        else:
            (val if _is_validation(str(file.relative_to(root))) else train).append(data)
        total += len(data)
        if total >= max_bytes:
            break
    if tokenizer == "bpe":
        return bpe_corpus(train, val, vocab_size=vocab_size, source=str(root))
    train_tokens = np.frombuffer(b"".join(train), dtype=np.uint8)
    val_tokens = np.frombuffer(b"".join(val), dtype=np.uint8)
    if len(train_tokens) < 1 << 16 or len(val_tokens) < 1 << 12:
        raise ValueError(
            f"corpus: {str(root)!r} has too little text ({len(train_tokens)} training and "
            f"{len(val_tokens)} validation bytes; need at least 65536 and 4096)"
        )
    return Corpus(train_tokens, val_tokens, str(root))


@dataclass
class MicroBatch:
    tokens: torch.Tensor  # int64 [b, s]
    labels: torch.Tensor  # int64 [b, s]
    position_ids: torch.Tensor  # int64 [b, s]


def _micro_batches(windows: np.ndarray, micro_batch_size: int) -> list[MicroBatch]:
    windows_t = torch.from_numpy(windows.astype(np.int64))
    seq_len = windows_t.shape[1] - 1
    positions = torch.arange(seq_len).unsqueeze(0)
    out = []
    for start in range(0, windows_t.shape[0], micro_batch_size):
        chunk = windows_t[start:start + micro_batch_size]
        out.append(MicroBatch(chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous(),
                              positions.expand(chunk.shape[0], -1)))
    return out


class TrainData:
    """The micro-batches of data-parallel rank ``dp_rank`` for any step.

    The global batch of a step is ``dp_size * num_micro_batches *
    micro_batch_size`` windows of ``seq_length + 1`` bytes at random offsets;
    rank r takes its contiguous share, so the global batch does not depend on
    how it is split.
    """

    def __init__(self, tokens: np.ndarray, *, seq_length: int, micro_batch_size: int,
                 num_micro_batches: int, dp_rank: int, dp_size: int, seed: int) -> None:
        self.tokens = tokens
        self.seq_length = seq_length
        self.micro_batch_size = micro_batch_size
        self.num_micro_batches = num_micro_batches
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed

    @property
    def global_batch_tokens(self) -> int:
        return self.dp_size * self.num_micro_batches * self.micro_batch_size * self.seq_length

    def step(self, step: int) -> list[MicroBatch]:
        per_rank = self.num_micro_batches * self.micro_batch_size
        rng = np.random.default_rng((self.seed, step))
        starts = rng.integers(0, len(self.tokens) - self.seq_length - 1, size=per_rank * self.dp_size)
        mine = starts[self.dp_rank * per_rank:(self.dp_rank + 1) * per_rank]
        windows = np.stack([self.tokens[s:s + self.seq_length + 1] for s in mine])
        return _micro_batches(windows, self.micro_batch_size)


def validation_batches(tokens: np.ndarray, *, seq_length: int, micro_batch_size: int,
                       num_windows: int, dp_rank: int, dp_size: int) -> list[MicroBatch]:
    """Fixed, evenly spaced validation windows; rank r takes every dp_size-th one."""
    usable = len(tokens) - seq_length - 1
    num_windows = max(dp_size, num_windows - num_windows % dp_size)
    starts = np.linspace(0, usable, num=num_windows, dtype=np.int64)[dp_rank::dp_size]
    windows = np.stack([tokens[s:s + seq_length + 1] for s in starts])
    return _micro_batches(windows, micro_batch_size)



def _bpe_cache_path(train: list[bytes], val: list[bytes], vocab_size: int) -> Path:
    import hashlib
    import os

    import tokenizers

    digest = hashlib.sha256(f"{tokenizers.__version__}:{vocab_size}".encode())
    for part in (train, val):
        for data in part:
            digest.update(hashlib.sha256(data).digest())
        digest.update(b"|")
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nemo-lossfree" / "bpe"
    return root / f"{digest.hexdigest()[:24]}.npz"


def bpe_corpus(train: list[bytes], val: list[bytes], *, vocab_size: int, source: str) -> Corpus:
    """Byte-level BPE (Hugging Face ``tokenizers``) trained on the training files.

    Byte tokens of source code are dominated by runs of indentation spaces
    (36% of the default corpus's bytes), nearly identical tokens that move
    between experts together; BPE merges such runs as the tokenizers of real
    models do. The tokenized splits are cached by content (both ranks, every
    arm and every later run read the same file).
    """
    import os

    cache = _bpe_cache_path(train, val, vocab_size)
    if not cache.is_file():
        from tokenizers import ByteLevelBPETokenizer

        texts = [data.decode("utf-8", errors="replace") for data in train]
        tokenizer = ByteLevelBPETokenizer()
        tokenizer.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, show_progress=False)
        ids = {}
        for name, part in (("train", texts), ("val", [d.decode("utf-8", errors="replace") for d in val])):
            encoded = tokenizer.encode_batch(part)
            ids[name] = np.fromiter((i for e in encoded for i in e.ids), dtype=np.uint16)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, train=ids["train"], val=ids["val"])
        os.replace(tmp, cache)
    arrays = np.load(cache)
    return Corpus(arrays["train"], arrays["val"], source, vocab_size=vocab_size)
