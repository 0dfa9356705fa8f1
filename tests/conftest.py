import logging
import random
from pathlib import Path

import pytest

from dlm.core.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SHARED_CORPUS = ROOT.parent / "shared" / "data"

LINES = [
    "First Citizen:", "Before we proceed any further, hear me speak.", "All:", "Speak, speak.",
    "MENENIUS:", "What work's, my countrymen, in hand? where go you", "With bats and clubs? The matter? speak, I pray you.",
    "KING RICHARD:", "Now is the winter of our discontent", "Made glorious summer by this sun of York;",
    "JULIET:", "O Romeo, Romeo! wherefore art thou Romeo?", "Deny thy father and refuse thy name;",
    "HAMLET:", "To be, or not to be: that is the question.", "I'll speak to it though hell itself should gape.",
]


def make_corpus(path: Path, paragraphs: int = 120, seed: int = 0) -> Path:
    rng = random.Random(seed)
    blocks = []
    for _ in range(paragraphs):
        start = rng.randrange(0, len(LINES) - 3)
        blocks.append("\n".join(LINES[start: start + rng.randint(2, 4)]))
    path.write_text("\n\n".join(blocks) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def corpus(tmp_path) -> Path:
    """A small made-up corpus (never the real one: that is not committed)."""
    return make_corpus(tmp_path / "corpus.txt")


@pytest.fixture
def smoke_config(corpus):
    return load_config(ROOT / "params" / "smoke.yaml", corpus=str(corpus), max_train_tokens=None,
                       min_count=1, progress=False)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Never touch the user's cache or the network from unit tests."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture(autouse=True)
def restored_logging():
    """The logging set-up a test leaves behind is undone: a notebook's setup() run in this process
    (or the CLI's basicConfig under a capture) gives a logger a handler on the test's captured
    stream, which later tests' log lines would hit once it is closed ('I/O operation on closed
    file' in their stderr)."""
    loggers = [logging.getLogger(), logging.getLogger("dlm")]
    saved = [(list(logger.handlers), logger.level, logger.propagate) for logger in loggers]
    yield
    for logger, (handlers, level, propagate) in zip(loggers, saved):
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate


def _named(names: list[str]) -> str:
    joined = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
    return f"the {joined} {'family' if len(names) == 1 else 'families'}"


def _declaring(declares) -> list[str]:
    from dlm.families import FAMILIES, family

    return [name for name in FAMILIES if declares(family(name))]


# How a refusal names the families that read an option, worked out here from each registered family's
# declarations (SAMPLE_OPTIONS, CONFIG_KEYS, SUPPORTS), not from the code that writes the message: a
# family added to the registry changes no test's expected text.
def option_readers(option: str) -> str:
    """'the gaussian family's sampler', 'the gaussian, masked and uniform families' samplers'."""
    names = _declaring(lambda module: option in module.SAMPLE_OPTIONS)
    return f"{_named(names)}'s sampler" if len(names) == 1 else f"{_named(names)}' samplers"


def key_readers(key: str) -> str:
    """'the masked family', 'the gaussian and masked families': whose CONFIG_KEYS hold `key`."""
    return _named(_declaring(lambda module: key in module.CONFIG_KEYS))


def capable(capability: str) -> str:
    """'the gaussian, masked and uniform families': those that declare `capability`."""
    return _named(_declaring(lambda module: capability in module.SUPPORTS))


def family_list() -> str:
    from dlm.families import FAMILIES

    return ", ".join(FAMILIES)


def toy_run_dir(path: Path, model: str = "gaussian", text: str | None = None, **overrides) -> Path:
    """An untrained run folder (config, vocab, checkpoints/last.pt) in milliseconds, no training:
    for commands that only need a loadable run. The vocabulary is the words of `text` (default: LINES
    as speeches, blank lines included)."""
    import torch

    from dlm.core.checkpoint import save_checkpoint
    from dlm.core.data import Tokenizer
    from dlm.runs.build import new_model

    text = "\n\n".join(LINES) + "\n" if text is None else text
    config = load_config(None, **{"model": model, "seq_len": 16, "embed_dim": 8, "width": 16, "depth": 1,
                                  "heads": 2, "diffusion_steps": 50, "sample_steps": 5, "precision": "fp32",
                                  "device": "cpu", "min_count": 1, **overrides})
    tokenizer = Tokenizer.build(text, min_count=1)
    torch.manual_seed(0)
    weights = new_model(config, len(tokenizer)).state_dict()
    save_checkpoint(Path(path) / "checkpoints" / "last.pt",
                    {"config": config.to_dict(), "vocab": tokenizer.to_dict(), "model": weights, "step": 0, "epoch": 0})
    return Path(path)


class SmallDisk:
    """A disk that is full for dlm's writes (atomic writes, samples, metrics rows) to the files whose
    path contains `full_for`, or once `free` bytes are spent: what fits is written, then OSError
    ENOSPC, as a real full disk does (a buffered write raises after writing what fitted)."""

    def __init__(self, full_for: str | None = None, free: int | None = None):
        self.full_for, self.free = full_for, free

    def file(self, raw, path: str):
        return LimitedFile(raw, self, path)


class LimitedFile:
    def __init__(self, raw, disk: SmallDisk, path: str):
        self.raw, self.disk, self.path = raw, disk, path

    def write(self, data) -> int:
        import errno

        data = memoryview(data).cast("B")
        room = len(data) if self.disk.free is None else min(len(data), self.disk.free)
        if self.disk.full_for is not None and self.disk.full_for in self.path:
            room = min(room, len(data) // 2)  # half of it fits
        written = 0
        while written < room:
            written += self.raw.write(data[written:room])
        if self.disk.free is not None:
            self.disk.free -= written
        if written < len(data):
            raise OSError(errno.ENOSPC, "No space left on device")
        return written

    def __getattr__(self, name):  # fileno, close, flush, ...
        return getattr(self.raw, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.raw.close()


@pytest.fixture
def small_disk(monkeypatch) -> SmallDisk:
    """Every file dlm writes goes through a SmallDisk (unlimited until the test sets full_for or free)."""
    import builtins
    import os
    import types

    from dlm.core import data
    from dlm.runs import metrics, sample

    disk = SmallDisk()
    real_fdopen, real_open = os.fdopen, builtins.open

    def fdopen(fd, mode="r", *args, **kwargs):
        if "w" not in mode:
            return real_fdopen(fd, mode, *args, **kwargs)
        return disk.file(real_fdopen(fd, mode, buffering=0), os.readlink(f"/proc/self/fd/{fd}"))

    def open_for_writing(path, mode="r", *args, **kwargs):
        if "b" not in mode or not {"w", "a"} & set(mode):
            return real_open(path, mode, *args, **kwargs)
        return disk.file(real_open(path, mode, buffering=0), str(path))

    # dlm.core.data's os (atomic_write_bytes writes through os.fdopen), not everyone's
    monkeypatch.setattr(data, "os", types.SimpleNamespace(**{**vars(os), "fdopen": fdopen}))
    for module in (sample, metrics):
        monkeypatch.setattr(module, "open", open_for_writing, raising=False)
    return disk
