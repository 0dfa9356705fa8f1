"""`dlm train`, `dlm sample`, `dlm stats` and `dlm report`: the only place that parses argv and prints for a user."""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path

import torch

from dlm.core.checkpoint import CheckpointError
from dlm.core.config import ConfigError, coerce, describe_type, field_types, load_config, unknown_key_error
from dlm.core.data import CorpusError, check_destination, check_run_folder
from dlm.core.runtime import check_global_batch, pick_device, ranks_from_env
from dlm.core.schedule import SPACINGS
from dlm.core.textstats import sample_stats
from dlm.runs.build import load_run
from dlm.runs.sample import SampleOptions, generate, write_samples
from dlm.runs.train import DivergedError, RunExistsError, train

USER_ERRORS = (ConfigError, CorpusError, CheckpointError, RunExistsError, DivergedError, ValueError)


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """One --key option per Config field; values are checked by the same code as YAML presets."""
    group = parser.add_argument_group("config overrides (any key of dlm.config.Config)")
    for key, tp in field_types().items():
        if tp is bool:
            group.add_argument(f"--{key}", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS)
        else:
            group.add_argument(f"--{key}", metavar="VALUE", default=argparse.SUPPRESS, help=describe_type(tp))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dlm", description="Diffusion-LM workbench on tiny_shakespeare.",
                                     allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", required=True)

    for name, help_text in (("train", "train a run from a YAML preset"),
                            ("train-ar", "train the autoregressive baseline (model: ar) from a YAML preset")):
        train_parser = commands.add_parser(name, help=help_text, allow_abbrev=False)
        train_parser.add_argument("params", help="YAML preset, e.g. params/default.yaml or params/ar.yaml")
        train_parser.add_argument("--run_dir", required=True, help="folder for config, checkpoints and metrics")
        train_parser.add_argument("--resume", action="store_true", help="continue the run in --run_dir")
        train_parser.add_argument("--nproc", type=int, default=None, metavar="N",
                                  help="train with N processes on this machine (torchrun --standalone "
                                       "--nproc_per_node N, DistributedDataParallel; batch_size stays the global batch)")
        add_config_options(train_parser)

    evaluate_parser = commands.add_parser("evaluate", help="score samples against held-out text and an AR teacher",
                                          allow_abbrev=False)
    evaluate_parser.add_argument("--samples", required=True, help="a .jsonl written by dlm sample")
    evaluate_parser.add_argument("--teacher", required=True, help="an autoregressive run (dlm train-ar)")
    evaluate_parser.add_argument("--json", help="also write every number to this file")

    sample_parser = commands.add_parser("sample", help="sample text from a trained run", allow_abbrev=False)
    sample_parser.add_argument("--run_dir", required=True)
    sample_parser.add_argument("--checkpoint", help="a checkpoint file (default: RUN_DIR/checkpoints/last.pt)")
    sample_parser.add_argument("--num_samples", type=int, default=16)
    sample_parser.add_argument("--steps", type=int,
                               help="sampling steps (<= T, placed by --spacing; default: the run's sample_steps)")
    sample_parser.add_argument("--spacing", choices=SPACINGS,
                               help="which timesteps (default: the run's sample_spacing)")
    sample_parser.add_argument("--decoder", choices=["learned", "cosine"], default="learned")
    sample_parser.add_argument("--clamp", action=argparse.BooleanOptionalAction, help="default: the run's clamp")
    sample_parser.add_argument("--clamp_fraction", type=float,
                               help="clamp only during the last share of steps")
    sample_parser.add_argument("--eta", type=float, help="1 ancestral, 0 deterministic DDIM")
    sample_parser.add_argument("--temperature", type=float,
                               help="0: argmax of the rounding logits; >0: draw final tokens from softmax/T")
    sample_parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                               help="use the EMA weights when the checkpoint has them")
    sample_parser.add_argument("--seed", type=int, default=0)
    sample_parser.add_argument("--batch_size", type=int, default=64)
    sample_parser.add_argument("--record_every", type=int, default=0,
                               help="also write FILE.trajectory.json with decoded tokens every N steps")
    sample_parser.add_argument("--device", default="auto")
    sample_parser.add_argument("--out", required=True, help="FILE.jsonl (a .txt is written beside it)")

    stats_parser = commands.add_parser("stats", help="token-distribution stats of samples vs held-out text")
    stats_parser.add_argument("--samples", required=True, help="a .jsonl written by dlm sample")
    stats_parser.add_argument("--run_dir", required=True, help="the run whose corpus and vocabulary to compare with")
    stats_parser.add_argument("--json", help="also write the numbers to this file")

    report_parser = commands.add_parser(
        "report", help="run the train, sample and collapse-analysis notebooks into reports/NAME/ with HTML pages",
        allow_abbrev=False)
    report_parser.add_argument("params", help="YAML preset, e.g. params/default.yaml")
    report_parser.add_argument("--name", help="report folder name (default: the preset's file name, e.g. default)")
    report_parser.add_argument("--reports_dir", default="reports", help="where report folders and index.html go")
    report_parser.add_argument("--overwrite", action="store_true", help="replace an existing report of that name")
    report_parser.add_argument("--show_code", action="store_true", help="show the notebooks' code in the HTML pages")
    report_parser.add_argument("--from_run", help="a run already trained on this preset: draw its pages instead of training")
    report_parser.add_argument("--param", action="append", default=[], metavar="NOTEBOOK.KEY=VALUE",
                               help="a notebook parameter, e.g. sample.num_samples=200 or collapse_analysis.steps=200 "
                                    "(repeatable; the value is read as YAML)")
    return parser


def parse_overrides(extra: list[str], namespace: argparse.Namespace) -> dict:
    if extra:
        if not extra[0].startswith("-") and extra[0].lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            switches = ", ".join(f"--{k} / --no-{k}" for k, tp in field_types().items() if tp is bool)
            raise ConfigError(f"'{extra[0]}' follows a switch, which takes no value: write --KEY or --no-KEY "
                              f"({switches}).")
        flag = next((a for a in extra if a.startswith("--")), extra[0])
        key = flag.lstrip("-").split("=")[0].removeprefix("no-")
        if key in field_types():
            raise ConfigError(f"Could not read the value of --{key}: {' '.join(extra)}")
        raise unknown_key_error(key, where=" on the command line")
    overrides = {}
    for key in field_types():
        if hasattr(namespace, key):
            value = getattr(namespace, key)
            overrides[key] = value if isinstance(value, bool) else coerce(key, value, from_text=True)
    return overrides


def without_nproc(argv: list[str]) -> list[str]:
    """The command line less --nproc N (or --nproc=N): what each of torchrun's processes runs."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            kept.append(arg)
    return kept


def launch_torchrun(nproc: int, argv: list[str]) -> int:
    """`dlm train --nproc N ...` as `torchrun --standalone --nproc_per_node N -m dlm train ...`."""
    if nproc < 1:
        raise ConfigError(f"--nproc must be a positive number of processes, got {nproc}.")
    if ranks_from_env().distributed:
        raise ConfigError("--nproc inside a torchrun process: give either torchrun's --nproc_per_node or --nproc.")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "dlm", *without_nproc(argv)]
    return subprocess.run(command, check=False).returncode


def run_train(args: argparse.Namespace, extra: list[str]) -> None:
    check_run_folder(args.run_dir)  # before the corpus is read
    overrides = parse_overrides(extra, args)
    if args.command == "train-ar":
        overrides["model"] = "ar"
    config = load_config(args.params, **overrides)
    result = train(config, args.run_dir, resume=args.resume)
    if ranks_from_env().is_main:
        print(f"trained {result.step} steps ({result.epoch} epochs) in {result.wall_s:.1f}s -> {result.run_dir}")


def run_sample(args: argparse.Namespace) -> None:
    check_destination(args.out)  # before sampling, so that a bad --out never costs the samples
    device = pick_device(args.device)
    run = load_run(args.run_dir, args.checkpoint, use_ema=args.ema, device=device)
    if not all(torch.isfinite(p).all() for p in run.model.parameters()):
        raise ValueError(f"{run.checkpoint} holds nan or inf weights: the run diverged, so its samples would be "
                         f"empty. Train it again with a smaller lr (or sample an earlier checkpoint).")
    options = SampleOptions.from_config(
        run.config, num_samples=args.num_samples, steps=args.steps, spacing=args.spacing, decoder=args.decoder,
        clamp=args.clamp, clamp_fraction=args.clamp_fraction, eta=args.eta, temperature=args.temperature, seed=args.seed,
        batch_size=args.batch_size, record_every=args.record_every,
    )
    if run.family.NAME == "diffusion":
        from dlm.families.gaussian import chain_blocks

        # block diffusion runs the whole chain once per block: the cost a user trades for order
        blocks = chain_blocks(run.objective, run.config.seq_len)
        print(f"chain: {blocks} block{'s' if blocks > 1 else ''} x {options.steps} steps = "
              f"{blocks * options.steps} denoiser calls per batch of up to {options.batch_size} samples", flush=True)
    batch = generate(run, options, device)
    jsonl, txt = write_samples(batch, args.out, run, options)
    print(f"{len(batch.texts)} samples from {run.checkpoint} (step {run.step}) -> {jsonl}, {txt}")


def run_stats(args: argparse.Namespace) -> None:
    from dlm.evaluation.rundata import heldout_sequences
    from dlm.evaluation.tokens import ids_to_tokens, top_tokens

    run = load_run(args.run_dir)
    path = Path(args.samples)
    if not path.is_file():
        raise ValueError(f"No samples file at '{path}'. Write one with dlm sample --out FILE.jsonl.")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not records:
        raise ValueError(f"'{path}' holds no samples.")
    samples = ids_to_tokens([r["ids"] for r in records], run.tokenizer.itos)
    heldout = heldout_sequences(run, len(samples))
    report = {name: {**sample_stats(seqs), "top_tokens": top_tokens(seqs, 5)}
              for name, seqs in (("samples", samples), ("heldout", heldout))}
    for name, summary in report.items():
        top = ", ".join(f"{t!r} {share:.3f}" for t, share in summary["top_tokens"])
        print(f"{name:8s} tokens {summary['tokens']:6d} | types {summary['types']:5d} | punctuation "
              f"{summary['punctuation_share']:.3f} | entropy {summary['unigram_entropy']:.3f} bits | "
              f"top-10 share {summary['top10_share']:.3f} | {top}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


def run_evaluate(args: argparse.Namespace) -> None:
    import pandas as pd

    from dlm.evaluation.evaluate import evaluate_samples, read_samples

    result = evaluate_samples(read_samples(args.samples), load_run(args.teacher))
    table = pd.DataFrame({"samples": result["samples"], "held-out": result["heldout"]})
    with pd.option_context("display.float_format", "{:.4g}".format, "display.width", 120):
        print(table.to_string())
    reasons = ", ".join(result["collapse_reasons"]) or "none"
    print(f"collapsed: {result['collapsed']} (signals: {reasons}); {result['num_samples']} samples")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))


def notebook_parameters(items: list[str]) -> dict[str, dict]:
    """['sample.num_samples=200', ...] -> {'sample': {'num_samples': 200}}; values are YAML."""
    import yaml

    from dlm.workbench.workbook import ReportError

    parameters: dict[str, dict] = {}
    for item in items:
        name, eq, value = item.partition("=")
        notebook, dot, key = name.partition(".")
        if not (eq and dot and notebook and key):
            raise ReportError(f"--param '{item}' must look like NOTEBOOK.KEY=VALUE, e.g. sample.num_samples=200.")
        parameters.setdefault(notebook, {})[key] = yaml.safe_load(value)
    return parameters


def run_report(args: argparse.Namespace) -> int:
    from dlm.workbench.workbook import ReportError, build_report, report_size

    logging.getLogger("papermill").setLevel(logging.WARNING)
    try:
        report_dir = build_report(args.params, args.name, args.reports_dir, show_code=args.show_code,
                                  overwrite=args.overwrite, parameters=notebook_parameters(args.param),
                                  from_run=args.from_run)
    except ReportError as error:
        print(f"dlm report: error: {error}", file=sys.stderr)
        return 1
    size = report_size(report_dir) / 1e6
    print(f"report -> {report_dir} ({size:.1f} MB); index: {Path(args.reports_dir) / 'index.html'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    try:
        if args.command in ("train", "train-ar") and args.nproc is not None:
            # a bad override or batch size fails here, once, not in every process
            config = load_config(args.params, **parse_overrides(extra, args))
            if not args.resume:
                check_global_batch(config.batch_size, args.nproc)
            return launch_torchrun(args.nproc, sys.argv[1:] if argv is None else list(argv))
        if args.command in ("train", "train-ar"):
            run_train(args, extra)
        else:
            if extra:
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
            commands = {"sample": run_sample, "stats": run_stats, "evaluate": run_evaluate, "report": run_report}
            return commands[args.command](args) or 0
    except USER_ERRORS as error:
        print(f"dlm {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: train has logged where the run stands and how to resume
        print(f"dlm {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0

