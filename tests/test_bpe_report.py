"""End to end: `dlm report` of a BPE run (params/smoke.yaml, --param train.tokenizer=bpe) trains,
samples and draws every page with no <unk> anywhere a user reads, and shows the text as the run's
own tokenizer.json decodes it (no spaces inserted inside words)."""

import html
import json
import re

import pytest
import yaml

from dlm.cli import main
from dlm.core.data import split_text
from dlm.workbench import views, workbook
from tests.conftest import ROOT, make_corpus

pytestmark = pytest.mark.slow

# <unk> as text, escaped in a page, or as the views draw it (the grey box, the plain-text marker)
UNK_FORMS = ("<unk>", "&lt;unk&gt;", "&lt;unk>", "«unk»", "&laquo;unk&raquo;", "dlm-unk")


@pytest.fixture(scope="module")
def bpe_report(tmp_path_factory):
    """The smoke preset on a made-up corpus (the real one is not committed) with the control page on,
    one thread; BPE chosen on the command line as a user would."""
    folder = tmp_path_factory.mktemp("bpe_report")
    preset = yaml.safe_load((ROOT / "params" / "smoke.yaml").read_text())
    preset.update(corpus=str(make_corpus(folder / "corpus.txt")), max_train_tokens=None, threads=1, precision="fp32",
                  device="cpu", sample_steps=8, control_tasks="infill,prefix,length,guidance")
    (folder / "bpe.yaml").write_text(yaml.safe_dump(preset))
    notebook_parameters = {
        "train": {"tokenizer": "bpe", "bpe_vocab_size": 2000},
        "sample": {"num_samples": 6, "threads": 1, "table_rows": 6, "curve_steps": "2,4", "curve_samples": 4},
        "collapse_analysis": {"num_samples": 6, "threads": 1, "max_checkpoints": 2},
        "control": {"num_samples": 2, "threads": 1, "length": 4, "classifier_steps": 5, "strength": "0.5"},
    }
    flags = [flag for notebook, values in notebook_parameters.items() for key, value in values.items()
             for flag in ("--param", f"{notebook}.{key}={json.dumps(value)}")]
    assert main(["report", str(folder / "bpe.yaml"), "--name", "bpe", "--reports_dir", str(folder / "reports"),
                 *flags]) == 0
    return folder / "reports" / "bpe"


def page_text(fragment: str) -> str:
    """A piece of a page as its reader sees the characters (tags dropped, entities read)."""
    return html.unescape(re.sub(r"<[^>]+>", "", fragment))


def shown(text: str) -> str:
    return text.replace("\n", " / ")  # how the pages show a line break inside generated text


def test_a_bpe_report_is_complete_and_its_run_is_a_bpe_run(bpe_report):
    info = json.loads((bpe_report / "report.json").read_text())
    assert info["status"] == "complete" and set(info["pages"]) == set(workbook.NOTEBOOKS)
    run = bpe_report / "run"
    assert yaml.safe_load((run / "config.yaml").read_text())["tokenizer"] == "bpe"
    assert (run / "tokenizer.json").is_file() and not (run / "vocab.json").exists()


def test_no_unk_in_anything_a_user_reads(bpe_report):
    run = bpe_report / "run"
    read = [*(bpe_report / f"{name}.html" for name in workbook.NOTEBOOKS), bpe_report.parent / "index.html",
            bpe_report / "report.json", *(run / "samples").iterdir(), *(run / "analysis").iterdir()]
    assert (run / "samples" / "samples.jsonl") in read and (run / "analysis" / "verdict.json") in read
    for path in read:
        text = path.read_text(encoding="utf-8")
        assert not [form for form in UNK_FORMS if form in text], path.name
    vocabulary = json.loads((run / "samples" / "samples.trajectory.json").read_text())["itos"]
    assert "<unk>" not in vocabulary and len(vocabulary) > 256  # the 256 byte pieces and merges


def test_samples_are_the_tokenizers_own_decoding_on_file_and_on_the_page(bpe_report):
    from tokenizers import Tokenizer as HFTokenizer

    run = bpe_report / "run"
    standard = HFTokenizer.from_file(str(run / "tokenizer.json"))  # the oracle: HuggingFace's own decode
    records = [json.loads(line) for line in (run / "samples" / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 6
    page = (bpe_report / "sample.html").read_text()
    for record in records:
        assert record["text"] == standard.decode(record["ids"])
        assert html.escape(shown(record["text"])) in page  # the sample table
    # the slider over sampling steps: every recorded step of every shown sample, pieces joined as they are
    frames = json.loads((run / "samples" / "samples.trajectory.json").read_text())["frames"]
    blocks = re.findall(r'<div class="dlm-frame"[^>]*>(.*?)</div>', page, re.S)
    assert len(blocks) == len(frames) > 1
    pad = standard.token_to_id("<pad>")
    for frame, block in zip(frames, blocks):
        items = [page_text(item) for item in re.findall(r"<li[^>]*>(.*?)</li>", block, re.S)]
        # each piece as the tokenizer decodes it (a lone byte of a longer character reads as such)
        expected = [shown("".join(standard.decode([i]) for i in ids if i != pad)) for ids in frame["ids"]]
        assert items and items == expected[: len(items)]


def test_the_control_page_shows_held_out_words_as_they_are_written(bpe_report):
    """The fixed words of the infilled and continued windows come from held-out text: every stretch
    of them, as the page shows it, is a piece of that text (a space inserted inside a word is not)."""
    heldout = shown(split_text((bpe_report.parent.parent / "corpus.txt").read_text(encoding="utf-8"))[1])
    page = (bpe_report / "control.html").read_text()
    template = re.search(r"template: (.*)", page).group(1)  # the blanked window, as a user would type it
    parts = [part for part in page_text(template).replace("\\n", "\n").split("__") if part]
    assert parts and all(shown(part) in heldout for part in parts), parts
    lists = re.findall(r"<ol>((?:(?!</ol>).)*)</ol><div class=\"dlm-note\">" + re.escape(views.FIXED_NOTE), page, re.S)
    assert len(lists) == 3  # infilling, prefix, length
    # adjacent marked pieces make one fixed stretch; a space between them would be the page's own
    marked = [re.findall(r"<mark>(.*?)</mark>", re.sub(r"</mark>( ?)<mark>", r"\1", block), re.S) for block in lists]
    stretches = [page_text(m) for m in marked[0] + marked[1]]
    assert len(stretches) >= 4 and all(s in heldout for s in stretches), [s for s in stretches if s not in heldout]
