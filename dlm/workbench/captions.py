"""A page's words in its run's family's own terms: where a caption depends on the family, the
notebooks show these (built from each family module's TERMS and WHY_NOT, see dlm.families), so no
page of a masked or autoregressive run speaks of sigma0, rounding or Diffusion-LM, and a section a
family cannot have is one "not available for this family: why" line.

The captions are IPython Markdown objects (a notebook displays them; their text/plain is the
Markdown itself).
"""

from __future__ import annotations

import html

from IPython.display import Markdown, display

from dlm.core.config import Config
from dlm.families import describe, family, not_available

# A page section that only some families have: what it needs (a capability of SUPPORTS or a sampler
# option of SAMPLE_OPTIONS), its name in the "not available" line, and its caption where it is shown
# (None: the family's own, from its TERMS).
SECTIONS = {
    "likelihood": ("likelihood_bound", "A likelihood bound over training", None),
    "trajectory": ("record_every", "A trajectory of sampling steps",
                   "What the chain holds at each recorded step (the line below the slider says what that is for this "
                   "family); a block run's slider moves over the blocks, then over the steps of the chosen block."),
    "cosine": ("decoder", "The cosine decoder",
               "The same latents, decoded by the learned rounding decoder and by cosine similarity + argmax (the "
               "baseline)."),
    "curve": ("steps", "The quality-against-steps curve",
              "The same seeds sampled with more and fewer reverse steps, each set scored like `dlm evaluate` does "
              "(generative perplexity only when `teacher_dir` names an AR run). Few steps are cheap; this shows what "
              "they cost. Written to `RUN/samples/quality_vs_steps.csv`."),
    "collapse": ("geometry", "The collapse-analysis page", None),
    "infill": ("infill", "Infilling", "The template's words are fixed (marked); every `__` is one generated token."),
    "prefix": ("prefix", "Prefix continuation", "The first words fixed, the rest of the window generated."),
    "length": ("length", "Length control",
               "A speech of exactly `length` tokens: the blank lines around it are fixed, none may fall inside."),
    "guidance": ("guidance", "Classifier guidance",
                 "The guide reads noised latents (trained on this run's frozen embeddings when `RUN/classifiers` lacks "
                 "it); the judge, trained on clean text, decides success. Rows: unguided, each strength, the AR run "
                 "alone and with rejection by the same guide (when `ar_run` is given), and held-out text. Below the "
                 "table, the same seed at every strength (slider; pre-rendered frames in the HTML report)."),
}


def has(model: str, key: str) -> bool:
    """Whether the family `model` has what the page section `key` (of SECTIONS) shows."""
    module, needs = family(model), SECTIONS[key][0]
    return needs in module.SUPPORTS or needs in module.SAMPLE_OPTIONS


def lacks(model: str, key: str) -> str | None:
    """The one "not available for this family: why" line of a section the family cannot have;
    None when it has it."""
    needs, what, _ = SECTIONS[key]
    return None if has(model, key) else not_available(model, what, needs)


def section(model: str, key: str, skipped: str | None = None) -> bool:
    """Open the page section `key` (of SECTIONS) under its heading: True after showing its caption
    when it is shown; else False after printing its one line, why the family lacks it (first) or
    `skipped` (why this run of the notebook leaves it out), so no heading is ever left empty."""
    why = lacks(model, key) or skipped
    if why:
        print(why)
        return False
    text = SECTIONS[key][2]
    display(likelihood(model) if key == "likelihood" else Markdown(text))
    return True


def family_line(config: Config, detail: str = "") -> Markdown:
    """The line under a page's title: which family the run is, in its own words, then `detail`
    (which checkpoint, how it is sampled) on the same line."""
    return Markdown(f"A run of **{describe(config)}** (`model: {config.model}`)" + (f"; {detail}" if detail else "."))


def caption(model: str, term: str) -> Markdown:
    """The family's own caption for a section: a field of its TERMS (losses, table, trajectory)."""
    text = getattr(family(model).TERMS, term)
    if text is None:
        raise ValueError(f"The '{model}' family has no '{term}' caption (its TERMS.{term} is None).")
    return Markdown(text)


def term_titles(model: str) -> dict[str, str]:
    """The family's plot title for each of its loss terms (its TERMS.titles)."""
    return dict(family(model).TERMS.titles)


def trajectory_note(model: str) -> str:
    """The sample page's step slider caption (HTML): what one of the family's frames shows, what its
    t is, and the marking of changed tokens."""
    from dlm.workbench.views import CHANGED_NOTE

    return f"{html.escape(caption(model, 'trajectory').data)} {CHANGED_NOTE}"


def likelihood(model: str) -> Markdown:
    """The likelihood-over-training section's caption: the family's bound, and how it is estimated."""
    return Markdown(f"{family(model).TERMS.likelihood}, on the same held-out windows at a few kept checkpoints, next to "
                    "the validation loss: the number that must fall as the model learns. It is estimated from "
                    "`nll_windows` windows and `nll_draws` draws each (error bars: 2 standard errors); "
                    "`dlm evaluate --nll` gives the precise number, with the AR baseline's NLL on the same windows.")


def verdict_where(model: str) -> Markdown:
    """Where a report judges whether the run's samples collapsed: the collapse-analysis page when the
    family has the geometry it reads, else the samples page (the collapse signals against held-out text)."""
    if has(model, "collapse"):
        return Markdown("Whether its samples collapsed, and why, is judged on the collapse-analysis page.")
    return Markdown("Whether its samples collapsed is judged on the samples page, against held-out text of the same "
                    "shape (a report of this family has no collapse-analysis page).")
