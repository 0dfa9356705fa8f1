import hashlib

import pytest
import torch

from dlm.core import data
from dlm.core.data import (
    CorpusError,
    Tokenizer,
    TokenizerError,
    epoch_windows,
    prepare_data,
    read_corpus,
    resolve_corpus,
    split_text,
)
from tests.conftest import SHARED_CORPUS

TEXT = "First Citizen:\nYes, my lord. I'll go--now!\n\nWhat's this? (A 'tis) 'Tis 3 o'clock;\n"


def test_word_tokenizer_keeps_apostrophes_newlines_and_case():
    tokens = Tokenizer.build(TEXT, min_count=1).tokenize(TEXT)
    assert tokens[:4] == ["First", "Citizen", ":", "\n"]
    assert "I'll" in tokens and "o'clock" in tokens and "What's" in tokens
    assert tokens.count("\n") == 4 and tokens.count("-") == 2


def test_decode_rejoins_punctuation_and_round_trips():
    tokenizer = Tokenizer.build(TEXT, min_count=1)
    ids = tokenizer.encode(TEXT)
    decoded = tokenizer.decode(ids)
    assert decoded.startswith("First Citizen:\nYes, my lord. I'll go--now!\n\nWhat's this?")
    assert tokenizer.encode(decoded) == ids


def test_round_trip_on_a_real_looking_corpus(corpus):
    text = corpus.read_text()
    tokenizer = Tokenizer.build(text, min_count=1)
    ids = tokenizer.encode(text)
    assert tokenizer.encode(tokenizer.decode(ids)) == ids


def test_min_count_unk_pad_and_lowercase():
    tokenizer = Tokenizer.build("the cat the dog the", min_count=2)
    assert tokenizer.itos == ["<pad>", "<unk>", "the"]
    assert tokenizer.encode("the cat") == [2, tokenizer.unk_id]
    # an unknown word written out reads back as one unknown word, under any vocabulary
    assert tokenizer.decode(tokenizer.encode("the cat the")) == "the <unk> the"
    assert tokenizer.encode("the <unk> the") == [2, tokenizer.unk_id, 2]
    other = Tokenizer.build("the cat", min_count=1)
    assert other.encode("<unk> cat") == [other.unk_id, other.stoi["cat"]]
    lower = Tokenizer.build("The the THE", min_count=1, lowercase=True)
    assert lower.itos[2:] == ["the"]


def test_a_min_count_that_leaves_mostly_unk_is_refused_naming_one_that_works(tmp_path):
    """Ten lines of 'a'x5 'b'x3 'c'x2 'd' 'e' newline: the train split (90% of the characters) is
    nine of them, 117 tokens: a 45, b 27, c 18, d, e and the newline 9 each. min_count 28 keeps 'a'
    alone, 72 tokens <unk> (61.5%, over half); 27 keeps a and b, 45 <unk> (38.5%)."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a a a a a b b b c c d e\n" * 10)
    with pytest.raises(TokenizerError) as refused:
        prepare_data(str(corpus), min_count=28)
    message = str(refused.value)
    assert "min_count 28 keeps 1 word of the 6 in the training text and makes 61.5% of its tokens <unk>" in message
    assert "Use min_count 27 or lower" in message
    assert len(prepare_data(str(corpus), min_count=27).tokenizer) == 4  # <pad>, <unk>, a, b
    with pytest.raises(TokenizerError, match="keeps 0 words of the 6 .* 100.0% of its tokens <unk>"):
        prepare_data(str(corpus), min_count=46)
    assert len(prepare_data(str(corpus), min_count=46, kind="char").tokenizer) > 2  # no <unk>: nothing to refuse


def test_char_tokenizer_round_trip_and_save(tmp_path):
    tokenizer = Tokenizer.build(TEXT, kind="char")
    assert tokenizer.decode(tokenizer.encode(TEXT)) == TEXT
    tokenizer.save(tmp_path / "vocab.json")
    again = Tokenizer.load(tmp_path / "vocab.json")
    assert again.itos == tokenizer.itos and again.kind == "char"


def test_split_is_ninety_percent_of_characters():
    train, val = split_text("abcdefghij" * 10)
    assert len(train) == 90 and train + val == "abcdefghij" * 10


def test_epoch_windows_are_contiguous_shuffled_and_offset():
    ids = torch.arange(1000)
    offsets = set()
    for epoch in range(8):
        windows = epoch_windows(ids, 64, torch.Generator().manual_seed(epoch))
        assert windows.shape == (data.windows_per_epoch(1000, 64), 64)
        assert torch.all(windows[:, 1:] - windows[:, :-1] == 1)  # each window is a slice
        assert len(set(windows[:, 0].tolist())) == len(windows)  # non-overlapping
        offsets.add(int(windows[:, 0].min()) % 64)
    assert len(offsets) > 1
    again = epoch_windows(ids, 64, torch.Generator().manual_seed(3))
    assert torch.equal(again, epoch_windows(ids, 64, torch.Generator().manual_seed(3)))
    with pytest.raises(ValueError, match="fewer than seq_len"):
        epoch_windows(torch.arange(10), 64, torch.Generator())


def test_vocabulary_comes_from_the_train_split_only(corpus):
    prepared = prepare_data(str(corpus), min_count=1)
    train_text, _ = split_text(corpus.read_text())
    assert set(prepared.tokenizer.itos[2:]) == set(prepared.tokenizer.tokenize(train_text))
    assert len(prepared.train_ids) > 8 * len(prepared.val_ids) > 0


def test_missing_corpus_offline_names_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv("DLM_DATA_DIR", str(tmp_path / "data"))
    with pytest.raises(CorpusError) as error:
        resolve_corpus("tiny_shakespeare", url="http://127.0.0.1:9/input.txt")
    message = str(error.value)
    assert "DLM_DATA_DIR" in message and "tiny_shakespeare/input.txt" in message


def test_bad_corpus_files_get_clear_errors(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        read_corpus(str(tmp_path / "missing.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(CorpusError, match="empty"):
        read_corpus(str(empty))
    binary = tmp_path / "latin1.txt"
    binary.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(CorpusError, match="not UTF-8"):
        read_corpus(str(binary))


def test_a_wrong_file_in_the_data_dir_fails_its_checksum(tmp_path, monkeypatch):
    fake = tmp_path / "data" / "tiny_shakespeare" / "input.txt"
    fake.parent.mkdir(parents=True)
    fake.write_text("not shakespeare")
    monkeypatch.setenv("DLM_DATA_DIR", str(tmp_path / "data"))
    with pytest.raises(CorpusError, match="SHA-256"):
        resolve_corpus("tiny_shakespeare")


def test_download_is_checksummed_and_cached(tmp_path, monkeypatch):
    monkeypatch.delenv("DLM_DATA_DIR", raising=False)
    wrong = tmp_path / "wrong.txt"
    wrong.write_text("tampered")
    with pytest.raises(CorpusError, match="SHA-256"):
        resolve_corpus("tiny_shakespeare", url=wrong.as_uri())
    assert not (data.cache_dir() / "tiny_shakespeare" / "input.txt").exists()
    real = SHARED_CORPUS / "tiny_shakespeare" / "input.txt"
    if not real.is_file():
        pytest.skip("the shared corpus is not beside this checkout")
    path = resolve_corpus("tiny_shakespeare", url=real.as_uri())
    assert path == data.cache_dir() / "tiny_shakespeare" / "input.txt"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == data.TINY_SHAKESPEARE_SHA256
    assert resolve_corpus("tiny_shakespeare", url="http://127.0.0.1:9/x") == path  # now from the cache
