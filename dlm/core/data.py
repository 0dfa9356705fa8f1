"""Corpus resolution, tokenizers, the train/validation split and training windows."""

from __future__ import annotations

import collections
import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import re
import stat
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch

from dlm.core.errors import DiskFullError, UserError, is_disk_full

TINY_SHAKESPEARE = "tiny_shakespeare"
TINY_SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"

PAD, UNK = "<pad>", "<unk>"
# Words keep inner apostrophes ("I'll", "o'er"); every other non-space character is its own token;
# newlines are tokens too, because line structure is part of Shakespeare.
# "<unk>" is one token, so that a sample's unknown word read back (by a teacher with another
# vocabulary, or from a samples file) is one unknown word, not "<", "unk", ">".
WORD_PATTERN = re.compile(r"<unk>|[A-Za-z]+(?:'[A-Za-z]+)*|\n|[^\sA-Za-z]")
NO_SPACE_BEFORE = set(",.;:!?)]}-\n")
NO_SPACE_AFTER = set("([{'-\n")


logger = logging.getLogger("dlm")


class CorpusError(UserError, FileNotFoundError):
    """The corpus cannot be found, fetched or read."""


class CorpusChangedError(UserError):
    """The corpus a run names is not the text it was trained on (its SHA-256 differs)."""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dlm"


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def resolve_corpus(name_or_path: str, url: str = TINY_SHAKESPEARE_URL) -> Path:
    """Find the corpus file: $DLM_DATA_DIR, then the user cache, else download (tiny_shakespeare).

    Any other value is a path to a UTF-8 text file.
    """
    if name_or_path != TINY_SHAKESPEARE:
        path = Path(name_or_path).expanduser()
        if path.is_dir():
            raise CorpusError(f"Corpus '{path}' is a folder: give a UTF-8 text file (e.g. a file inside it).")
        if path.exists() and not path.is_file():
            raise CorpusError(f"Corpus '{path}' is a device or other special file: give a UTF-8 text file.")
        if not path.is_file():
            raise CorpusError(
                f"Corpus file '{path}' does not exist. Pass 'tiny_shakespeare' or a path to a UTF-8 text file."
            )
        return path
    relative = Path(TINY_SHAKESPEARE) / "input.txt"
    candidates = []
    if os.environ.get("DLM_DATA_DIR"):
        candidates.append(Path(os.environ["DLM_DATA_DIR"]) / relative)
    cached = cache_dir() / relative
    candidates.append(cached)
    for path in candidates:
        if path.is_file():
            if sha256_of(path) != TINY_SHAKESPEARE_SHA256:
                raise CorpusError(
                    f"'{path}' is not the tiny_shakespeare corpus (SHA-256 mismatch). Replace it with "
                    f"the char-rnn input.txt or delete it so dlm downloads it again."
                )
            return path
    return _download(url, cached, candidates)


def _download(url: str, target: Path, searched: list[Path]) -> Path:
    try:
        with urllib.request.urlopen(url, timeout=20) as response:
            payload = response.read()
    except (urllib.error.URLError, OSError) as error:
        where = " or ".join(f"'{p}'" for p in searched)
        raise CorpusError(
            f"tiny_shakespeare was not found at {where} and could not be downloaded from {url} "
            f"({error}). Put input.txt at $DLM_DATA_DIR/tiny_shakespeare/input.txt (set DLM_DATA_DIR) "
            f"or at '{target}'."
        ) from None
    if hashlib.sha256(payload).hexdigest() != TINY_SHAKESPEARE_SHA256:
        raise CorpusError(f"The file downloaded from {url} failed its SHA-256 check; nothing was saved.")
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(target, payload)
    return target


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write to a temp file in the same folder (made when missing), then rename: readers never see
    half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600 files; give the usual mode
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if is_disk_full(error):  # the file that was there is untouched
            raise DiskFullError(path, len(payload)) from None
        raise


def append_together(files: list[tuple[io.RawIOBase, bytes]]) -> None:
    """Append each text (whole lines) to its unbuffered binary file and sync them to disk, all or
    none: when the disk fills, every file is cut back to where it ended, so each still ends with
    its last whole line and they still hold the same records. The OSError is raised again."""
    ends = [os.lseek(handle.fileno(), 0, os.SEEK_END) for handle, _ in files]
    try:
        for handle, data in files:
            view = memoryview(data)
            while view:
                view = view[handle.write(view):]
            os.fsync(handle.fileno())
    except OSError:
        for (handle, _), end in zip(files, ends):
            os.ftruncate(handle.fileno(), end)
        raise


def nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def try_writing_in(folder: Path, probe_name: str, shown: Path, what: str, choose: str) -> None:
    """Create `folder` (with its missing parents) and a probe file named like `probe_name` in it,
    then remove all of it: whatever would stop the real write later (permissions, a folder that
    cannot exist such as /proc/x, a name too long, a full disk) stops it now, in one line."""
    above = nearest_existing(folder)
    if not above.is_dir():
        raise UserError(f"{what} '{shown}' lies under '{above}', which is a file: choose another {choose}.")
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(dir=folder, prefix=f".{probe_name}.", suffix=".tmp")
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        reason = (f"no write permission in '{above}'" if error.errno in (errno.EACCES, errno.EPERM)
                  else error.strerror or type(error).__name__)
        raise UserError(f"{what} '{shown}' cannot be {'written' if choose == 'path' else 'created'}: "
                        f"{reason}. Choose another {choose}.") from None
    finally:
        for made in created:  # deepest first; nothing is left behind, whether the probe worked or not
            with contextlib.suppress(OSError):
                made.rmdir()


def check_destination(path: str | Path, what: str = "--out", suffix: str | None = None) -> Path:
    """The one check of a file a command will write, before any work: not empty, not a folder, not a
    device or other special file, the right `suffix` when given, and its folder creatable and
    writable under the name the atomic writer uses (tried, then removed: `try_writing_in`)."""
    path = Path(path).expanduser()
    if str(path).strip() in ("", "."):
        raise UserError(f"{what} is empty: give a file name such as samples/out{suffix or '.jsonl'}.")
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):  # missing, or under a file: said below
        mode = None
    except OSError as error:  # a name too long, a loop of links, ...
        raise UserError(f"{what} '{path}' cannot be written: {error.strerror}. Choose another path.") from None
    if mode is not None and stat.S_ISDIR(mode):
        raise UserError(f"{what} '{path}' is a folder: give a file inside it, such as "
                        f"{path / ('samples' + (suffix or '.jsonl'))}.")
    if mode is not None and not stat.S_ISREG(mode):
        raise UserError(f"{what} '{path}' is a device or other special file, not a file dlm may replace: "
                        f"give a file name such as samples/out{suffix or '.jsonl'}.")
    if suffix is not None and path.suffix != suffix:
        raise UserError(f"{what} '{path}' must end in {suffix}, e.g. {path.with_suffix(suffix).name}.")
    try_writing_in(path.parent, path.name, path, what, "path")
    return path


def check_run_folder(path: str | Path, what: str = "run_dir") -> Path:
    """Fail early, before any work, when `path` cannot be a run folder: it is empty (that would be
    the working directory), it is a file, it lies under a file, or it cannot be created or written."""
    if not str(path).strip():
        raise UserError(f"{what} is empty: give a folder for the run, such as runs/my_run.")
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} '{path}' is a file: give a folder (it is created if missing).")
    try_writing_in(path, "checkpoint", path, what, "folder")
    return path


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_corpus(name_or_path: str) -> str:
    return read_corpus_file(resolve_corpus(name_or_path))


def read_corpus_file(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CorpusError(f"Corpus '{path}' is not UTF-8 text. Convert it to UTF-8 first.") from None
    if not text.strip():
        raise CorpusError(f"Corpus '{path}' is empty. Give a text file with some words in it.")
    return text


def split_text(text: str, train_fraction: float = 0.9) -> tuple[str, str]:
    """First 90% of characters train, the rest validation (the nanoGPT convention)."""
    cut = int(len(text) * train_fraction)
    return text[:cut], text[cut:]


TOKENIZER_KINDS = ("word", "bpe", "char")
BPE_FILE = "tokenizer.json"  # a BPE run's tokenizer, HuggingFace's standard file, in the run folder


class TokenizerError(UserError):
    """A run's tokenizer cannot be built, found or used for this text."""


def special_tokens(kind: str) -> list[str]:
    """The reserved tokens at the head of every vocabulary (ids 0, 1, ...), in one place: <pad>,
    and for words <unk> (a word rarer than min_count). Characters (the corpus's alphabet) and
    byte-level BPE pieces spell any text, so they have no <unk> and a sample can never hold one."""
    return [PAD, UNK] if kind == "word" else [PAD]


class Tokenizer:
    """Maps text to ids and back through a list of tokens (`itos`). `kind` is 'word' or 'char';
    id 0 is <pad>, and a word vocabulary's id 1 is <unk> (special_tokens)."""

    def __init__(self, kind: str, itos: list[str], lowercase: bool = False):
        if kind not in ("word", "char"):
            raise TokenizerError(f"Unknown tokenizer kind '{kind}': use one of {', '.join(TOKENIZER_KINDS)}.")
        self.kind = kind
        self.itos = list(itos)
        self.lowercase = lowercase
        self.stoi = {token: index for index, token in enumerate(self.itos)}
        self.pad_id = self.stoi[PAD]
        self.unk_id = self.stoi.get(UNK)  # None: this vocabulary spells every text without <unk>

    @classmethod
    def build(cls, text: str, kind: str = "word", min_count: int = 2, lowercase: bool = False) -> Tokenizer:
        pieces = split_tokens(text, kind, lowercase)
        if not pieces:
            raise TokenizerError("Cannot build a vocabulary from empty text.")
        counts = collections.Counter(pieces)
        threshold = min_count if kind == "word" else 1
        # Most frequent first; ties broken alphabetically so the vocabulary is deterministic.
        kept = sorted((t for t, c in counts.items() if c >= threshold and t not in (PAD, UNK)),
                      key=lambda t: (-counts[t], t))
        return cls(kind, [*special_tokens(kind), *kept], lowercase)

    def __len__(self) -> int:
        return len(self.itos)

    @property
    def joined_as_is(self) -> bool:
        """Whether text is its pieces joined as they are: character and BPE pieces carry their own
        spaces (" the"); word tokens are spaced by join_words."""
        return self.kind != "word"

    def tokenize(self, text: str) -> list[str]:
        return split_tokens(text, self.kind, self.lowercase)

    def encode(self, text: str) -> list[int]:
        if self.unk_id is not None:
            return [self.stoi.get(token, self.unk_id) for token in self.tokenize(text)]
        try:
            return [self.stoi[token] for token in self.tokenize(text)]
        except KeyError as missing:
            raise TokenizerError(f"The character {missing} is not in this run's alphabet (the characters of its "
                                 f"corpus): give text written in that alphabet.") from None

    def decode(self, ids) -> str:
        tokens = [self.itos[int(i)] for i in ids]
        if self.kind == "char":
            return "".join("" if t == PAD else t for t in tokens)
        return join_words([t for t in tokens if t != PAD])

    def words(self, ids) -> list[str]:
        """The words of a row of ids (WORD_PATTERN's tokens of the decoded text): what every text
        statistic counts, whichever tokenizer made the ids."""
        if self.kind == "word":  # already words (the same as decoding and splitting again, faster)
            return [self.itos[int(i)] for i in ids if int(i) != self.pad_id]
        return split_tokens(self.decode(ids), "word", False)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "lowercase": self.lowercase, "itos": self.itos}

    def fingerprint(self) -> str:
        """A short hash of the vocabulary: two runs with the same fingerprint share token ids."""
        return hashlib.sha256(json.dumps(self.to_dict(), ensure_ascii=False).encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, values: dict) -> Tokenizer:
        return cls(values["kind"], values["itos"], values.get("lowercase", False))

    def save(self, path: str | Path) -> None:
        atomic_write_bytes(Path(path), json.dumps(self.to_dict(), ensure_ascii=False).encode())

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


class BPETokenizer(Tokenizer):
    """Byte-level BPE (GPT-2's pieces) trained by HuggingFace `tokenizers` on the training split.
    Any text is spelled by its 256 byte pieces, so there is no <unk>; decoding gives back the text
    exactly (no spaces inserted inside words). Saved as HuggingFace's standard tokenizer.json; a
    checkpoint records its file name and fingerprint, not its contents."""

    def __init__(self, json_text: str):
        from tokenizers import Tokenizer as HFTokenizer

        self.kind, self.json_text = "bpe", json_text
        try:
            self.hf = HFTokenizer.from_str(json_text)
        except Exception as error:  # tokenizers raises a bare Exception for a file it cannot read
            raise TokenizerError(f"Not a tokenizer.json that HuggingFace tokenizers can read ({error}).") from None
        self.lowercase = "Lowercase" in json.dumps(json.loads(json_text).get("normalizer"))
        self.pad_id, self.unk_id = self.hf.token_to_id(PAD), None
        # each piece as the text it stands for (" the", "\n"), for tables and trajectories
        self.itos = [PAD if index == self.pad_id else self.hf.decoder.decode([self.hf.id_to_token(index)])
                     for index in range(self.hf.get_vocab_size())]
        self.stoi = {}
        for index, piece in enumerate(self.itos):
            self.stoi.setdefault(piece, index)

    @classmethod
    def build(cls, text: str, vocab_size: int = 4000, lowercase: bool = False) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

        if not text:
            raise TokenizerError("Cannot train a BPE tokenizer on empty text.")
        hf = HFTokenizer(models.BPE())
        if lowercase:
            hf.normalizer = normalizers.Lowercase()
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens("bpe"), show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        hf.train_from_iterator([text], trainer)
        return cls(hf.to_str())

    def tokenize(self, text: str) -> list[str]:
        return [self.itos[i] for i in self.encode(text)]

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text).ids

    def decode(self, ids) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=True)

    def to_dict(self) -> dict:
        return {"kind": "bpe", "file": BPE_FILE, "fingerprint": self.fingerprint()}

    def fingerprint(self) -> str:
        return hashlib.sha256(self.json_text.encode()).hexdigest()[:16]  # the file's own bytes: checked before parsing

    def save(self, path: str | Path) -> None:
        atomic_write_bytes(Path(path), self.json_text.encode())

    @classmethod
    def load(cls, path: str | Path) -> BPETokenizer:
        return cls(Path(path).read_text(encoding="utf-8"))


def build_tokenizer(train_text: str, kind: str = "word", min_count: int = 2, lowercase: bool = False,
                    bpe_vocab_size: int = 4000, corpus_text: str | None = None) -> Tokenizer:
    """A new tokenizer of `kind`, learned from the training split. A character alphabet is taken
    from the whole corpus (`corpus_text`): an alphabet is not a statistic, and a character seen
    only in held-out text would otherwise need an <unk>."""
    if kind == "bpe":
        return BPETokenizer.build(train_text, bpe_vocab_size, lowercase)
    if kind == "char":
        return Tokenizer.build(corpus_text or train_text, "char", lowercase=lowercase)
    return Tokenizer.build(train_text, kind, min_count, lowercase)


def tokenizer_file_name(tokenizer: Tokenizer) -> str:
    """Where a run folder keeps its tokenizer: tokenizer.json (BPE) or vocab.json (words, characters)."""
    return BPE_FILE if tokenizer.kind == "bpe" else "vocab.json"


def saved_tokenizer(vocab: dict, run_path: str | Path) -> Tokenizer:
    """The tokenizer a checkpoint's `vocab` entry names: a word or character list is in the entry;
    a BPE tokenizer is read from its file in the run folder, checked against the fingerprint."""
    if vocab.get("kind") != "bpe":
        return Tokenizer.from_dict(vocab)
    path = Path(run_path) / vocab["file"]
    if not path.is_file():
        raise TokenizerError(f"'{path}' is missing: this run's BPE tokenizer is kept there, next to checkpoints/. "
                             f"Copy the whole run folder (or put its tokenizer.json back).")
    json_text = path.read_text(encoding="utf-8")
    if hashlib.sha256(json_text.encode()).hexdigest()[:16] != vocab["fingerprint"]:
        raise TokenizerError(f"'{path}' is not the tokenizer this run was trained with (its fingerprint differs): "
                             f"put the run's own tokenizer.json back.")
    return BPETokenizer(json_text)


def split_tokens(text: str, kind: str, lowercase: bool) -> list[str]:
    if lowercase:
        text = text.lower()
    if kind == "char":
        return list(text)
    return WORD_PATTERN.findall(text)


def join_words(tokens: list[str]) -> str:
    """Rejoin word tokens so punctuation sits where a reader expects it ("Yes, my lord.")."""
    out: list[str] = []
    for token in tokens:
        if out and token not in NO_SPACE_BEFORE and out[-1] not in NO_SPACE_AFTER:
            out.append(" ")
        out.append(token)
    return "".join(out)


@dataclass
class CorpusData:
    tokenizer: Tokenizer
    train_ids: torch.Tensor  # (N_train,) int64
    val_ids: torch.Tensor  # (N_val,) int64
    sha256: str | None = None  # of the corpus file's bytes: what a run records, and checks when it reads it again
    path: Path | None = None  # where the corpus was read


def prepare_data(corpus: str, kind: str = "word", min_count: int = 2, lowercase: bool = False,
                 tokenizer: Tokenizer | None = None, max_train_tokens: int | None = None,
                 bpe_vocab_size: int = 4000) -> CorpusData:
    """Read, split and encode the corpus; the vocabulary is learned on the train split only."""
    path = resolve_corpus(corpus)
    text = read_corpus_file(path)
    train_text, val_text = split_text(text)
    new_vocabulary = tokenizer is None
    if new_vocabulary:
        tokenizer = build_tokenizer(train_text, kind, min_count, lowercase, bpe_vocab_size, corpus_text=text)
    train_ids = torch.tensor(tokenizer.encode(train_text), dtype=torch.long)
    if new_vocabulary:
        check_vocabulary(tokenizer, train_ids, train_text, min_count)
    if max_train_tokens is not None:
        train_ids = train_ids[:max_train_tokens]
    val_ids = torch.tensor(tokenizer.encode(val_text), dtype=torch.long)
    return CorpusData(tokenizer, train_ids, val_ids, sha256_of(path), path)


_UNCHECKED = set()  # the runs already said to record no corpus hash (said once per process)


def check_corpus(data: CorpusData, corpus: str, recorded: str | None, trained: str | Path, accept: bool = False) -> None:
    """The one check that a run reads the text it was trained on: `data` (the corpus `corpus` as read
    now) against the SHA-256 the run `trained` (a run folder or checkpoint) recorded. An edited file,
    or a relative path read from another folder, would otherwise give another validation split and
    another vocabulary's worth of <unk> without a word. `accept`: the user knows and goes on."""
    if recorded is None:
        # tiny_shakespeare is checked against its own hash when it is found (resolve_corpus)
        if corpus != TINY_SHAKESPEARE and str(trained) not in _UNCHECKED:
            _UNCHECKED.add(str(trained))
            logger.info("'%s' records no corpus SHA-256 (trained before dlm recorded one): '%s' is read unchecked",
                        trained, data.path)
        return
    if data.sha256 == recorded:
        return
    if accept:
        logger.warning("'%s' is not the corpus '%s' was trained on (SHA-256 %s, recorded %s): used anyway "
                       "(--accept_corpus_change)", data.path, trained, data.sha256[:12], recorded[:12])
        return
    relative = "" if Path(corpus).expanduser().is_absolute() else " (a relative path is read from the folder dlm runs in)"
    raise CorpusChangedError(
        f"'{data.path}' is not the corpus '{trained}' was trained on: its SHA-256 is {data.sha256[:12]}..., the run "
        f"recorded {recorded[:12]}... Put the run's text back at '{corpus}'{relative}, or give "
        f"--accept_corpus_change to use this text knowingly.")


# A word vocabulary may turn at most this share of the training tokens into <unk>: beyond it <unk> is
# most of what the model sees and predicts, and the words it keeps are a minority of the text.
MAX_UNK_SHARE = 0.5


def check_vocabulary(tokenizer: Tokenizer, train_ids: torch.Tensor, train_text: str, min_count: int) -> None:
    """Refuse, before training, a word vocabulary that cannot model the text: one that makes more
    than MAX_UNK_SHARE of the training tokens <unk> (a min_count above most words' counts), saying
    how many words it keeps and the largest min_count that keeps enough of them."""
    if tokenizer.unk_id is None or not len(train_ids):
        return
    share = float((train_ids == tokenizer.unk_id).double().mean())
    if share <= MAX_UNK_SHARE:
        return
    counts = sorted((c for t, c in collections.Counter(tokenizer.tokenize(train_text)).items() if t not in (PAD, UNK)),
                    reverse=True)
    # the largest min_count whose words cover at least (1 - MAX_UNK_SHARE) of the tokens: the count
    # of the word at which the most frequent words' running total first reaches that share
    needed, running, largest = (1 - MAX_UNK_SHARE) * len(train_ids), 0, 1
    for count in counts:
        running += count
        if running >= needed:
            largest = count
            break
    words = len(tokenizer) - len(special_tokens(tokenizer.kind))
    raise TokenizerError(
        f"min_count {min_count} keeps {words} word{'' if words == 1 else 's'} of the {len(counts)} in the training "
        f"text and makes {share:.1%} of its tokens <unk>: a model that sees mostly <unk> cannot model the text (dlm "
        f"refuses more than {MAX_UNK_SHARE:.0%} <unk>). Use min_count {largest} or lower, or tokenizer bpe or char "
        f"(no <unk>).")


def windows_per_epoch(num_tokens: int, seq_len: int) -> int:
    """How many windows every epoch has, whatever its random offset."""
    if num_tokens < seq_len:
        raise UserError(
            f"The training text has {num_tokens} tokens, fewer than seq_len={seq_len}. "
            f"Use a longer corpus or a smaller seq_len."
        )
    return (num_tokens - max_offset(num_tokens, seq_len)) // seq_len


def max_offset(num_tokens: int, seq_len: int) -> int:
    return min(seq_len, num_tokens - seq_len + 1) - 1


def epoch_windows(ids: torch.Tensor, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """Non-overlapping windows at a fresh random offset, shuffled: one epoch's examples (n, seq_len)."""
    count = windows_per_epoch(len(ids), seq_len)
    offset = int(torch.randint(0, max_offset(len(ids), seq_len) + 1, (1,), generator=generator))
    windows = ids[offset: offset + count * seq_len].view(count, seq_len)
    return windows[torch.randperm(count, generator=generator)]


def fixed_windows(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Windows from offset 0 in corpus order: the validation examples."""
    count = len(ids) // seq_len
    return ids[: count * seq_len].view(count, seq_len)
