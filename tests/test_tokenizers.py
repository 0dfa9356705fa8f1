"""word | bpe | char tokenizers: BPE learned on the training split by HuggingFace tokenizers, kept
in the run folder's tokenizer.json; no <unk> from bpe or char; text statistics counted in words,
the same whichever tokenizer read the text."""
import json

import pytest
import torch

import dlm.core.data as data_module
from dlm.core.data import BPETokenizer, Tokenizer, TokenizerError, build_tokenizer, prepare_data, split_text
from dlm.core.textstats import sample_stats
from dlm.evaluation.evaluate import evaluate_samples
from dlm.evaluation.tokens import ids_to_words
from dlm.runs.build import load_run
from dlm.runs.sample import SampleOptions, generate
from dlm.runs.train import train
from tests.conftest import make_corpus, toy_run_dir

TEXT = "First Citizen:\nYes, my lord. I'll go--now!\n\nWhat's this? (A 'tis) 'Tis 3 o'clock;\n"


def raw_words(text: str) -> list[str]:
    """The oracle: the words of raw text, read straight off it (letters with inner apostrophes;
    every other visible character alone; newlines), by a pattern written here, not dlm's."""
    import re
    return re.findall(r"[A-Za-z]+(?:'[A-Za-z]+)*|\n|[^\sA-Za-z]", text)


@pytest.fixture(scope="module")
def corpus_text(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("tok") / "corpus.txt").read_text()


@pytest.fixture(scope="module")
def tokenizers(corpus_text):
    train_text, _ = split_text(corpus_text)
    return {"word": build_tokenizer(corpus_text, "word", min_count=1),  # every word known: no <unk>
            "bpe": build_tokenizer(train_text, "bpe", bpe_vocab_size=2000),
            "char": build_tokenizer(train_text, "char", corpus_text=corpus_text)}


def test_bpe_decodes_text_exactly_with_no_spaces_inside_words(tokenizers):
    bpe = tokenizers["bpe"]
    # TEXT is not the corpus: its words and characters are partly unseen, spelled from byte pieces
    assert bpe.decode(bpe.encode(TEXT)) == TEXT
    assert bpe.decode(bpe.encode("Zounds! Qwxyz's ćafé")) == "Zounds! Qwxyz's ćafé"
    assert len(bpe.encode("Romeo, Romeo! wherefore art thou Romeo?")) < len("Romeo, Romeo! wherefore art thou Romeo?") / 2


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_bpe_and_char_have_no_unk(tokenizers, corpus_text, kind):
    tokenizer = tokenizers[kind]
    assert tokenizer.unk_id is None and "<unk>" not in tokenizer.itos
    _, heldout = split_text(corpus_text)
    assert tokenizer.decode(tokenizer.encode(heldout)) == heldout
    assert tokenizer.pad_id == 0 and tokenizer.decode([tokenizer.pad_id, *tokenizer.encode("speak")]) == "speak"


def test_char_text_outside_the_alphabet_is_one_clear_error(tokenizers):
    with pytest.raises(TokenizerError, match="'ć' is not in this run's alphabet"):
        tokenizers["char"].encode("ćafé")


@pytest.mark.parametrize("kind", ["word", "bpe", "char"])
def test_heldout_text_gets_the_same_word_statistics_whichever_tokenizer_read_it(tokenizers, corpus_text, kind):
    _, heldout = split_text(corpus_text)
    # whole speeches (the split's cut leaves half a word before the first blank line)
    rows = [paragraph + "\n" for paragraph in heldout.split("\n\n")[1:] if paragraph.strip()]
    tokenizer = tokenizers[kind]
    words = ids_to_words([tokenizer.encode(row) for row in rows], tokenizer)
    expected = [raw_words(row) for row in rows]
    assert words == expected
    assert sample_stats(words) == sample_stats(expected)
    assert len(tokenizer.encode(heldout)) != len(raw_words(heldout)) or kind == "word"  # yet the tokens differ


def test_bpe_is_learned_on_the_training_split_only(tmp_path, corpus_text):
    path = tmp_path / "corpus.txt"
    path.write_text(corpus_text + "\nZebulon Zebulon Zebulon Zebulon\n" * 10)  # the last 10% only
    prepared = prepare_data(str(path), "bpe", bpe_vocab_size=2000)
    bpe = prepared.tokenizer
    assert isinstance(bpe, BPETokenizer) and len(bpe) <= 2000 and bpe.itos[0] == "<pad>"
    assert " Zebulon" not in bpe.stoi and " Romeo" in bpe.stoi  # never merged: it is held-out text
    assert "Zebulon Zebulon" in bpe.decode(prepared.val_ids)
    again = BPETokenizer.build(split_text(path.read_text())[0], 2000)
    assert again.fingerprint() == bpe.fingerprint()  # training is deterministic
    # a character alphabet is the whole corpus's: 'Z' occurs in the held-out part only, and no <unk> is needed
    chars = prepare_data(str(path), "char")
    assert "Z" in chars.tokenizer.stoi and chars.tokenizer.decode(chars.val_ids).endswith("Zebulon\n")


def test_a_teacher_scores_the_words_of_the_text_whichever_tokenizer_made_the_samples(tmp_path, corpus_text, tokenizers):
    teacher = load_run(toy_run_dir(tmp_path / "teacher", model="ar", text=corpus_text))
    _, heldout = split_text(corpus_text)
    texts = [p + "\n" for p in heldout.split("\n\n") if p.strip()][:6]
    results = {}
    for kind in ("word", "bpe", "char"):
        tokenizer = tokenizers[kind]
        records = [{"text": tokenizer.decode(tokenizer.encode(t)), "ids": tokenizer.encode(t),
                    "vocab": tokenizer.fingerprint()} for t in texts]
        results[kind] = evaluate_samples(records, teacher)
    assert results["bpe"]["samples"] == results["word"]["samples"] == results["char"]["samples"]


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory):
    from dlm.core.config import load_config
    from tests.conftest import ROOT

    root = tmp_path_factory.mktemp("bpe_run")
    corpus = make_corpus(root / "corpus.txt")
    config = load_config(ROOT / "params" / "smoke.yaml", corpus=str(corpus), max_train_tokens=None, progress=False,
                         tokenizer="bpe", bpe_vocab_size=2000, epochs=1, precision="fp32", device="cpu")
    train(config, root / "run")
    return config, root / "run"


def test_a_bpe_run_keeps_its_tokenizer_json_and_samples_without_unk(bpe_run):
    from tokenizers import Tokenizer as HFTokenizer

    _, run_dir = bpe_run
    standard = HFTokenizer.from_file(str(run_dir / "tokenizer.json"))  # HuggingFace's own file format
    run = load_run(run_dir)
    assert isinstance(run.tokenizer, BPETokenizer) and not (run_dir / "vocab.json").exists()
    assert standard.get_vocab_size() == len(run.tokenizer) == run.model.table().shape[0]
    run.model.rounding.output_bias.data[:] = 0.0  # untrained-looking decoder: every id equally likely
    batch = generate(run, SampleOptions.from_config(run.config, num_samples=8, temperature=4.0))
    assert all("<unk>" not in text and text for text in batch.texts)
    assert batch.texts == [standard.decode(row.tolist()) for row in batch.ids]


def test_a_bpe_run_resumes_without_training_its_tokenizer_again(bpe_run, monkeypatch):
    config, run_dir = bpe_run
    before = (run_dir / "tokenizer.json").read_bytes()

    def no_training(*args, **kwargs):
        raise AssertionError("the BPE tokenizer was trained again")

    monkeypatch.setattr(data_module.BPETokenizer, "build", no_training)
    result = train(config.replace(epochs=2), run_dir, resume=True)
    assert result.epoch == 2 and (run_dir / "tokenizer.json").read_bytes() == before


def test_a_bpe_run_without_its_tokenizer_json_is_one_clear_error(bpe_run, tmp_path):
    import shutil

    _, run_dir = bpe_run
    copy = shutil.copytree(run_dir, tmp_path / "copy")
    (copy / "tokenizer.json").write_text(json.dumps(json.loads((copy / "tokenizer.json").read_text()) | {"x": 1}))
    with pytest.raises(TokenizerError, match="is not the tokenizer this run was trained with"):
        load_run(copy)
    with pytest.raises(TokenizerError, match="Not a tokenizer.json that HuggingFace tokenizers can read"):
        BPETokenizer.load(copy / "tokenizer.json")
    (copy / "tokenizer.json").unlink()
    with pytest.raises(TokenizerError, match="tokenizer.json' is missing"):
        load_run(copy)


def test_word_runs_still_read_their_vocabulary_from_the_checkpoint(tmp_path):
    run = load_run(toy_run_dir(tmp_path / "word"))
    assert isinstance(run.tokenizer, Tokenizer) and run.tokenizer.kind == "word" and run.tokenizer.unk_id == 1
    assert torch.equal(torch.tensor(run.tokenizer.encode("zzzz speak")), torch.tensor([1, run.tokenizer.stoi["speak"]]))
