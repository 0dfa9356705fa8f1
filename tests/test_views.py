import html
import re

import pandas as pd

from dlm.workbench import views
from dlm.workbench.workbook import external_references

ITOS = ["<pad>", "<unk>", "<script>", "&", ",", "\n", "lord", "my"]
FRAMES = [
    {"index": 0, "t": 99, "ids": [[2, 3, 4], [6, 6, 6]]},
    {"index": 5, "t": 49, "ids": [[7, 3, 4], [6, 6, 6]]},
    {"index": 9, "t": 0, "ids": [[7, 6, 5], [7, 6, 4]]},
]


def test_render_tokens_escapes_and_marks():
    out = views.render_tokens(["<script>", "&", "lord", ",", "\n", "<pad>"], [True, False, False, True, False, False])
    assert out == "<mark>&lt;script&gt;</mark> &amp; lord<mark>,</mark> / "
    assert "<script>" not in out


def test_changed_positions():
    assert views.changed_positions(None, [1, 2]) == [False, False]
    assert views.changed_positions([1, 2, 3], [1, 5, 3]) == [False, True, False]


def test_slider_html_is_offline_escaped_and_starts_at_the_last_step():
    page = views.slider_html(FRAMES, ITOS, samples=[0, 1], total_steps=10)
    assert external_references(page) == []
    assert re.findall(r"<script[^>]*>", page) == ["<script>"]  # one inline script, no src
    assert "<script>(function" in page and "&lt;script&gt;" in page
    assert 'type="range" min="0" max="2" step="1" value="2"' in page
    assert page.count('class="dlm-frame"') == 3 and page.count(" hidden>") == 2
    assert "step 10 of 10 (t = 0)" in page
    # frame 2 (index 5): token 0 changed from '<script>' to 'my'
    second = page.split('class="dlm-frame"')[2]
    assert "<mark>my</mark>" in second and "<mark>&amp;</mark>" not in second


def test_step_viewer_follows_the_slider():
    viewer = views.StepViewer(FRAMES, ITOS, samples=[0], total_steps=10)
    assert viewer.slider.value == 2 and viewer.label.value == "step 10 of 10 (t = 0)"
    last_text = viewer.text.value
    viewer.slider.value = 0
    assert viewer.label.value == "step 1 of 10 (t = 99)"
    assert viewer.text.value != last_text and "&lt;script&gt;" in viewer.text.value


def test_step_slider_bundle_has_widget_and_offline_html():
    bundle = views.step_slider_bundle(FRAMES, ITOS, samples=[0], total_steps=10)
    assert "application/vnd.jupyter.widget-view+json" in bundle and "text/html" in bundle
    assert isinstance(bundle.pop("_viewer"), views.StepViewer)
    offline = views.step_slider_bundle(FRAMES, ITOS, live=False)
    assert set(offline) == {"text/html", "text/plain"}


def test_tables_escape_generated_text():
    frame = views.samples_frame(["<b>bold</b> & co\nnext"])
    assert frame["sample"][0] == "<b>bold</b> & co / next"
    styled = views.text_table(frame).to_html()
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; co / next" in styled and "<b>bold" not in styled
    assert "text-align: left" in styled
    assert "&lt;b&gt;" in frame._repr_html_()  # plain DataFrames escape too
    side = views.side_by_side({"learned": ["a\nb"], "cosine": ["<i>"]})
    assert list(side.columns) == ["learned", "cosine"] and side["learned"][0] == "a / b"
    assert "&lt;i&gt;" in views.text_table(pd.DataFrame({"x": ["<i>"]})).to_html()


def test_default_record_every():
    assert views.default_record_every(200) == 5 and views.default_record_every(20) == 1


def test_unk_is_shown_distinctly():
    out = views.render_tokens(["my", "<unk>", "lord"])
    assert out.startswith("my ") and out.endswith(" lord") and 'class="dlm-unk"' in out
    assert "&lt;unk&gt;</span>" not in out.split("title=")[0]  # a styled box, not the raw tag
    frame = views.samples_frame(["my <unk> lord\nnext"])
    assert frame["sample"][0] == f"my {views.UNK_MARK} lord / next"  # plain tables: a visible marker
    styled = views.text_table(pd.DataFrame({"text": ["my <unk> & <b>"], "n": [1.5]})).to_html()
    assert 'class="dlm-unk"' in styled and "&amp; &lt;b&gt;" in styled and "<b>" not in styled
    side = views.side_by_side({"learned": ["<unk>"]})
    assert side["learned"][0] == views.UNK_MARK


def test_joined_as_is_tokens_are_not_spaced():
    assert views.render_tokens(["m", "y", " ", "l", "o"], joined_as_is=True) == "my lo"
    assert views.render_tokens(["m", "y"]) == "m y"  # word level: spaced
    pieces = ["Romeo", "!", "\n\n", "JULIET", ":\n"]  # BPE pieces may hold line breaks
    assert views.render_tokens(pieces, joined_as_is=True) == views.mark_unknown("".join(pieces))  # as the sample table
    char_itos = ["<pad>", "<unk>", "a", "b", " "]
    frames = [{"index": 0, "t": 0, "ids": [[2, 3, 4, 2]]}]
    assert ">ab a</li>" in views.slider_html(frames, char_itos, joined_as_is=True)
    assert views.StepViewer(frames, char_itos, joined_as_is=True).text.value.endswith("ab a</li></ol>")


def test_folded_table_and_headline():
    folded = views.Folded(pd.DataFrame({"value": ["<x>"]}), "configuration: 1 key")
    shown = folded._repr_html_()
    assert shown.startswith("<details><summary>configuration: 1 key</summary>") and "&lt;x&gt;" in shown
    assert repr(folded).startswith("configuration: 1 key\n")
    table = views.headline({"steps": 10, "val loss": 2.123456, "missing": None})
    assert list(table.columns) == ["steps", "val loss"] and table.iloc[0]["val loss"] == 2.1235 and len(table) == 1


def test_titled_table_shows_its_title_on_the_page_not_as_a_printed_line():
    titled = views.Titled(pd.DataFrame({"signal": ["<x>"]}), "runs/<a>")
    shown = titled._repr_html_()
    assert shown.startswith('<p class="dlm-title"><b>runs/&lt;a&gt;</b></p><table') and "&lt;x&gt;" in shown
    assert repr(titled).startswith("runs/<a>\n")


def test_bpe_pieces_are_shown_as_the_tokenizer_decodes_them():
    from dlm.core.data import build_tokenizer
    from tests.conftest import LINES

    bpe = build_tokenizer("\n\n".join(LINES * 20) + "\n", "bpe", bpe_vocab_size=2000)
    assert bpe.joined_as_is and build_tokenizer("a b", "char").joined_as_is and not build_tokenizer("a b").joined_as_is
    text = "What's this, my countrymen?\n\nI'll speak to it, Romeo!\n"
    ids = bpe.encode(text)
    assert {"What", "'s", "I", "'ll", " Romeo"} <= {bpe.itos[i] for i in ids}  # whole words, and cuts inside two
    # the oracle: HuggingFace's own decode of the ids, line breaks shown as the views show them
    expected = bpe.hf.decode(ids).replace("\n", " / ")
    shown = views.render_tokens([bpe.itos[i] for i in ids], joined_as_is=bpe.joined_as_is)
    assert shown == html.escape(expected)
    frames = [{"index": 0, "t": 0, "ids": [ids + [bpe.pad_id]]}]
    page = views.slider_html(frames, bpe.itos, joined_as_is=bpe.joined_as_is)
    assert f'<li value="1">{html.escape(expected)}</li>' in page
    fixed = views.fixed_words_html([ids], [[]], bpe.itos, joined_as_is=bpe.joined_as_is)
    assert f"<li>{html.escape(expected)}</li>" in fixed


# A block run: 3 blocks of a 4-step chain, every other step recorded (and each block's last step).
BLOCK_FRAMES = [{"index": block * 4 + step, "t": 1999 - step * 666, "ids": [[6 + (block + step) % 2, 7, 6]]}
                for block in range(3) for step in (0, 2, 3)]


def test_a_block_run_s_frames_are_labelled_by_block_and_by_step_within_it():
    labels = [views.frame_label(frame, 4, 3) for frame in BLOCK_FRAMES]
    assert labels[:3] == ["block 1 of 3, step 1 of 4 (t = 1999)", "block 1 of 3, step 3 of 4 (t = 667)",
                          "block 1 of 3, step 4 of 4 (t = 1)"]
    assert labels[-1] == "block 3 of 3, step 4 of 4 (t = 1)"
    assert views.chain_blocks(BLOCK_FRAMES, 4) == 3  # counted from the indices when not given
    assert views.frame_label(FRAMES[-1], 10) == "step 10 of 10 (t = 0)"  # a whole-window chain: no block


def test_a_block_run_s_slider_moves_over_the_blocks_then_the_steps():
    page = views.slider_html(BLOCK_FRAMES, ITOS, total_steps=4)
    assert 'max="2" step="1" value="2" class="dlm-block" aria-label="block"' in page  # the blocks
    assert 'max="2" step="1" value="2" class="dlm-step"' in page  # the recorded steps of one block
    assert [page.count(f'data-block="{b}"') for b in range(3)] == [3, 3, 3]
    assert "step 12 of" not in page and "of 4 (t" in page
    viewer = views.StepViewer(BLOCK_FRAMES, ITOS, total_steps=4)
    assert viewer.label.value == "block 3 of 3, step 4 of 4 (t = 1)"
    viewer.block.value = 0
    assert viewer.label.value == "block 1 of 3, step 4 of 4 (t = 1)"  # the step slider keeps its place
    viewer.slider.value = 0
    assert viewer.label.value == "block 1 of 3, step 1 of 4 (t = 1999)"
    assert viewer.text.value == views.render_frames(BLOCK_FRAMES, ITOS, [0])[0]


def test_frames_are_recorded_per_block_chain():
    from dlm.runs.sample import SampleOptions

    options = SampleOptions(steps=4, record_every=2)
    assert [i for i in range(12) if options.records(i)] == [0, 2, 3, 4, 6, 7, 8, 10, 11]
    assert [i for i in range(10) if SampleOptions(steps=10, record_every=4).records(i)] == [0, 4, 8, 9]
    assert not any(SampleOptions(steps=4, record_every=0).records(i) for i in range(8))
