"""Every `dlm ...` command line in README.md and docs/*.md parses with the real argument parser
(and, for train, its overrides become a Config; for report, its --param keys are the notebooks'):
a documented command that would not run fails here. Nothing is executed."""

import re
import shlex

import pytest

from dlm.cli import build_parser, notebook_parameters, parse_overrides
from dlm.core.config import load_config
from dlm.runs.cooldown import COOLDOWN_OVERRIDES
from dlm.workbench.workbook import check_notebook_parameters, notebooks_dir
from tests.conftest import ROOT

DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def documented_commands() -> list[tuple[str, list[str]]]:
    """(where, argv after 'dlm') for each command line inside a fenced code block."""
    found = []
    for path in DOCUMENTS:
        for block in re.findall(r"```[^\n]*\n(.*?)```", path.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(line, comments=True)
                starts = [i for i, word in enumerate(words) if word == "dlm" and (i == 0 or words[i - 1] == "-m")]
                if starts:
                    found.append((f"{path.name}: {line.strip()[:80]}", words[starts[0] + 1:]))
    return found


COMMANDS = documented_commands()


def test_the_documents_hold_commands_of_every_kind():
    kinds = {argv[0] for _, argv in COMMANDS}
    assert {"train", "train-ar", "cooldown", "calibrate",
            "sample", "stats", "evaluate", "infill", "train-classifier", "control-table",
            "report"} <= kinds


@pytest.mark.parametrize("where, argv", COMMANDS, ids=[where for where, _ in COMMANDS])
def test_every_documented_command_parses(where, argv):
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
    except SystemExit:
        pytest.fail(f"{where}: does not parse (see the usage line above)")
    if args.command in ("train", "train-ar"):
        overrides = parse_overrides(extra, args)
        load_config(ROOT / args.params, **overrides)
    elif args.command == "cooldown":
        assert set(parse_overrides(extra, args)) <= set(COOLDOWN_OVERRIDES), f"{where}: a cooldown keeps the recipe"
    else:
        assert not extra, f"{where}: unrecognized arguments {extra}"
    if args.command == "report":
        check_notebook_parameters(notebook_parameters(args.param), notebooks_dir())


def test_named_config_class_exists_in_help_and_train_notebook():
    import importlib

    help_text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    notebook = (ROOT / "notebooks" / "train.ipynb").read_text()
    for text in (help_text, notebook):
        names = re.findall(r"(dlm(?:\.\w+)+)\.Config\b", text)
        assert names, "the Config class is not named"
        for module in names:
            assert hasattr(importlib.import_module(module), "Config"), module


def test_the_cli_docstring_names_every_command():
    import dlm.cli

    commands = build_parser()._subparsers._group_actions[0].choices
    assert [name for name in commands if not re.search(rf"\b{name}\b(?!-)", dlm.cli.__doc__)] == []
