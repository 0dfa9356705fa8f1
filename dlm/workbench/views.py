"""HTML views of generated text: sample tables, and the slider over sampling steps.

Generated text is HTML-escaped everywhere it is shown. The slider exists twice: an ipywidgets
slider that is live in JupyterLab, and a small self-written `<input type=range>` over pre-rendered
frames (inline script, no network) that keeps working in an exported HTML report, where no kernel
runs a widget callback. `step_slider` displays both in one output; JupyterLab shows the widget,
the report (whose export drops widget views, see dlm.workbook) the offline one.
"""

from __future__ import annotations

import html
import json
import uuid
from collections.abc import Sequence

import pandas as pd

from dlm.core.data import NO_SPACE_AFTER, NO_SPACE_BEFORE, PAD, UNK

# About one word in sixteen of word-level tiny_shakespeare is <unk> (rarer than min_count): shown
# as a grey box in HTML and as this marker in plain text, so it never reads as a generated word.
UNK_MARK = "«unk»"
UNK_STYLE = "background:#e4e4e4;color:#666;border-radius:3px;padding:0 3px;font-size:0.85em;font-style:italic"
UNK_HTML = f'<span class="dlm-unk" style="{UNK_STYLE}" title="a word outside the vocabulary (&lt;unk&gt;)">unk</span>'


def mark_unknown(text: str) -> str:
    """Plain text with every <unk> replaced by a visible marker and line breaks shown as ' / '."""
    return text.replace(UNK, UNK_MARK).replace("\n", " / ")


def unknown_html(escaped: str) -> str:
    """Already-escaped HTML text with each <unk> (or its plain marker) as a styled span."""
    if not isinstance(escaped, str):
        return escaped
    return escaped.replace(html.escape(UNK), UNK_HTML).replace(html.escape(UNK_MARK), UNK_HTML)

SLIDER_CSS = """
.dlm-steps {font-family: var(--jp-content-font-family, sans-serif); margin: 0.5em 0;}
.dlm-steps .dlm-controls {display: flex; flex-wrap: wrap; align-items: center; gap: 0.8em; margin-bottom: 0.4em;}
.dlm-steps input[type=range] {width: 24em; max-width: 100%; vertical-align: middle;}
.dlm-steps label input.dlm-step {width: 12em;}
.dlm-steps .dlm-step-label {font-variant-numeric: tabular-nums;}
.dlm-steps ol {margin: 0; padding-left: 1.6em;}
.dlm-steps li {margin: 0.25em 0; line-height: 1.5; font-family: var(--jp-code-font-family, monospace);}
.dlm-steps mark {background: #ffe08a; border-radius: 2px; padding: 0 1px;}
.dlm-steps .dlm-note {color: #666; font-size: 0.9em;}
"""


def render_tokens(tokens: Sequence[str], changed: Sequence[bool] | None = None, joined_as_is: bool = False) -> str:
    """Tokens as escaped HTML text, spaced like dlm.data.join_words (`joined_as_is`: character and
    BPE pieces, which carry their own spaces, joined as they are), line breaks shown as ' / ', <unk>
    as a grey box; `changed` tokens are wrapped in <mark>."""
    parts: list[str] = []
    previous = None
    for position, token in enumerate(tokens):
        if token == PAD:
            continue
        shown = token.replace("\n", " / ")  # a BPE piece may hold line breaks ("\n\n")
        if (not joined_as_is and previous is not None and token not in NO_SPACE_BEFORE
                and previous not in NO_SPACE_AFTER):
            parts.append(" ")
        escaped = UNK_HTML if token == UNK else html.escape(shown)
        if changed is not None and changed[position]:
            escaped = f"<mark>{escaped}</mark>"
        parts.append(escaped)
        previous = token
    return "".join(parts)


def changed_positions(before: Sequence[int] | None, after: Sequence[int]) -> list[bool]:
    if before is None:
        return [False] * len(after)
    return [a != b for a, b in zip(after, before)]


def default_record_every(steps: int, frames: int = 40) -> int:
    """Record every N steps so the slider has about `frames` positions per chain (a block run's
    blocks each run a chain of `steps`; each chain's last step is always kept)."""
    return max(1, steps // frames)


def chain_blocks(frames: Sequence[dict], total_steps: int, blocks: int | None = None) -> int:
    """How many chains of `total_steps` steps the frames run through one after the other: `blocks`
    when given, else what their indices (counted over the blocks; each block's last step is
    always recorded) say."""
    if blocks:
        return blocks
    return max(1, -(-(frames[-1]["index"] + 1) // total_steps)) if frames else 1


def frame_label(frame: dict, total_steps: int, blocks: int = 1) -> str:
    """'step s of S (t = ...)', and for a block run 'block b of B, step s of S (t = ...)': a frame's
    index counts on over the blocks, each block running its own chain of `total_steps` steps."""
    block, step = divmod(frame["index"], total_steps)
    where = f"block {block + 1} of {blocks}, " if blocks > 1 else ""
    return f"{where}step {step + 1} of {total_steps} (t = {frame['t']:g})"  # t: the noise level, 1 to 0


def block_groups(frames: Sequence[dict], total_steps: int, blocks: int) -> list[list[int]]:
    """The positions in `frames` of each block's frames, for the blocks that have any, in order."""
    groups = [[] for _ in range(blocks)]
    for position, frame in enumerate(frames):
        groups[min(frame["index"] // total_steps, blocks - 1)].append(position)
    return [group for group in groups if group]


def render_frames(frames: Sequence[dict], itos: Sequence[str], samples: Sequence[int],
                  joined_as_is: bool = False) -> list[str]:
    """One HTML block per recorded step: an ordered list of the chosen samples, tokens that changed
    since the previous recorded step marked."""
    blocks, previous = [], None
    for frame in frames:
        items = []
        for sample in samples:
            ids = frame["ids"][sample]
            before = previous["ids"][sample] if previous is not None else None
            tokens = [itos[i] for i in ids]
            items.append(f'<li value="{sample + 1}">{render_tokens(tokens, changed_positions(before, ids), joined_as_is)}</li>')
        blocks.append("<ol>" + "".join(items) + "</ol>")
        previous = frame
    return blocks


STEP_NOTE = "Decoded prediction of x0 at each recorded step; <mark>marked</mark> tokens changed since the previous recorded step."
CHANGED_NOTE = "<mark>Marked</mark> tokens changed since the previous recorded step."

# One slider: the frames in order. A block run's two: the block, then the recorded steps of that block
# (the step slider keeps its place, within the block's frames, when the block changes).
SLIDER_SCRIPT = (
    "(function(){var root=document.getElementById(%s);if(!root)return;"
    "var label=root.querySelector('.dlm-step-label');var frames=root.querySelectorAll('.dlm-frame');"
    "var block=root.querySelector('input.dlm-block');var step=root.querySelector('input.dlm-step');"
    "function current(){if(!block)return frames[parseInt(step.value,10)];"
    "var b=block.value,inBlock=[];for(var j=0;j<frames.length;j++){"
    "if(frames[j].getAttribute('data-block')===b)inBlock.push(frames[j]);}"
    "step.max=inBlock.length-1;if(parseInt(step.value,10)>inBlock.length-1)step.value=inBlock.length-1;"
    "return inBlock[parseInt(step.value,10)];}"
    "function show(){var shown=current();for(var j=0;j<frames.length;j++){frames[j].hidden=(frames[j]!==shown);}"
    "label.textContent=shown.getAttribute('data-label');}"
    "step.addEventListener('input',show);if(block)block.addEventListener('input',show);show();})();"
)


def _range(css_class: str, last: int, name: str) -> str:
    return (f'<input type="range" min="0" max="{last}" step="1" value="{last}" class="{css_class}" '
            f'aria-label="{html.escape(name, quote=True)}">')


def slider_html(frames: Sequence[dict], itos: Sequence[str], samples: Sequence[int] = (0,), *,
                total_steps: int | None = None, joined_as_is: bool = False, labels: Sequence[str] | None = None,
                note: str = STEP_NOTE, name: str = "sampling step", blocks: int | None = None) -> str:
    """The offline slider: an <input type=range> over pre-rendered frames, shown by a few lines of
    inline JavaScript; the last frame (the final text) shows first, and without JavaScript too.
    `labels` (one per frame) replace the step labels when the frames are not steps (e.g. guidance
    strengths); `note` (HTML) is the caption, `name` what the slider moves over. A block run
    (`blocks` chains of `total_steps`, or as many as the frames' indices say) gets two sliders: the
    block, then the step within it."""
    if not frames:
        raise ValueError("No recorded steps to show: sample with record_every > 0.")
    total_steps = total_steps or frames[-1]["index"] + 1
    blocks = 1 if labels is not None else chain_blocks(frames, total_steps, blocks)
    labels = list(labels) if labels is not None else [frame_label(frame, total_steps, blocks) for frame in frames]
    uid = f"dlm-steps-{uuid.uuid4().hex[:12]}"  # unique even with several notebooks in one page
    last = len(frames) - 1
    block_of = {}
    if blocks > 1:
        groups = block_groups(frames, total_steps, blocks)
        block_of = {position: b for b, group in enumerate(groups) for position in group}
        controls = (f'<label class="dlm-block-label">block {_range("dlm-block", len(groups) - 1, "block")}</label>'
                    f'<label>step {_range("dlm-step", len(groups[-1]) - 1, name + " within the block")}</label>')
    else:
        controls = _range("dlm-step", last, name)
    divs = "".join(
        f'<div class="dlm-frame" data-label="{html.escape(label, quote=True)}"'
        + (f' data-block="{block_of[i]}"' if block_of else "") + ("" if i == last else " hidden") + f">{block}</div>"
        for i, (label, block) in enumerate(zip(labels, render_frames(frames, itos, samples, joined_as_is)))
    )
    return (
        f'<div class="dlm-steps" id="{uid}"><style>{SLIDER_CSS}</style>'
        f'<div class="dlm-controls">{controls}<span class="dlm-step-label">{html.escape(labels[-1])}</span></div>'
        f'{divs}<div class="dlm-note">{note}</div></div>'
        f"<script>{SLIDER_SCRIPT % json.dumps(uid)}</script>"
    )


class StepViewer:
    """The live slider: an ipywidgets IntSlider over the recorded steps and an HTML widget showing
    the same pre-rendered frames (a block run: a block slider, then a step slider over that block's
    frames). A plain observer, so it needs no `interact` machinery."""

    def __init__(self, frames: Sequence[dict], itos: Sequence[str], samples: Sequence[int] = (0,), *,
                 total_steps: int | None = None, joined_as_is: bool = False, labels: Sequence[str] | None = None,
                 name: str = "step", blocks: int | None = None):
        import ipywidgets as widgets

        if not frames:
            raise ValueError("No recorded steps to show: sample with record_every > 0.")
        self.frames = list(frames)
        self.total_steps = total_steps or self.frames[-1]["index"] + 1
        self.blocks = 1 if labels is not None else chain_blocks(self.frames, self.total_steps, blocks)
        self.labels = (list(labels) if labels is not None
                       else [frame_label(frame, self.total_steps, self.blocks) for frame in self.frames])
        self.rendered = render_frames(self.frames, itos, samples, joined_as_is)
        self.groups = (block_groups(self.frames, self.total_steps, self.blocks) if self.blocks > 1
                       else [list(range(len(self.frames)))])
        last = len(self.groups[-1]) - 1
        self.slider = widgets.IntSlider(value=last, min=0, max=last, step=1, description=name,
                                        readout=False, continuous_update=True,
                                        layout=widgets.Layout(width="24em" if self.blocks > 1 else "32em"))
        self.block = None
        controls = [self.slider]
        if self.blocks > 1:
            self.block = widgets.IntSlider(value=len(self.groups) - 1, min=0, max=len(self.groups) - 1, step=1,
                                           description="block", readout=False, continuous_update=True,
                                           layout=widgets.Layout(width="24em"))
            self.block.observe(self._on_block, names="value")
            controls = [self.block, self.slider]
        self.label = widgets.Label(self.labels[-1])
        self.text = widgets.HTML(self.rendered[-1])
        self.widget = widgets.VBox([widgets.HBox([*controls, self.label]), self.text,
                                    widgets.HTML(f"<style>{SLIDER_CSS}</style>")])
        self.widget.add_class("dlm-steps")
        self.slider.observe(self._on_change, names="value")

    def _on_block(self, change: dict) -> None:
        group = self.groups[change["new"]]
        if self.slider.value > len(group) - 1:
            self.slider.value = len(group) - 1  # shows it, through _on_change
        self.slider.max = len(group) - 1
        self.show(self.slider.value)

    def _on_change(self, change: dict) -> None:
        self.show(change["new"])

    def show(self, position: int) -> None:
        """Show the frame at `position` of the current block (of all frames, without blocks)."""
        group = self.groups[self.block.value if self.block is not None else 0]
        frame = group[min(position, len(group) - 1)]
        self.label.value = self.labels[frame]
        self.text.value = self.rendered[frame]


def step_slider_bundle(frames: Sequence[dict], itos: Sequence[str], samples: Sequence[int] = (0,), *,
                       total_steps: int | None = None, live: bool = True, joined_as_is: bool = False,
                       labels: Sequence[str] | None = None, note: str = STEP_NOTE, name: str = "step",
                       blocks: int | None = None) -> dict:
    """A display bundle with the offline slider as text/html and, when `live`, the ipywidgets
    slider's view: JupyterLab prefers the widget, an exported report falls back to the HTML.
    labels, note, name: see `slider_html` (frames that are not sampling steps); blocks: a block run's."""
    shown = {"total_steps": total_steps, "joined_as_is": joined_as_is, "labels": labels, "name": name, "blocks": blocks}
    bundle = {"text/html": slider_html(frames, itos, samples, note=note, **shown),
              "text/plain": f"<slider over {len(frames)} frames ({name})>"}
    if live:
        viewer = StepViewer(frames, itos, samples, **shown)
        widget_bundle = viewer.widget._repr_mimebundle_()
        bundle.update({k: v for k, v in widget_bundle.items() if k != "text/plain"})
        bundle["_viewer"] = viewer  # kept alive by the caller; removed before display
    return bundle


def step_slider(frames: Sequence[dict], itos: Sequence[str], samples: Sequence[int] = (0,), *,
                total_steps: int | None = None, live: bool = True, joined_as_is: bool = False,
                labels: Sequence[str] | None = None, note: str = STEP_NOTE, name: str = "step",
                blocks: int | None = None):
    """Display the slider over sampling steps (see the module docstring); returns the live viewer.
    `total_steps`: the steps of one chain (a block run's: of each block's chain; its blocks are
    counted from the frames' indices, or given as `blocks`). `joined_as_is`: the run's tokenizer
    joins its pieces as they are (bpe, char; Tokenizer.joined_as_is). labels, note, name: frames
    that are not sampling steps (the control notebook's strengths)."""
    from IPython.display import display

    bundle = step_slider_bundle(frames, itos, samples, total_steps=total_steps, live=live, joined_as_is=joined_as_is,
                                labels=labels, note=note, name=name, blocks=blocks)
    viewer = bundle.pop("_viewer", None)
    display(bundle, raw=True)
    return viewer


def text_table(frame: pd.DataFrame, text_columns: Sequence[str] | None = None):
    """A table for display: every cell and index label HTML-escaped, text columns left-aligned
    (pandas right-aligns them), line breaks shown as ' / ', <unk> as a grey box."""
    if text_columns is None:
        text_columns = [c for c in frame.columns
                        if frame[c].dtype == object or pd.api.types.is_string_dtype(frame[c].dtype)]
    shown = frame.copy()
    for column in text_columns:
        shown[column] = shown[column].map(lambda v: mark_unknown(v) if isinstance(v, str) else v)
    styler = shown.style.format(escape="html", precision=4).format_index(escape="html", axis=0)
    if text_columns:  # text cells escaped here, then <unk> boxed (pandas would escape the box too)
        styler = styler.format(lambda v: unknown_html(html.escape(v)) if isinstance(v, str) else v,
                               escape=None, precision=4, subset=list(text_columns))
    styler = styler.format_index(escape="html", axis=1)
    if text_columns:
        styler = styler.set_properties(subset=list(text_columns), **{"text-align": "left", "white-space": "normal"})
    return styler


def samples_frame(texts: Sequence[str], limit: int | None = None) -> pd.DataFrame:
    """Samples as a table (line breaks shown as ' / ', <unk> marked); pandas escapes the text when shown."""
    texts = list(texts)[:limit] if limit else list(texts)
    return pd.DataFrame({"sample": [mark_unknown(t) for t in texts]})


def side_by_side(columns: dict[str, Sequence[str]], limit: int | None = None) -> pd.DataFrame:
    """Texts from several decoders (or checkpoints) of the same latents, one column each."""
    return pd.DataFrame({name: [mark_unknown(t) for t in (list(texts)[:limit] if limit else texts)]
                         for name, texts in columns.items()})



class Folded:
    """A table folded under a one-line summary (<details>): shown last and closed, so a page leads
    with its results. Plain text shows the summary and the table."""

    def __init__(self, content, summary: str):
        self.content = content
        self.summary = summary

    def _repr_html_(self) -> str:
        inner = self.content.to_html() if hasattr(self.content, "to_html") else html.escape(str(self.content))
        return f"<details><summary>{html.escape(self.summary)}</summary>{inner}</details>"

    def __repr__(self) -> str:
        return f"{self.summary}\n{self.content}"


class Titled:
    """A table under a bold one-line title (a run's name above its table): shown on the page, and
    never printed as a bare line on the terminal that runs the notebook."""

    def __init__(self, content, title: str):
        self.content = content
        self.title = title

    def _repr_html_(self) -> str:
        inner = self.content.to_html() if hasattr(self.content, "to_html") else html.escape(str(self.content))
        return f'<p class="dlm-title"><b>{html.escape(self.title)}</b></p>{inner}'

    def __repr__(self) -> str:
        return f"{self.title}\n{self.content}"


def headline(values: dict, digits: int = 4) -> pd.DataFrame:
    """A run's key numbers as a one-row table (None left out), for the top of a page: a row, not a
    column, so the figures below it still fit on the first screen."""
    shown = {k: (round(v, digits) if isinstance(v, float) else v) for k, v in values.items() if v is not None}
    return pd.DataFrame([shown], index=[""], dtype=object)


FIXED_NOTE = "<mark>Marked</mark> words were given (fixed by the template, prefix or length); the rest was generated."


def fixed_words_html(rows: Sequence[Sequence[int]], fixed: Sequence[Sequence[int]], itos: Sequence[str],
                     joined_as_is: bool = False) -> str:
    """Controlled samples as an ordered list, the given (fixed) positions of each row marked."""
    items = []
    for ids, positions in zip(rows, fixed):
        marked = set(positions)
        tokens = [itos[i] for i in ids]
        items.append(f"<li>{render_tokens(tokens, [p in marked for p in range(len(ids))], joined_as_is)}</li>")
    return (f'<div class="dlm-steps"><style>{SLIDER_CSS}</style><ol>{"".join(items)}</ol>'
            f'<div class="dlm-note">{FIXED_NOTE}</div></div>')


def strength_slider(samples_by_strength: dict[float, Sequence[Sequence[int]]], itos: Sequence[str],
                    samples: Sequence[int] = (0,), live: bool = True, joined_as_is: bool = False):
    """The slider over guidance strength: one pre-rendered frame per strength (samples drawn from the
    same seed, so a frame differs from the previous one only by what guidance changed: marked)."""
    strengths = list(samples_by_strength)
    frames = [{"index": i, "t": 0, "ids": [list(map(int, row)) for row in samples_by_strength[s]]}
              for i, s in enumerate(strengths)]
    labels = [f"strength {s:g}" + (" (unguided)" if s == 0 else "") for s in strengths]
    note = "The same seed at each guidance strength; <mark>marked</mark> words changed since the previous strength."
    return step_slider(frames, itos, samples, total_steps=len(frames), live=live, joined_as_is=joined_as_is,
                       labels=labels, note=note, name="strength")
