"""The family contract (dlm/families/contract.py), checked for every family in FAMILIES: a new family
that passes these tests works with the whole workbench. Nothing here names a family: a fourth one
is checked by adding its line to FAMILIES. And the other way round: every command, notebook and
report index row runs on each family seen through the contract alone (a bare family: the contract's
names and nothing more), so that nothing outside dlm/families/ reads what the contract does not list."""

import csv
import dataclasses
import json
import sys
import typing
from types import ModuleType

import pandas as pd
import pytest
import torch

from dlm import families
from dlm.core.config import SECTIONS, Config, field_types, load_config, section_keys
from dlm.families import FAMILIES, contract, family, supports
from dlm.runs import train as train_module
from dlm.runs.build import LoadedRun, load_run
from dlm.runs.metrics import metric_columns
from dlm.runs.sample import SampleOptions, generate
from dlm.runs.train import train
from tests.conftest import ROOT, make_corpus

CAPABILITIES = set(contract.CAPABILITIES)
CONTROLS = {"infill": "template", "prefix": "prefix", "length": "length"}


def tiny_config(corpus, name: str, **overrides) -> Config:
    """params/smoke.yaml with the family's name, fp32 on the CPU: a few steps in a second or two."""
    config = load_config(ROOT / "params" / "smoke.yaml", model=name, corpus=str(corpus), max_train_tokens=None,
                         min_count=1, progress=False, precision="fp32", device="cpu", threads=1, epochs=2, **overrides)
    return families.without_other_families_keys(config, set(overrides))[0]  # the Gaussian preset's own keys out


def read_rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def another_value(key: str):
    """A value of Config key `key` other than its default (not checked against the other keys)."""
    tp, default = field_types()[key], getattr(Config(), key)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is typing.Literal:
        return next(choice for choice in args if choice != default)
    kind = args[0] if args else tp
    return {bool: not default, int: (default or 1) + 1, float: (default or 0.25) / 2, str: "x"}[kind]


def test_each_config_section_says_whose_keys_it_holds():
    """A section named after a family holds keys that family alone reads; the shared sections hold
    no family-specific key (every family reads them); the others' keys (blocks, sampling) are all
    family-specific, each read by the families that list it."""
    shared, owned = ("data", "model", "training", "bookkeeping", "runtime"), families.family_keys()
    assert any(section in FAMILIES for section in SECTIONS)
    for section in SECTIONS:
        for key in section_keys(section):
            if section in FAMILIES:
                assert families.readers(key) == [section], (section, key)
            elif section in shared:
                assert key not in owned, (section, key)
            else:
                assert key in owned, (section, key)
    assert all(families.readers(key) for key in owned)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_a_key_of_another_family_is_refused_naming_its_readers(name):
    for key in sorted(families.family_keys() - family(name).CONFIG_KEYS):
        config = dataclasses.replace(Config(model=name), **{key: another_value(key)})
        with pytest.raises(families.ConfigError, match=f"'{key}' .* the '{name}' family does not read it: .*"
                                                       f"use model: {families.readers(key)[0]}"):
            families.check_config(config)
    for key in sorted(family(name).CONFIG_KEYS):  # its own keys pass this check (their values aside)
        config = dataclasses.replace(Config(model=name), **{key: another_value(key)})
        try:
            families.check_config(config)
        except families.ConfigError as error:
            assert "does not read it" not in str(error), error


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt", paragraphs=60)


@pytest.fixture(scope="module", params=list(FAMILIES))
def trained(request, corpus, tmp_path_factory):
    """One tiny run of each family (two epochs), trained once for the module."""
    name = request.param
    run_dir = tmp_path_factory.mktemp(name) / "run"
    train(tiny_config(corpus, name), run_dir)
    return name, run_dir


@pytest.mark.parametrize("name", list(FAMILIES))
def test_the_module_declares_the_interface(name):
    module = family(name)
    assert module.NAME == name
    assert set(module.SUPPORTS) <= CAPABILITIES, set(module.SUPPORTS) - CAPABILITIES
    assert not {"likelihood_exact", "likelihood_bound"} <= set(module.SUPPORTS)  # one kind of likelihood
    assert set(module.SAMPLE_OPTIONS) <= {f for f in SampleOptions.__dataclass_fields__}
    assert contract.missing(module) == []  # FamilyModule's names and those of each capability it declares
    if set(module.SUPPORTS) & set(CONTROLS):
        assert isinstance(module.ROUNDS_FIXED_WORDS, bool)
    if "likelihood_bound" in module.SUPPORTS:
        assert set(module.BOUND_OPTIONS) <= {"x0", "steps", "spacing"} and module.BOUND_TERMS


@pytest.mark.parametrize("name", list(FAMILIES))
def test_the_module_says_what_it_is_and_what_its_likelihood_is(name):
    """The report index's family column and likelihood kind come from the module."""
    module = family(name)
    titles = {family(other).TITLE for other in FAMILIES}
    assert len(titles) == len(FAMILIES)  # a reader tells the families apart by their titles
    assert module.TITLE.strip() and module.DESCRIPTION.strip() and module.TITLE not in module.DESCRIPTION
    config = Config(model=name)
    kind = module.likelihood_kind(config)
    if supports(name, "likelihood_exact"):
        assert kind == "exact NLL"
    else:
        assert supports(name, "likelihood_bound") and kind.split(",")[0] in ("NELBO", "bound"), kind
    words = module.recipe(config)
    assert isinstance(words, list) and all(isinstance(w, str) and w.strip() for w in words)
    if "block_size" in module.CONFIG_KEYS:  # a block run says so
        blocks = module.recipe(dataclasses.replace(config, block_size=4, block_training="all"))
        assert "blocks of 4" in blocks and "blocks of 4" not in words


@pytest.mark.parametrize("name", list(FAMILIES))
def test_the_module_speaks_of_itself_in_its_own_terms(name):
    """TERMS names what the pages caption; WHY_NOT says why, for everything the family lacks (every
    capability it does not declare, every sampling option its sampler does not read), so a page's
    "not available" line always has its reason."""
    module = family(name)
    terms = module.TERMS
    assert isinstance(terms, families.Terms) and terms.name and terms.losses and terms.table
    assert (terms.likelihood is not None) == supports(name, "likelihood_bound")
    assert (terms.trajectory is not None) == ("record_every" in module.SAMPLE_OPTIONS)
    assert (terms.blocks is not None) == ("block_size" in module.CONFIG_KEYS)
    lacked = (CAPABILITIES - set(module.SUPPORTS)) | (set(SampleOptions.__dataclass_fields__) - set(module.SAMPLE_OPTIONS))
    assert set(module.WHY_NOT) == lacked, set(module.WHY_NOT) ^ lacked
    for lacks, why in module.WHY_NOT.items():
        line = families.not_available(name, "It", lacks)
        assert why and line.startswith(f"It is not available for the '{name}' family: {why} (dlm.families.")
    others = [other for other in FAMILIES if other != name]
    for other in others:  # no family's caption is another's (a masked page once spoke of sigma0)
        assert family(other).TERMS.losses != terms.losses and family(other).TERMS.name != terms.name


def test_losses_and_metric_columns(trained):
    name, run_dir = trained
    run = load_run(run_dir)
    terms = tuple(run.objective.terms)
    assert terms[0] == "total"
    # every loss the objective returns has a column: nothing is dropped from metrics.csv
    ids = torch.randint(0, len(run.tokenizer), (4, run.config.seq_len))
    losses = run.objective.training_losses(run.model, ids, generator=torch.Generator().manual_seed(0))
    assert set(losses) == set(terms) and all(torch.isfinite(v) for v in losses.values())
    with open(run_dir / "metrics.csv", newline="") as handle:
        header = next(csv.reader(handle))
    assert tuple(header) == metric_columns(terms)
    rows = read_rows(run_dir / "metrics.csv")
    assert any(r["total"] for r in rows) and any(r["val_total"] for r in rows)
    for term in terms:  # each term is filled, in training and validation rows
        assert any(r[term] for r in rows) and any(r[f"val_{term}"] for r in rows), term


def test_resume_is_exact(trained, corpus, tmp_path, monkeypatch):
    """Killed after its first epoch and resumed, the run logs the losses of the uninterrupted one."""
    name, whole = trained
    config = tiny_config(corpus, name)
    real_save = train_module.save_checkpoint

    def crash_after_first_epoch(path, payload):
        real_save(path, payload)
        if path.name == "last.pt":
            raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "save_checkpoint", crash_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "part")
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    train(config, tmp_path / "part", resume=True)
    strip = ("tokens_per_s", "elapsed_s")
    rows = [[{k: v for k, v in r.items() if k not in strip} for r in read_rows(d / "metrics.csv")]
            for d in (whole, tmp_path / "part")]
    assert len(rows[0]) > 2 and rows[0] == rows[1]


def test_samples(trained):
    name, run_dir = trained
    run = load_run(run_dir)
    options = SampleOptions.from_config(run.config, num_samples=3, batch_size=2, steps=4, record_every=2)
    batch = generate(run, options)
    assert batch.ids.shape == (3, run.config.seq_len) and batch.ids.dtype == torch.long
    assert 0 <= int(batch.ids.min()) and int(batch.ids.max()) < len(run.tokenizer)  # words only, no [MASK]
    assert len(batch.texts) == 3
    again = generate(run, options)  # seeded: the same samples
    assert torch.equal(batch.ids, again.ids)
    for frame in batch.trajectory:  # frames, when the family records them, are whole windows of words
        assert len(frame["ids"]) == 3 and all(len(row) == run.config.seq_len for row in frame["ids"])
    # a frame's t is one unit in every family: the noise level as a fraction, from near 1 down to 0
    times = [frame["t"] for frame in batch.trajectory]
    assert all(isinstance(t, float) and 0 <= t <= 1 for t in times) and times == sorted(times, reverse=True)
    assert not times or (times[-1] == 0 and times[0] >= 0.5)


# One sampling option each, changed from BASE: a sampler that reads the option gives other samples
# (or another trajectory) with the same seed. Each change is one that matters wherever it is read
# (final draws at a high temperature: a banned <unk> then moves draws even after little training).
BASE = dict(num_samples=4, batch_size=4, seed=0, steps=6, spacing="logsnr", clamp=True, clamp_fraction=1.0, eta=1.0,
            x0="predicted", temperature=1.0, unk=True, decoder="learned", record_every=0, sampler="grid")
CHANGED = dict(num_samples=3, batch_size=2, seed=1, steps=3, spacing="uniform", clamp=False, clamp_fraction=0.3,
               eta=0.0, x0="expected", temperature=0.0, unk=False, decoder="cosine", record_every=2,
               sampler="first_hitting")


def test_the_declared_sample_options_are_those_the_sampler_reads(trained):
    """SAMPLE_OPTIONS is what a user may give (dlm.families.check_sample_options refuses the rest):
    checked against what changing each option does to the samples, not against the declaration."""
    name, run_dir = trained
    run = load_run(run_dir)
    assert set(BASE) == set(CHANGED) == set(SampleOptions.__dataclass_fields__)

    def draw(**options):
        batch = generate(run, SampleOptions(**options))
        return batch.ids, [frame["ids"] for frame in batch.trajectory]

    base = draw(**BASE)
    assert torch.equal(base[0], draw(**BASE)[0])  # seeded: a difference below is the option's
    # every word of the tiny corpus is in the vocabulary, so <unk> is never drawn: the ban (unk=False)
    # is shown on the token the sampler draws most, standing in for <unk>
    run.tokenizer.unk_id = int(base[0].flatten().mode().values)
    read = set()
    for option, value in CHANGED.items():
        ids, frames = draw(**{**BASE, option: value})
        if ids.shape != base[0].shape or not torch.equal(ids, base[0]) or frames != base[1]:
            read.add(option)
    assert read == set(family(name).SAMPLE_OPTIONS), (sorted(read), sorted(family(name).SAMPLE_OPTIONS))


def test_likelihood(trained):
    """An exact NLL or a bound, in nats per token with a standard error, through the one API."""
    from dlm.evaluation.evaluate import teacher_nll
    from dlm.evaluation.likelihood import nll_bound
    from dlm.evaluation.rundata import validation_windows

    name, run_dir = trained
    run = load_run(run_dir)
    ids = validation_windows(run, 8)
    if supports(name, "likelihood_exact"):
        nll = teacher_nll(run, ids.tolist())
        assert 0 < nll < 2 * torch.log(torch.tensor(float(len(run.tokenizer))))
    if supports(name, "likelihood_bound"):
        bound = nll_bound(run, ids, draws=2)
        assert bound.windows == 8 and bound.se > 0 and torch.isfinite(torch.tensor(bound.total))
        assert bound.total > 0
    if not {"likelihood_exact", "likelihood_bound"} & set(family(name).SUPPORTS):
        with pytest.raises(ValueError, match="not available for"):
            nll_bound(run, ids)


@pytest.mark.parametrize("capability", list(CONTROLS))
def test_control_where_supported(trained, capability):
    """A family that says it can infill (or continue a prefix, or write a speech of N tokens) keeps
    every fixed word in place; one that cannot says so in one line."""
    from dlm.runs.control import infill, make_control

    name, run_dir = trained
    run = load_run(run_dir)
    words = [w for w in run.tokenizer.itos if w.isalpha()][:3]
    given = {"infill": {"template": f"{words[0]} __ __ {words[1]} __ {words[2]}"},
             "prefix": {"prefix": f"{words[0]} {words[1]}"}, "length": {"length": 4}}[capability]
    if not supports(name, capability):
        with pytest.raises(ValueError, match="not available for"):
            make_control(run, **given)
        return
    control = make_control(run, **given)
    options = SampleOptions.from_config(run.config, num_samples=3, batch_size=2, steps=4)
    if not run.family.ROUNDS_FIXED_WORDS:  # what it declares: fill gives the fixed words back as given
        targets = control.ids.expand(3, -1)
        raw, _ = run.family.fill(run, targets, control.known, options, torch.Generator().manual_seed(0))
        assert torch.equal(raw[:, control.known], targets[:, control.known])
    result = infill(run, control, options)
    assert result.ids.shape == (3, run.config.seq_len)
    known = control.known
    assert torch.equal(result.ids[:, known], control.ids[known].expand(3, -1))
    assert bool((~known).any()) and int(result.ids[:, ~known].max()) < len(run.tokenizer)
    if capability == "length":  # no blank line inside the speech
        newline = run.tokenizer.stoi["\n"]
        speech = result.ids[:, control.speech]
        assert not ((speech[:, 1:] == newline) & (speech[:, :-1] == newline)).any()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILIES))
def test_notebooks_run_for_every_family(name, tmp_path):
    """The report (train, sample, collapse analysis where the family has the geometry, control) on a
    tiny preset of each family: no notebook fails, and a page the family lacks is named as such."""
    import yaml

    from dlm.workbench import workbook

    values = yaml.safe_load((ROOT / "params" / "smoke.yaml").read_text())
    tasks = ",".join(t for t in ("infill", "prefix", "length") if supports(name, t))
    values.update(model=name, corpus=str(make_corpus(tmp_path / "corpus.txt")), min_count=1, max_train_tokens=None,
                  threads=1, sample_steps=8, epochs=2, control_tasks=tasks)
    values = {key: value for key, value in values.items()  # the keys this family reads, and the shared ones
              if key not in families.family_keys() - family(name).CONFIG_KEYS}
    preset = tmp_path / f"{name}.yaml"
    preset.write_text(yaml.safe_dump(values))
    curve = {"curve_steps": "2,4", "curve_samples": 2} if "steps" in family(name).SAMPLE_OPTIONS else {}
    parameters = {"sample": {"num_samples": 4, "threads": 1, "table_rows": 3, **curve},
                  "collapse_analysis": {"num_samples": 4, "threads": 1, "max_checkpoints": 2},
                  "control": {"num_samples": 2, "threads": 1, "length": 4}}
    report_dir = workbook.build_report(preset, name=name, reports_dir=tmp_path / "reports", parameters=parameters)
    info = json.loads((report_dir / "report.json").read_text())
    assert info["status"] == "complete"
    expected = {nb for nb in workbook.NOTEBOOKS if nb != "control" or tasks} - set(info["not_available"])
    assert set(info["pages"]) == expected
    assert all("not available for" in line for line in info["not_available"].values())
    pages_speak_of_their_family(name, report_dir, set(info["pages"]))


def pages_speak_of_their_family(name, report_dir, pages):
    """A report's pages in its family's own terms: its name under each title, its loss caption, no
    Gaussian word on another family's page, a section it lacks as one line saying why; and, with
    Chromium, every page passes the 1,200 x 900 checks (tests/test_notebooks.py)."""
    import html
    import os

    from dlm.workbench import captions
    from tests.test_notebooks import CHROMIUM, PAGE_CHECKS, measure_pages, page_check

    train = html.unescape((report_dir / "train.html").read_text())
    assert "Train a run" in train and family(name).TERMS.name in train and family(name).TERMS.losses in train
    if not supports(name, "geometry"):
        assert "collapse-analysis page" not in train.replace("no collapse-analysis page", "")
        for word in ("sigma0", "Diffusion-LM", "rounding (cross-entropy)", "Diffusion (MSE)"):
            assert word not in train, word
    for section in ("likelihood", "trajectory", "cosine", "curve"):
        line = captions.lacks(name, section)
        page = html.unescape((report_dir / ("train.html" if section == "likelihood" else "sample.html")).read_text())
        assert line is None or line in page, (section, line)
    if "control" in pages:
        control = html.unescape((report_dir / "control.html").read_text())
        for task in ("infill", "prefix", "length", "guidance"):
            assert captions.lacks(name, task) is None or captions.lacks(name, task) in control, task
        assert "rounding kept" not in control or family(name).ROUNDS_FIXED_WORDS
    if os.path.exists(CHROMIUM):
        facts = measure_pages([report_dir / f"{page}.html" for page in sorted(pages)])
        assert {(path.name, check): page_check(found, check) for path, found in facts.items()
                for check in PAGE_CHECKS if page_check(found, check)} == {}


def test_what_a_family_lacks_is_refused_in_one_line(trained):
    """Every analysis or control the family does not declare answers 'not available for' it
    instead of failing somewhere inside (and the ones it declares do not)."""
    from dlm.evaluation.analysis import analyse_run
    from dlm.evaluation.probe import heldout_ids
    from dlm.runs.classifier import train_classifier
    from dlm.runs.guidance import check_guidance

    name, run_dir = trained
    run = load_run(run_dir)
    entry = {"probe": lambda: heldout_ids(run, 2),
             "guidance": lambda: check_guidance(run),
             "latent": lambda: train_classifier(run, "question", "latent", steps=1)}
    for capability, call in entry.items():
        if supports(name, capability):
            continue
        with pytest.raises(ValueError, match="not available for"):
            call()
    if not supports(name, "geometry"):
        with pytest.raises(ValueError, match="not available for"):
            analyse_run(run_dir, max_checkpoints=1, num_samples=2)


def test_an_older_metrics_file_keeps_its_columns(tmp_path):
    """A run logged under the old fixed column list (every family's terms, some always empty)
    resumes with its columns kept and the objective's new ones added, rows intact."""
    from dlm.runs.metrics import MetricsWriter
    from dlm.workbench import plots

    path = tmp_path / "metrics.csv"
    old = ("step,epoch,total,mse,rounding,prior,nll,val_total,val_mse,val_rounding,val_prior,val_nll,"
           "embedding_norm,nn_distance,lr,tokens_per_s,elapsed_s")
    path.write_text(old + "\n5,1,3.0,1.0,2.0,0.0,,,,,,,4.0,2.5,0.001,100.0,1.0\n10,1,,,,,,2.5,1.5,1.0,0.0,,,,,,2.0\n"
                    "15,2,2.0,0.5,1.5,0.0,,,,,,,4.0,2.5,0.001,100.0,3.0\n")
    writer = MetricsWriter(path, keep_until_step=10, terms=("total", "mse", "rounding", "prior", "extra"))
    writer.write({"step": 15, "epoch": 2, "total": 1.5, "extra": 0.25})
    rows = read_rows(path)
    header = path.read_text().splitlines()[0].split(",")
    assert header == old.split(",") + ["extra", "val_extra"]
    assert [r["step"] for r in rows] == ["5", "10", "15"] and rows[0]["mse"] == "1.0" and rows[2]["extra"] == "0.25"
    with pytest.raises(ValueError, match="no column for surprise"):  # an undeclared term is never dropped silently
        writer.write({"step": 20, "surprise": 1.0})
    plots.loss_curves(pd.read_csv(path))  # the old file still plots


# --- a family that has the contract and nothing more ----------------------------------------------
# Each real family seen only through dlm.families.contract: a module holding the contract's names
# for what the family declares (each delegating to the real one), an objective with `terms` and
# `training_losses` alone, a model with `embedding`, `table()` and nn.Module's API alone. Every
# command and notebook that claims to support the family runs on it: a read of anything else outside
# dlm/families/ (run.objective.steps, run.model.embed, a family function the contract does not list)
# raises ContractLeak here, also where it is asked with hasattr or getattr and a default.


class ContractLeak(Exception):
    """A read outside the contract. Not an AttributeError: hasattr and getattr(..., default), which
    would turn a leak into a silently different path, let it through."""


def leaks(what: str):
    """A __getattr__ for `what`: a dunder or private name missing is the usual AttributeError (Python
    and torch probe those); any other name is a ContractLeak."""
    def __getattr__(name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        raise ContractLeak(f"'{name}' of {what} read outside dlm/families/: the contract does not list it")
    return __getattr__


class BareModel(torch.nn.Module):
    """contract.Model: `embedding` and `table()`, beside nn.Module's own API."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner
        self.embedding = inner.embedding

    def table(self) -> torch.Tensor:
        return self.inner.table()

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)  # its parameters and submodules (inner, embedding)
        except AttributeError:
            return leaks("the family's model")(name)


class BareObjective:
    """contract.Objective: `terms` and `training_losses`."""

    __slots__ = ("terms", "timestep_sampler", "_inner")

    def __init__(self, inner):
        self.terms, self.timestep_sampler, self._inner = tuple(inner.terms), inner.timestep_sampler, inner

    def training_losses(self, model, ids, generator=None, uniform_t=False, keys=None):
        return self._inner.training_losses(model.inner, ids, generator, uniform_t, keys)

    __getattr__ = staticmethod(leaks("the family's objective"))


def bare_family(real_name: str) -> ModuleType:
    """The family `real_name` through its contract alone, as a module named bare_<real_name>."""
    real = family(real_name)

    def inward(value):  # what the outside hands the bare family, as the real family knows it
        if isinstance(value, LoadedRun):
            return dataclasses.replace(value, model=inward(value.model), objective=value.objective._inner,
                                       config=inward(value.config))
        if isinstance(value, Config):
            return dataclasses.replace(value, model=real_name)
        return value.inner if isinstance(value, BareModel) else value

    def delegate(name: str, function):
        wrap = {"new_model": BareModel, "objective": BareObjective}.get(name, lambda result: result)

        def call(*args, **kwargs):
            return wrap(function(*map(inward, args), **{key: inward(value) for key, value in kwargs.items()}))
        return call

    module = ModuleType(f"tests_bare_{real_name}", f"The {real_name} family through the contract alone.")
    for name in contract.module_members(real.SUPPORTS):
        value = getattr(real, name)
        setattr(module, name, delegate(name, value) if callable(value) and not name.isupper() else value)
    module.NAME, module.TITLE = f"bare_{real_name}", f"bare {real.TITLE}"
    module.__getattr__ = leaks(f"the family module {module.NAME}")
    return module


def register_bare(real_name: str, monkeypatch) -> ModuleType:
    module = bare_family(real_name)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(FAMILIES, module.NAME, module.__name__)
    return module


@pytest.fixture(scope="module")
def teacher(corpus, tmp_path_factory):
    """An AR run on the same corpus and vocabulary: the teacher and the AR rows."""
    run_dir = tmp_path_factory.mktemp("teacher") / "ar"
    train(tiny_config(corpus, "ar"), run_dir)
    return run_dir


def test_a_bare_family_keeps_the_contract_and_has_nothing_else():
    for name in FAMILIES:
        module = bare_family(name)
        assert contract.missing(module) == []
        assert set(vars(module)) - {"__name__", "__doc__", "__package__", "__loader__", "__spec__", "__getattr__"} == set(
            contract.module_members(module.SUPPORTS))
        with pytest.raises(ContractLeak):
            hasattr(module, "block_size_for")


@pytest.mark.parametrize("real_name", list(FAMILIES))
def test_every_command_runs_on_a_family_with_the_contract_alone(real_name, corpus, teacher, tmp_path, monkeypatch,
                                                                capsys):
    """dlm train, sample, stats, evaluate (--nll, --samples, --matched), calibrate, infill,
    train-classifier and control-table on the bare family: each it declares runs, each it lacks is
    one line naming the family."""
    from dlm.cli import main

    bare = register_bare(real_name, monkeypatch)
    name, declared, options = bare.NAME, set(bare.SUPPORTS), set(bare.SAMPLE_OPTIONS)
    run_dir, out = tmp_path / "run", tmp_path / "samples.jsonl"

    def ran(*argv):
        code = main([str(a) for a in argv])
        err = capsys.readouterr().err
        assert code == 0, err

    def refused(*argv, says="not available for"):
        code = main([str(a) for a in argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and says in err[0], "\n".join(err)

    steps = ["--steps", "3"] if "steps" in options else []
    ran("train", ROOT / "params" / "smoke.yaml", "--model", name, "--run_dir", run_dir, "--corpus", corpus,
        "--min_count", "1", "--max_train_tokens", "none", "--epochs", "2", "--precision", "fp32", "--device", "cpu",
        "--threads", "1", "--no-progress")
    ran("sample", "--run_dir", run_dir, "--num_samples", "3", "--batch_size", "2", "--out", out, *steps,
        *(["--record_every", "1"] if "record_every" in options else []))
    assert len(out.read_text().splitlines()) == 3
    ran("stats", "--samples", out, "--run_dir", run_dir)
    ran("evaluate", "--samples", out, "--teacher", teacher)
    nll = ["evaluate", "--nll", "--run_dir", run_dir, "--windows", "2", "--draws", "1"]
    if "likelihood_bound" in declared:
        ran(*nll, "--ar_run", teacher)
        if "steps" in bare.BOUND_OPTIONS:
            ran(*nll, "--steps", "2")
        else:  # a bound without a shortened chain: one line, not an AttributeError
            refused(*nll, "--steps", "5", says="has no such chain: drop --steps")
    else:
        refused(*nll)
    if "likelihood_exact" in declared:
        ran("evaluate", "--samples", out, "--teacher", run_dir)
    matched = ["evaluate", "--matched", "--run_dir", run_dir, "--teacher", teacher, "--num_samples", "4"]
    if "temperature" in declared:
        ran(*matched)
        ran("calibrate", "--run_dir", run_dir, "--num_samples", "4")
    else:
        refused(*matched)
    words = [w for w in load_run(run_dir).tokenizer.itos if w.isalpha()][:2]
    for task, argv in (("infill", ["--template", f"{words[0]} __ __ {words[1]}"]), ("prefix", ["--prefix", words[0]]),
                       ("length", ["--length", "3"])):
        infill = ["infill", "--run_dir", run_dir, "--num_samples", "3", *argv, *steps]
        ran(*infill) if task in declared else refused(*infill)
    classifier = ["train-classifier", "--run_dir", run_dir, "--attribute", "question", "--steps", "2", "--batch_size",
                  "4", "--width", "16", "--depth", "1"]
    ran(*classifier, "--kind", "judge")
    table = ["control-table", "--run_dir", run_dir, "--ar_run", teacher, "--attribute", "question", "--strengths",
             "0.1", "--num_samples", "2", "--ar_candidates", "2", "--out_dir", tmp_path / "control", *steps]
    if "latent" in declared:
        ran(*classifier, "--kind", "latent")
    else:
        refused(*classifier, "--kind", "latent")
    ran(*table) if "guidance" in declared else refused(*table)


def execute_here(notebook, output, parameters=None, cwd=None, kernel_name=None, echo=False):
    """workbook.execute in this process (where the bare family is registered): the notebook's code
    cells run in order in one namespace, `parameters` assigned right after its parameters cell, as
    papermill injects them; the notebook is written to `output` as it is (no outputs)."""
    import nbformat

    nb = nbformat.read(str(notebook), as_version=4)
    namespace = {"__name__": "__main__", "display": lambda *objects, **options: None}
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        exec(compile(cell.source, str(notebook), "exec"), namespace)
        if "parameters" in cell.metadata.get("tags", []):
            exec("\n".join(f"{key} = {value!r}" for key, value in (parameters or {}).items()), namespace)
    nbformat.write(nb, str(output))
    return output


@pytest.mark.slow
@pytest.mark.parametrize("real_name", list(FAMILIES))
def test_every_notebook_and_the_report_index_run_on_a_family_with_the_contract_alone(real_name, corpus, teacher,
                                                                                      tmp_path, monkeypatch):
    """dlm report's notebooks (train, sample, collapse analysis where it has the geometry, control
    with the tasks it declares) run in this process on the bare family, and the report index gives
    it its row."""
    import yaml

    from dlm.workbench import workbook

    bare = register_bare(real_name, monkeypatch)
    monkeypatch.setattr(workbook, "execute", execute_here)
    name = bare.NAME
    values = yaml.safe_load((ROOT / "params" / "smoke.yaml").read_text())
    tasks = ",".join(t for t in ("infill", "prefix", "length", "guidance") if supports(name, t))
    values.update(model=name, corpus=str(corpus), min_count=1, max_train_tokens=None, threads=1, sample_steps=4,
                  epochs=2, precision="fp32", device="cpu", control_tasks=tasks)
    values = {key: value for key, value in values.items() if key not in families.family_keys() - bare.CONFIG_KEYS}
    preset = tmp_path / f"{name}.yaml"
    preset.write_text(yaml.safe_dump(values))
    curve = {"curve_steps": "2,4", "curve_samples": 2} if "steps" in bare.SAMPLE_OPTIONS else {"curve_steps": ""}
    parameters = {"train": {"nll_windows": 2, "nll_draws": 1, "nll_checkpoints": 1, "preview_checkpoints": 1,
                            "samples_per_checkpoint": 1},
                  "sample": {"num_samples": 4, "threads": 1, "table_rows": 3, "teacher_dir": str(teacher), **curve},
                  "collapse_analysis": {"num_samples": 4, "threads": 1, "max_checkpoints": 2},
                  "control": {"num_samples": 2, "threads": 1, "length": 4, "classifier_steps": 2, "strength": "0.1",
                              "ar_run": str(teacher)}}
    reports = tmp_path / "reports"
    report_dir = workbook.build_report(preset, name=name, reports_dir=reports, parameters=parameters, echo=False)
    info = json.loads((report_dir / "report.json").read_text())
    assert info["status"] == "complete"
    expected = {nb for nb in workbook.NOTEBOOKS if nb != "control" or tasks} - set(info["not_available"])
    assert set(info["pages"]) == expected and ("collapse_analysis" in expected) == supports(name, "geometry")
    numbers = info["numbers"]
    assert numbers["family"] == name and numbers["family_title"] == bare.TITLE
    assert numbers["likelihood_kind"] == bare.likelihood_kind(load_run(report_dir / "run").config)
    assert "likelihood" in numbers  # the exact NLL (its validation loss) or the bound the train notebook wrote
    index = (reports / "index.html").read_text()
    assert f"<b>{name}</b>" in index and bare.TITLE in index
