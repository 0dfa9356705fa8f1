"""The dlm command: train, train-ar, cooldown, calibrate, sample, stats, evaluate, infill,
train-classifier, control-table and report. The only place that parses argv and prints for a user."""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from dlm import families
from dlm.core.checkpoint import CheckpointError
from dlm.core.config import (
    Config,
    ConfigError,
    coerce,
    current_model,
    describe_type,
    field_types,
    load_config,
    load_yaml,
    unknown_key_error,
)
from dlm.core.data import atomic_write_bytes, check_destination, check_run_folder
from dlm.core.errors import UserError, is_disk_full
from dlm.core.runtime import check_global_batch, pick_device, ranks_from_env
from dlm.core.schedule import SPACINGS
from dlm.core.textstats import sample_stats
from dlm.families import FAMILIES, check_sample_options
from dlm.families.masked import SAMPLERS
from dlm.runs.build import load_run
from dlm.runs.sample import (
    X0_CHOICES,
    SampleOptions,
    SampleWriter,
    check_memory,
    check_options,
    check_sample_destination,
    generate_batches,
)
from dlm.runs.train import DivergedError, RunExistsError, train

# What the user can fix: one line, no traceback. Anything else is a bug in dlm and shows its traceback.
USER_ERRORS = (UserError, CheckpointError, RunExistsError, DivergedError)
REPORT_A_BUG = ("this is a bug in dlm, not in what you typed: please report it with the command line and the "
                "traceback above")


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """One --key option per Config field; values are checked by the same code as YAML presets."""
    group = parser.add_argument_group("config overrides (any key of dlm.core.config.Config)")
    for key, tp in field_types().items():
        if tp is bool:
            group.add_argument(f"--{key}", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS)
        else:
            # the model family's choices are the registry's (Config itself does not import it)
            words = f"one of: {', '.join(FAMILIES)}" if key == "model" else describe_type(tp)
            group.add_argument(f"--{key}", metavar="VALUE", default=argparse.SUPPRESS, help=words)


def add_corpus_change_option(parser: argparse.ArgumentParser) -> None:
    """For the commands that read a run's corpus again (a resume, held-out text, training windows)."""
    parser.add_argument("--accept_corpus_change", action="store_true",
                        help="read the run's corpus even when it is not the text the run was trained on (its "
                             "SHA-256 differs from the one the run recorded): refused without it")


def add_sampler_option(parser) -> None:
    """--sampler, for every command that draws samples from a run (sample, infill, evaluate --matched):
    a masked run's chain; given for a family whose sampler does not read it, check_sample_options
    refuses it in one line."""
    parser.add_argument("--sampler", choices=SAMPLERS,
                        help="a masked run's chain: grid (default; MDLM's --steps steps), first_hitting (the chain's "
                             "own law exactly, one denoiser call per position unmasked; takes no --steps) or "
                             "confidence (the k most confident positions a step, MaskGIT/LLaDA: NOT the chain's law, "
                             "it favours likely words)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dlm", description="Diffusion-LM workbench on tiny_shakespeare.",
                                     allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", required=True)
    add_train_parsers(commands)
    add_cooldown_parser(commands)
    add_evaluate_parser(commands)
    add_calibrate_parser(commands)
    add_sample_parser(commands)
    add_stats_parser(commands)
    add_report_parser(commands)
    add_infill_parser(commands)
    add_control_commands(commands)
    return parser


def add_train_parsers(commands) -> None:
    """dlm train and dlm train-ar: the same options, the preset says the family."""
    for name, help_text in (("train", "train a run from a YAML preset"),
                            ("train-ar", "train the autoregressive baseline (model: ar) from a YAML preset")):
        train_parser = commands.add_parser(name, help=help_text, allow_abbrev=False)
        train_parser.add_argument("params", help="YAML preset, e.g. params/default.yaml or params/ar.yaml")
        train_parser.add_argument("--run_dir", required=True, help="folder for config, checkpoints and metrics")
        train_parser.add_argument("--resume", action="store_true", help="continue the run in --run_dir")
        train_parser.add_argument("--rebuild_metrics", action="store_true",
                                  help="with --resume: rebuild a damaged metrics.csv from the rows that parse "
                                       "(says how many were lost) instead of refusing to resume")
        train_parser.add_argument("--nproc", type=int, default=None, metavar="N",
                                  help="train with N processes on this machine (torchrun --standalone "
                                       "--nproc_per_node N, DistributedDataParallel; batch_size stays the global batch)")
        add_corpus_change_option(train_parser)
        add_config_options(train_parser)


def add_cooldown_parser(commands) -> None:
    cooldown_parser = commands.add_parser(
        "cooldown", allow_abbrev=False,
        help="cool a kept checkpoint of a wsd run (--lr_decay wsd) down into a new run folder: K more steps, the lr "
             "decaying linearly to 0 (a shorter budget from one long run)")
    cooldown_parser.add_argument("--from", dest="source", required=True, metavar="CHECKPOINT",
                                 help="a kept checkpoint of a wsd run's stable phase, RUN/checkpoints/epoch_NNNN.pt")
    cooldown_parser.add_argument("--run_dir", required=True, help="the new run folder (missing or empty)")
    cooldown_parser.add_argument("--cooldown_steps", type=int, required=True, metavar="K",
                                 help="steps trained from the checkpoint while the lr decays to 0")
    add_config_options(cooldown_parser)  # only what a run records and how it executes (dlm.runs.cooldown)


def add_evaluate_parser(commands) -> None:
    evaluate_parser = commands.add_parser(
        "evaluate", help="score samples against held-out text and an AR teacher, or (--nll) a run's likelihood bound",
        allow_abbrev=False)
    evaluate_parser.add_argument("--samples", help="a .jsonl written by dlm sample")
    evaluate_parser.add_argument("--teacher", help="an autoregressive run (dlm train-ar)")
    evaluate_parser.add_argument("--json", help="also write every number to this file")
    nll = evaluate_parser.add_argument_group("likelihood (--nll)")
    nll.add_argument("--nll", action="store_true",
                     help="the variational bound on -log p(w), nats per token, on held-out windows of --run_dir")
    nll.add_argument("--run_dir", help="the run to score, of a family with a likelihood bound (its last checkpoint, "
                                       "EMA weights)")
    nll.add_argument("--ar_run", help="an autoregressive run on the same vocabulary: its exact NLL on the same windows")
    nll.add_argument("--windows", type=int, default=256, help="held-out windows scored (default 256)")
    nll.add_argument("--draws", type=int, default=4, help="noise levels drawn per window for the family's bound (default 4)")
    nll.add_argument("--seed", type=int, default=0, help="which windows and noise (default 0)")
    nll.add_argument("--x0", choices=X0_CHOICES,
                     help="Gaussian chain: the reverse process scored: steps toward the denoiser's x0, its rounding softmax's "
                          "expected embedding, or the posterior mean of x_0 under it (default: the run's sample_x0, "
                          "what dlm sample draws from)")

    matched = evaluate_parser.add_argument_group(
        "matched entropy (--matched)", "samples of --run_dir drawn at the sampling temperature that gives "
        "held-out text's unigram entropy, scored by --teacher: perplexity compared at equal entropy")
    matched.add_argument("--matched", action="store_true", help="score --run_dir's samples at held-out entropy")
    matched.add_argument("--checkpoint", help="a checkpoint of --run_dir, or best or last (default: its last; --nll too)")
    matched.add_argument("--num_samples", type=int, default=64, help="samples drawn (default 64)")
    matched.add_argument("--steps", type=int, help="sampling steps (default: the run's sample_steps); with --nll: "
                         "the bound of the chain of that many steps (default: of all T)")
    matched.add_argument("--spacing", choices=SPACINGS,
                         help="Gaussian chain: which timesteps those steps visit (default: the run's sample_spacing)")
    matched.add_argument("--unk", action=argparse.BooleanOptionalAction,
                         help="a final token may be <unk>; --no-unk masks it (default: the run's decode_unk)")
    matched.add_argument("--entropy", type=float,
                         help="score at this unigram entropy (bits) instead of held-out text's: compares a sampler "
                              "whose argmax is above held-out entropy with one at its entropy")
    add_sampler_option(matched)
    add_corpus_change_option(evaluate_parser)


def add_calibrate_parser(commands) -> None:
    calibrate_parser = commands.add_parser(
        "calibrate", allow_abbrev=False,
        help="find the sampling temperature that puts a run's samples at held-out text's unigram entropy; "
             "the run samples at it by default from then on (RUN/calibration.json)")
    calibrate_parser.add_argument("--run_dir", required=True)
    calibrate_parser.add_argument("--checkpoint", help="a checkpoint file (default: RUN_DIR/checkpoints/last.pt)")
    calibrate_parser.add_argument("--num_samples", type=int, default=64,
                                  help="samples (and held-out windows) whose unigram entropy is matched")
    calibrate_parser.add_argument("--seed", type=int, default=0)
    calibrate_parser.add_argument("--tolerance", type=float, default=0.01,
                                  help="relative distance to held-out entropy that counts as matched")
    calibrate_parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                                  help="use the EMA weights when the checkpoint has them")
    calibrate_parser.add_argument("--device", default="auto")


def add_sample_parser(commands) -> None:
    sample_parser = commands.add_parser("sample", help="sample text from a trained run", allow_abbrev=False)
    sample_parser.add_argument("--run_dir", required=True)
    sample_parser.add_argument("--checkpoint", help="a checkpoint file, or 'best' (checkpoints/best.pt: the lowest "
                                                    "validation loss) or 'last' (default: checkpoints/last.pt)")
    sample_parser.add_argument("--num_samples", type=int, default=16)
    sample_parser.add_argument("--steps", type=int,
                               help="sampling steps (default: the run's sample_steps; a Gaussian chain's: <= T, placed "
                                    "by --spacing)")
    sample_parser.add_argument("--spacing", choices=SPACINGS,
                               help="Gaussian chain: which timesteps (default: the run's sample_spacing)")
    sample_parser.add_argument("--decoder", choices=["learned", "cosine"], default="learned",
                               help="Gaussian chain: the final rounding, learned or by cosine similarity to the table")
    sample_parser.add_argument("--clamp", action=argparse.BooleanOptionalAction,
                               help="Gaussian chain: Diffusion-LM's clamping trick (default: the run's clamp)")
    sample_parser.add_argument("--clamp_fraction", type=float,
                               help="Gaussian chain: clamp only during the last share of steps")
    sample_parser.add_argument("--eta", type=float, help="Gaussian chain: 1 ancestral, 0 deterministic DDIM")
    sample_parser.add_argument("--x0", choices=X0_CHOICES,
                               help="Gaussian chain: the x0 each step moves toward: the denoiser's, the expected embedding "
                                    "under its rounding softmax, or the posterior mean of x_0 under it (the "
                                    "expected one plus x_t's share of x_0's own noise; default: the run's "
                                    "sample_x0)")
    sample_parser.add_argument("--temperature", type=float,
                               help="0: argmax; >0: draw words from softmax/T (the Gaussian chain's final rounding, "
                                    "each step of a masked or uniform chain, each AR token)")
    sample_parser.add_argument("--unk", action=argparse.BooleanOptionalAction,
                               help="a final token may be <unk>; --no-unk masks it, so that a capped vocabulary's "
                                    "samples hold words only (default: the run's decode_unk)")
    add_sampler_option(sample_parser)
    sample_parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                               help="use the EMA weights when the checkpoint has them")
    sample_parser.add_argument("--seed", type=int, default=0)
    sample_parser.add_argument("--batch_size", type=int, default=64)
    sample_parser.add_argument("--record_every", type=int, default=0,
                               help="also write FILE.trajectory.json with decoded tokens every N steps")
    sample_parser.add_argument("--overwrite", action="store_true",
                               help="replace an existing FILE.jsonl (+ .txt, .trajectory.json): the set is replaced "
                                    "together once samples exist")
    sample_parser.add_argument("--device", default="auto")
    sample_parser.add_argument("--out", required=True, help="FILE.jsonl (a .txt is written beside it)")


def add_stats_parser(commands) -> None:
    stats_parser = commands.add_parser("stats", help="token-distribution stats of samples vs held-out text")
    stats_parser.add_argument("--samples", required=True, help="a .jsonl written by dlm sample")
    stats_parser.add_argument("--run_dir", required=True, help="the run whose corpus and vocabulary to compare with")
    stats_parser.add_argument("--json", help="also write the numbers to this file")
    add_corpus_change_option(stats_parser)


def add_report_parser(commands) -> None:
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


def add_infill_parser(commands) -> None:
    infill_parser = commands.add_parser(
        "infill", help="classifier-free control: fill a template's blanks, continue a prefix, or write a "
                       "speech of exactly N tokens", allow_abbrev=False)
    infill_parser.add_argument("--run_dir", required=True)
    what = infill_parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--template", help="fixed words and __ blanks (one token each), e.g. "
                                         "\"To be , or not to be : __ __ __ question\"; \\n is a line break")
    what.add_argument("--prefix", help="the first words, fixed; the rest of the window is generated")
    what.add_argument("--length", type=int, metavar="N", help="a whole speech of exactly N tokens "
                                                                "(between two blank lines)")
    infill_parser.add_argument("--num_samples", type=int, default=4)
    infill_parser.add_argument("--steps", type=int, help="sampling steps (default: the run's sample_steps)")
    add_sampler_option(infill_parser)
    infill_parser.add_argument("--mbr", type=int, default=1, metavar="K",
                               help="draw K candidates per sample and keep the MBR pick (the medoid)")
    infill_parser.add_argument("--seed", type=int, default=0)
    infill_parser.add_argument("--device", default="auto")
    infill_parser.add_argument("--out", help="also write FILE.jsonl (template, fixed positions, text)")


def add_control_commands(commands) -> None:
    """dlm train-classifier and dlm control-table (classifier-guided control)."""
    from dlm.runs.classifier import ATTRIBUTE_HELP, KINDS

    classifier_parser = commands.add_parser(
        "train-classifier", allow_abbrev=False,
        help="train an attribute classifier for guidance (latent: on a run's noised latents, a family that has them "
             "such as gaussian) or judging (judge: on clean token ids, a run of any family)")
    classifier_parser.add_argument("--run_dir", required=True, help="a trained run (--kind latent: of a family with latents)")
    classifier_parser.add_argument("--attribute", required=True, help=ATTRIBUTE_HELP)
    classifier_parser.add_argument("--kind", choices=KINDS, default="latent")
    classifier_parser.add_argument("--steps", type=int, default=300, help="training steps (batches)")
    classifier_parser.add_argument("--batch_size", type=int, default=64)
    classifier_parser.add_argument("--width", type=int, default=128)
    classifier_parser.add_argument("--depth", type=int, default=2)
    classifier_parser.add_argument("--seed", type=int, default=0)
    classifier_parser.add_argument("--out", help="checkpoint file (default: RUN_DIR/classifiers/KIND/ATTRIBUTE.pt)")
    add_corpus_change_option(classifier_parser)

    table_parser = commands.add_parser(
        "control-table", allow_abbrev=False,
        help="success (judge) and fluency (teacher perplexity) of unguided, guided and AR samples per attribute")
    table_parser.add_argument("--run_dir", required=True, help="the run to guide (a family with classifier guidance)")
    table_parser.add_argument("--ar_run", required=True, help="the AR run: the teacher and the AR baseline")
    table_parser.add_argument("--attribute", action="append", required=True, help=f"repeatable; {ATTRIBUTE_HELP}")
    table_parser.add_argument("--classifiers", help="folder with latent/ and judge/ checkpoints "
                                                    "(default: RUN_DIR/classifiers)")
    table_parser.add_argument("--strengths", default="0.05,0.1,0.2",
                              help="guidance strengths (Adagrad step sizes), comma-separated")
    table_parser.add_argument("--fluency", type=float, default=0.01,
                              help="lambda, the weight of log p(x_{t-1} | x_t) (0.01, the reference code's)")
    table_parser.add_argument("--inner_steps", type=int, default=3, help="Adagrad steps per sampling step")
    table_parser.add_argument("--num_samples", type=int, default=32)
    table_parser.add_argument("--steps", type=int, help="sampling steps (default: the run's sample_steps)")
    table_parser.add_argument("--ar_candidates", type=int, default=4, help="AR rejection sampling: candidates per sample")
    table_parser.add_argument("--seed", type=int, default=0)
    table_parser.add_argument("--out_dir", required=True, help="writes control.csv and control.md here")
    table_parser.add_argument("--device", default="auto")
    add_corpus_change_option(table_parser)


def run_train_classifier(args: argparse.Namespace) -> None:
    from dlm.runs.classifier import check_classifier_options, save_classifier, train_classifier
    from dlm.runs.rundir import RunDir

    check_classifier_options(args.steps, args.batch_size, args.width, args.depth)
    out = Path(args.out or RunDir(args.run_dir).classifier(args.kind, args.attribute))
    beside = out.with_suffix(".new.pt")  # where a new classifier goes when it is not better than the one at out
    check_destination(out, "--out", suffix=".pt")
    check_destination(beside, "--out (a new classifier not better than the one there is written beside it)")
    run = load_run(args.run_dir, accept_corpus_change=args.accept_corpus_change)
    result = train_classifier(run, args.attribute, args.kind, steps=args.steps, batch_size=args.batch_size,
                              width=args.width, depth=args.depth, seed=args.seed)
    numbers = ", ".join(f"{k} {v:.3g}" for k, v in result.metrics.items())
    new = result.metrics["heldout_balanced_accuracy"]
    old = previous_accuracy(out)
    if old is not None and new <= old:
        path = save_classifier(beside, result, run)
        kept = f"balanced accuracy {new:.3g} vs {old:.3g}" if old != float("inf") else "that file is not readable"
        print(f"{args.kind} classifier for '{args.attribute}' ({numbers}) -> {path}: not better on held-out windows "
              f"than the one kept at {out} ({kept}); move it there to use it anyway")
        return
    path = save_classifier(out, result, run)
    print(f"{args.kind} classifier for '{args.attribute}' ({numbers}) -> {path}")


def previous_accuracy(path: Path) -> float | None:
    """The held-out balanced accuracy of the classifier already at `path` (None: no file there);
    a file that does not read as one counts as the best there is, so it is never replaced."""
    from dlm.core.checkpoint import load_checkpoint

    if not path.exists():
        return None
    try:
        return float(load_checkpoint(path, require=("metrics",))["metrics"]["heldout_balanced_accuracy"])
    except (CheckpointError, KeyError, TypeError, ValueError):
        return float("inf")


def run_control_table(args: argparse.Namespace) -> None:
    from dlm.evaluation.control import ArBaseline, GuidanceSettings, control_table, markdown
    from dlm.runs.classifier import attribute, load_classifier
    from dlm.runs.guidance import check_guidance
    from dlm.runs.rundir import RunDir

    try:
        strengths = [float(s) for s in args.strengths.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--strengths must be numbers separated by commas, e.g. 0.05,0.1,0.2; got '{args.strengths}'.") from None
    if any(not s > 0 for s in strengths):  # also refuses nan
        raise UserError(f"--strengths must be positive (strength 0, unguided, is always a row); got '{args.strengths}'.")
    out_dir = check_destination(Path(args.out_dir) / "control.csv", "--out_dir").parent
    device = pick_device(args.device)
    run = load_run(args.run_dir, device=device, accept_corpus_change=args.accept_corpus_change)
    check_guidance(run)  # before it asks for classifiers that could not guide it
    for name in args.attribute:  # an unknown attribute fails before anything is loaded or drawn
        attribute(name, run.tokenizer)
    folder = RunDir(args.run_dir).classifiers if args.classifiers is None else Path(args.classifiers)
    classifiers = {name: tuple(load_classifier(RunDir(args.run_dir).classifier(kind, name, folder), run, kind, name)
                               for kind in ("latent", "judge")) for name in args.attribute}
    ar_run = load_run(args.ar_run, device=device, accept_corpus_change=args.accept_corpus_change)
    options = SampleOptions.from_config(run.config, num_samples=args.num_samples, steps=args.steps, seed=args.seed)
    table = control_table(run, classifiers, options, GuidanceSettings(strengths, args.fluency, args.inner_steps),
                          ArBaseline(ar_run, args.ar_candidates), device=device)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / "control.csv", table.to_csv(index=False).encode())
    atomic_write_bytes(out_dir / "control.md", markdown(table).encode())
    print(markdown(table), end="")
    print(f"{run.config.model} {run.checkpoint} (step {run.step}), teacher and AR {ar_run.checkpoint} (step {ar_run.step}) "
          f"-> {out_dir / 'control.csv'}, {out_dir / 'control.md'}")


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
    if "model" in overrides:
        overrides["model"] = current_model(overrides["model"])  # a family's former name, said once
    config = load_config(args.params, **overrides)
    if "model" in overrides and overrides["model"] != load_yaml(args.params).get("model", Config.model):
        config, dropped = families.without_other_families_keys(config, set(overrides))
        if dropped:
            print(f"{args.params} is a preset of another family: its {', '.join(dropped)} (read by no "
                  f"'{config.model}' run) are left out.", flush=True)
    result = train(config, args.run_dir, resume=args.resume, rebuild_metrics=args.rebuild_metrics,
                   accept_corpus_change=args.accept_corpus_change)
    if ranks_from_env().is_main:
        print(f"trained {result.step} steps ({result.epoch} epochs) in {result.wall_s:.1f}s -> {result.run_dir}")
        if config.calibrate_temperature:  # the run's own flag too (a resume takes this key from the command)
            from dlm.evaluation.calibration import calibrate_trained_run

            calibrate_trained_run(result.run_dir, pick_device(config.device))


def run_calibrate(args: argparse.Namespace) -> None:
    from dlm.evaluation.calibration import calibrate, describe, write_calibration
    from dlm.runs.rundir import RunDir

    if args.num_samples < 2:
        raise UserError(f"--num_samples must be at least 2 (an entropy of one sample says little), got {args.num_samples}.")
    if not 0 < args.tolerance < 0.5:
        raise UserError(f"--tolerance is a relative distance to held-out entropy in (0, 0.5), e.g. 0.01; "
                        f"got {args.tolerance}.")
    check_destination(RunDir(args.run_dir).calibration, "the calibration file", suffix=".json")
    device = pick_device(args.device)
    run = load_run(args.run_dir, args.checkpoint, use_ema=args.ema, device=device)
    record = calibrate(run, args.num_samples, args.seed, args.tolerance, device)
    command = ["dlm", "calibrate", "--run_dir", str(args.run_dir), "--num_samples", str(args.num_samples),
               "--seed", str(args.seed), "--tolerance", f"{args.tolerance:g}",
               *(["--checkpoint", str(args.checkpoint)] if args.checkpoint else []), *([] if args.ema else ["--no-ema"])]
    write_calibration(args.run_dir, record, " ".join(command))
    print(f"{describe(record)} -> {RunDir(args.run_dir).calibration}")


def run_cooldown(args: argparse.Namespace, extra: list[str]) -> None:
    from dlm.runs.cooldown import cooldown

    result = cooldown(args.source, args.run_dir, args.cooldown_steps, parse_overrides(extra, args))
    print(f"cooled down from {args.source}: trained to step {result.step} ({result.epoch} epochs) in "
          f"{result.wall_s:.1f}s -> {result.run_dir}")


def run_sample(args: argparse.Namespace) -> None:
    from tqdm.auto import tqdm

    check_sample_destination(args.out, args.overwrite)  # before sampling, so that a bad --out never costs the samples
    device = pick_device(args.device)
    run = load_run(args.run_dir, args.checkpoint, use_ema=args.ema, device=device)
    if not all(torch.isfinite(p).all() for p in run.model.parameters()):
        raise UserError(f"{run.checkpoint} holds nan or inf weights: the run diverged, so its samples would be "
                        f"empty. Train it again with a smaller lr (or sample an earlier checkpoint).")
    options = SampleOptions.from_config(
        run.config, num_samples=args.num_samples, steps=args.steps, spacing=args.spacing, decoder=args.decoder,
        clamp=args.clamp, clamp_fraction=args.clamp_fraction, eta=args.eta, x0=args.x0, temperature=args.temperature,
        unk=args.unk, seed=args.seed,
        batch_size=args.batch_size, record_every=args.record_every, sampler=args.sampler,
    )
    # what the user gave: None, or a default that means none (learned, 0), is not given; every family's
    # sampler reads num_samples, seed and batch_size
    check_sample_options(run.config.model, dict(
        steps=args.steps, spacing=args.spacing, clamp=args.clamp, clamp_fraction=args.clamp_fraction, eta=args.eta,
        x0=args.x0, temperature=args.temperature, unk=args.unk,
        decoder=None if args.decoder == "learned" else args.decoder, record_every=args.record_every or None,
        sampler=args.sampler))
    check_options(run.config, options)  # before the chain's cost is printed
    chain = run.family.chain(run.config)
    check_memory(options, run.config.seq_len, chain)
    if chain is not None:
        # block diffusion runs the whole chain once per block: the cost a user trades for order
        blocks, steps = chain.blocks, chain.steps(options)
        calls = chain.calls(steps)
        print(f"chain: {blocks} block{'s' if blocks > 1 else ''} x {steps} steps = "
              f"{'' if calls == steps else 'at most '}{blocks * calls} denoiser calls per batch of up to "
              f"{options.batch_size} samples", flush=True)
    writer = SampleWriter(args.out, run, options)
    try:
        with tqdm(total=options.num_samples, unit="sample", desc="sampling", disable=None) as bar:
            for batch in generate_batches(run, options, device):
                writer.add(batch)
                bar.update(len(batch.texts))
    except KeyboardInterrupt:
        kept = f"{writer.count} samples kept in {writer.files['jsonl']}" if writer.count else "no batch was finished"
        print(f"dlm sample: interrupted after {writer.count} of {options.num_samples} samples: {kept}.",
              file=sys.stderr)
        raise
    finally:
        writer.close()
    print(f"{writer.count} samples from {run.checkpoint} (step {run.step}) -> {writer.files['jsonl']}, "
          f"{writer.files['txt']}")


def run_stats(args: argparse.Namespace) -> None:
    from dlm.evaluation.evaluate import read_samples, sample_ids
    from dlm.evaluation.rundata import heldout_sequences
    from dlm.evaluation.tokens import ids_to_words, top_tokens

    if args.json:
        check_destination(args.json, "--json")  # before reading anything, as dlm evaluate does
    run = load_run(args.run_dir, accept_corpus_change=args.accept_corpus_change)
    records = read_samples(args.samples)
    # samples of another vocabulary (or written by hand, text only) are encoded again with the run's;
    # both sides are counted in words
    samples = ids_to_words(sample_ids(records, run.tokenizer), run.tokenizer)
    heldout = heldout_sequences(run, len(samples))
    report = {name: {**sample_stats(seqs), "top_tokens": top_tokens(seqs, 5)}
              for name, seqs in (("samples", samples), ("heldout", heldout))}
    for name, summary in report.items():
        top = ", ".join(f"{t!r} {share:.3f}" for t, share in summary["top_tokens"])
        print(f"{name:8s} tokens {summary['tokens']:6d} | types {summary['types']:5d} | punctuation "
              f"{summary['punctuation_share']:.3f} | entropy {summary['unigram_entropy']:.3f} bits | "
              f"top-10 share {summary['top10_share']:.3f} | {top}")
    if args.json:
        atomic_write_bytes(Path(args.json), json.dumps(report, indent=2).encode())


def run_evaluate(args: argparse.Namespace) -> None:
    import pandas as pd

    from dlm.evaluation.evaluate import evaluate_samples, read_samples

    if args.json:
        check_destination(args.json, "--json")  # before any work, for every kind of evaluation
    asked = [flag for flag, given in (("--nll", args.nll), ("--matched", args.matched)) if given]
    if len(asked) > 1 or (asked and args.samples):
        raise UserError(f"{' and '.join(asked + (['--samples'] if args.samples else []))} are separate evaluations: "
                        f"{asked[0]} scores --run_dir's {'held-out windows' if asked[0] == '--nll' else 'own samples'}"
                        f"{', not a samples file' if args.samples else ''}. Run one dlm evaluate per kind.")
    if args.sampler is not None and not args.matched:
        raise UserError("--sampler chooses the chain --matched draws --run_dir's samples with; "
                        f"{'--nll scores held-out windows' if args.nll else '--samples scores samples already drawn'} "
                        "and draws none: drop --sampler (dlm sample --sampler draws a samples file with it).")
    if args.nll:
        return run_nll(args)
    if args.matched:
        return run_matched(args)
    if args.samples is None or args.teacher is None:
        raise UserError("give --samples FILE.jsonl and --teacher AR_RUN to score samples, "
                         "or --nll --run_dir RUN for the likelihood bound.")
    result = evaluate_samples(read_samples(args.samples),
                              load_run(args.teacher, accept_corpus_change=args.accept_corpus_change))
    table = pd.DataFrame({"samples": result["samples"], "held-out": result["heldout"]})
    with pd.option_context("display.float_format", "{:.4g}".format, "display.width", 120):
        print(table.to_string())
    reasons = ", ".join(result["collapse_reasons"]) or "none"
    print(f"collapsed: {result['collapsed']} (signals: {reasons}); {result['num_samples']} samples")
    if args.json:
        atomic_write_bytes(Path(args.json), json.dumps(result, indent=2, default=str).encode())


def run_matched(args: argparse.Namespace) -> None:
    import pandas as pd

    from dlm.evaluation.matched import check_entropy, match_entropy

    if args.run_dir is None or args.teacher is None:
        raise UserError("--matched needs --run_dir RUN (the run to sample) and --teacher AR_RUN (the scorer).")
    check_entropy(args.entropy)  # before any run is loaded
    device = pick_device("auto")
    run = load_run(args.run_dir, args.checkpoint, device=device, accept_corpus_change=args.accept_corpus_change)
    check_sample_options(run.config.model, dict(steps=args.steps, spacing=args.spacing, x0=args.x0, unk=args.unk,
                                                sampler=args.sampler))
    teacher = load_run(args.teacher, device=device, accept_corpus_change=args.accept_corpus_change)
    options = SampleOptions.from_config(run.config, num_samples=args.num_samples, steps=args.steps,
                                        x0=args.x0, unk=args.unk, seed=args.seed, spacing=args.spacing,
                                        sampler=args.sampler)
    result = match_entropy(run, teacher, options, device=device, entropy=args.entropy)
    table = pd.DataFrame({"samples": result["samples"], "held-out": result["heldout"]})
    with pd.option_context("display.float_format", "{:.4g}".format, "display.width", 120):
        print(table.to_string())
    band = "within" if result["matched"] else "NOT within"
    print(f"temperature {result['temperature']:.4f}: entropy {result['samples']['unigram_entropy']:.3f} bits, "
          f"{band} 5% of {'held-out' if args.entropy is None else 'the asked'} {result['target_entropy']:.3f} "
          f"({run.checkpoint}, step {run.step}; "
          f"{result['num_samples']} samples{f', x0 {options.x0}' if 'x0' in run.family.SAMPLE_OPTIONS else ''}"
          f"{f', sampler {options.sampler}' if 'sampler' in run.family.SAMPLE_OPTIONS else ''}"
          f"{'' if options.unk else ', <unk> masked'})")
    print("ratios to held-out: " + " | ".join(f"{k} {v:.3g}" for k, v in result["ratios"].items()))
    print("targets met: " + " | ".join(f"{k} {'yes' if v else 'no'}" for k, v in result["targets"].items()))
    if args.json:
        if "sampler" in run.family.SAMPLE_OPTIONS:  # which chain drew them: the numbers differ by it
            result["sampler"] = options.sampler
        atomic_write_bytes(Path(args.json), json.dumps(result, indent=2, default=str).encode())


def run_nll(args: argparse.Namespace) -> None:
    from dlm.evaluation.likelihood import bound_chain, check_counts, check_has_bound, compare_with_ar

    if args.run_dir is None:
        raise UserError("--nll needs --run_dir RUN: the run whose likelihood bound to compute.")
    check_counts(args.windows, args.draws)  # before any run is loaded
    run = load_run(args.run_dir, args.checkpoint, accept_corpus_change=args.accept_corpus_change)
    check_has_bound(run)  # before its options: an AR run is told where its exact NLL goes
    check_sample_options(run.config.model, dict(x0=args.x0, spacing=args.spacing))
    # with --steps, the bound of the chain the sampler runs at that many steps
    chain = bound_chain(run, args.steps, args.spacing)
    spacing = args.spacing or run.config.sample_spacing
    ar = load_run(args.ar_run, accept_corpus_change=args.accept_corpus_change) if args.ar_run else None
    x0 = (args.x0 or run.config.sample_x0) if "x0" in run.family.SAMPLE_OPTIONS else None
    result = compare_with_ar(run, ar, args.windows, args.draws, args.seed, x0, chain)
    bound = result.bound
    scored = (f"every step of the {args.steps}-step {spacing} chain" if chain is not None
              else f"{bound.draws} timesteps each")
    print(f"NLL bound {bound.total:.4f} +- {bound.se:.4f} nats/token ({bound.windows} held-out windows of "
          f"{bound.tokens} tokens, {scored}{f'; x0 {x0}' if x0 else ''}; {run.checkpoint}, step {run.step})")
    print("  " + " | ".join(f"{name} {value:.4f}" for name, value in bound.terms.items()))
    numbers = {"nll_bound": bound.total, "nll_bound_se": bound.se, "terms": bound.terms, "windows": bound.windows,
               "draws": bound.draws, "x0": x0, "tokens_per_window": bound.tokens, "checkpoint": str(run.checkpoint),
               "chain": None if chain is None else vars(chain)}
    if result.ar_nll is not None:
        print(f"AR NLL    {result.ar_nll:.4f} nats/token (exact, the same windows; {ar.checkpoint}); "
              f"bound / AR = {result.ratio:.3f}")
        numbers.update(ar_nll=result.ar_nll, ratio=result.ratio)
    if args.json:
        atomic_write_bytes(Path(args.json), json.dumps(numbers, indent=2).encode())


def run_infill(args: argparse.Namespace) -> None:
    from dlm.runs.control import infill, make_control, write_control

    if args.out:
        check_destination(args.out, "--out", suffix=".jsonl")
    device = pick_device(args.device)
    run = load_run(args.run_dir, device=device)
    control = make_control(run, args.template, args.prefix, args.length)
    check_sample_options(run.config.model, dict(steps=args.steps, sampler=args.sampler))
    options = SampleOptions.from_config(run.config, num_samples=args.num_samples, steps=args.steps, seed=args.seed,
                                        sampler=args.sampler)
    result = infill(run, control, options, mbr=args.mbr, device=device)
    for text in result.texts:
        print(text.replace("\n", " / "))
    if args.out:
        print(f"{len(result.texts)} samples -> {write_control(result, run, args.out)}")


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
        try:
            parameters.setdefault(notebook, {})[key] = yaml.safe_load(value)
        except yaml.YAMLError as error:
            problem = str(error).splitlines()[0]
            raise ReportError(f"--param '{item}': the value '{value}' is not YAML ({problem}); if it is text, "
                              f"quote it: --param '{name}=\"{value}\"'.") from None
    return parameters


def run_report(args: argparse.Namespace) -> int:
    from dlm.workbench.workbook import ChainFailed, ReportError, build_report, report_size

    logging.getLogger("papermill").setLevel(logging.WARNING)
    check_run_folder(args.reports_dir, "--reports_dir")  # a file, read-only, or a folder that cannot exist
    try:
        report_dir = build_report(args.params, args.name, args.reports_dir, show_code=args.show_code,
                                  overwrite=args.overwrite, parameters=notebook_parameters(args.param),
                                  from_run=args.from_run)
    except ReportError as error:  # what the user can fix exits 2, as every command's; a failed notebook 1
        print(f"dlm report: error: {error}", file=sys.stderr)
        return 1 if isinstance(error, ChainFailed) else 2
    size = report_size(report_dir) / 1e6
    print(f"report -> {report_dir} ({size:.1f} MB); index: {Path(args.reports_dir) / 'index.html'}")
    return 0


def run_command(parser: argparse.ArgumentParser, args: argparse.Namespace, extra: list[str],
                argv: list[str] | None) -> int | None:
    if args.command in ("train", "train-ar") and args.nproc is not None:
        # a bad override or batch size fails here, once, not in every process
        config = load_config(args.params, **parse_overrides(extra, args))
        if not args.resume:
            check_global_batch(config.batch_size, args.nproc)
        return launch_torchrun(args.nproc, sys.argv[1:] if argv is None else list(argv))
    if args.command in ("train", "train-ar"):
        return run_train(args, extra)
    if args.command == "cooldown":
        return run_cooldown(args, extra)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    commands = {"infill": run_infill, "sample": run_sample, "calibrate": run_calibrate, "stats": run_stats,
                "evaluate": run_evaluate, "report": run_report, "train-classifier": run_train_classifier,
                "control-table": run_control_table}
    return commands[args.command](args)


def handled(name: str, work: Callable[[], int | None]) -> int:
    """Run `work` for the command `name` (dlm CMD, or a script that shares the CLI's checks, such as
    benchmarks/scaling.py) and say how it ended: what the user can fix is one line `NAME: error: ...`
    and status 2, Ctrl-C `NAME: interrupted` and 130, anything else a bug: its traceback and 1."""
    try:
        return work() or 0
    except USER_ERRORS as error:
        print(f"{name}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stopped:  # Ctrl-C: train has logged where the run stands and how to resume
        print(f"{name}: {str(stopped) or 'interrupted'}", file=sys.stderr)  # or the interrupt says what it kept
        return 130
    except Exception as error:
        if is_disk_full(error):  # a write no code path names (DiskFullError where one does)
            where = f" writing '{error.filename}'" if error.filename else ""
            print(f"{name}: error: the disk is full ({error.strerror}{where}): free space on it (df -h shows what "
                  f"is left) and run the command again.", file=sys.stderr)
            return 2
        traceback.print_exc()
        print(f"{name}: internal error: {REPORT_A_BUG}.", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    return handled(f"dlm {args.command}", lambda: run_command(parser, args, extra, argv))
