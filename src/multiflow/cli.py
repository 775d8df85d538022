"""The `multiflow` command: parse and validate arguments, then call the library."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from multiflow._version import __version__
from multiflow.calibration.text_data import DEFAULT_SEQ_LEN
from multiflow.errors import MultiflowError
from multiflow.models.loading import DTYPES
from multiflow.storage.outputs import output_path

log = logging.getLogger("multiflow")


def _target(text: str) -> float:
    from multiflow.distribution.distribute import check_target

    try:
        return check_target(text)
    except MultiflowError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: give at least 1")
    return value


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "--model_path", "--model-path", dest="model", metavar="PATH",
                   help="checkpoint folder (config.json + safetensors). Layouts: llava-hf hub (transformers 4.x), "
                        "transformers 5.x save_pretrained, in-memory state-dict names, original LLaVA repository. "
                        "Default: the bundled demo model (a small LLaVA trained on handwritten digits)")
    p.add_argument("--vision-tower", "--vision_tower", dest="vision_tower", metavar="PATH",
                   help="local CLIP folder for an original-layout LLaVA checkpoint that lacks the vision tower "
                        "weights (its config names them in mm_vision_tower)")
    p.add_argument("--rules", metavar="FILE",
                   help="modality rules file (YAML or JSON) replacing the preset of the model's family; "
                        "needed for architectures multiflow does not know (see README, 'Modality rules')")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow pickled .bin/.pt weights (loaded with torch.load(weights_only=True)); "
                        "refused by default because pickles can run code")


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, like every other multiflow error."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _calibration_args(c: argparse.ArgumentParser) -> None:
    c.add_argument("--data", metavar="PATH",
                   help="calibration data: a JSON/JSONL file ({image, question, answer} records or LLaVA "
                        "'conversations'), a datasets save_to_disk folder, or parquet files with an image column "
                        "and question/answer (or questions/answers) columns. Default: the demo model's calibration split "
                        "for the demo model, else the bundled photographs. A plain language model (llama, qwen2, "
                        "gemma...) needs text: a .txt file or folder of them, JSONL {\"text\": ...} records, or a "
                        "datasets folder / parquet with a text column")
    c.add_argument("--nsamples", type=int, default=128,
                   help="number of image-question samples, or of text windows for a plain language model (default 128)")
    c.add_argument("--seed", type=int, default=0, help="which samples, in which order (default 0)")
    c.add_argument("--seq-len", "--seq_len", dest="seq_len", type=int, default=DEFAULT_SEQ_LEN, metavar="N",
                   help=f"plain language model: tokens per calibration window (default {DEFAULT_SEQ_LEN}; "
                        "SparseGPT and Wanda use 2048 on LLaMA)")
    c.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=1,
                   help="samples per forward pass (default 1); results equal up to float rounding")
    c.add_argument("--dtype", choices=list(DTYPES), default="float32",
                   help="dtype to run the model in (default float32)")
    c.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (cuda when available; default cpu). "
                   "Block by block, the GPU holds one block's weights at a time")
    c.add_argument("--include-answers", action="store_true",
                   help="append the answer to each prompt (default: the prompt ends at 'ASSISTANT:', as the seed)")
    c.add_argument("--split-token-types", action="store_true",
                   help="also record language-model statistics separately over image-token and text-token positions")
    c.add_argument("--trust-remote-code", action="store_true",
                   help="allow the checkpoint's own Python code to run when loading (off by default)")
    c.add_argument("--whole-model", action="store_true",
                   help="load every weight at once (default: block by block, one encoder/decoder layer's weights "
                        "in memory at a time, the rest left on disk; needs safetensors). Faster for small models")
    c.add_argument("--samples-per-pass", type=int, default=None, metavar="N",
                   help="block by block: samples whose activations are kept between blocks at once (default 64, "
                        "and all of them with --sequential, which needs one pass); more samples take another "
                        "pass over the weights")
    c.add_argument("--device-map", choices=["auto"], default=None,
                   help="with --whole-model: spread the model over every GPU with accelerate (models too large "
                        "for one); without it, --device holds one block at a time")


def _prune_args(p: argparse.ArgumentParser) -> None:
    from multiflow.options import add_arguments
    from multiflow.pruning.config import PruningChoices

    add_arguments(p, PruningChoices, ("method", "allocation", "group", "structure", "dead_layers",
                                      "max_layer_sparsity", "prune_only"))
    p.add_argument("--output", metavar="DIR", required=True,
                   help="folder for the pruned checkpoint: new, empty, or a previous multiflow output (with "
                        "--overwrite); never the model folder, a folder inside it or one holding it")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --output when it is a previous multiflow output (it holds multiflow_report.json); "
                        "any other non-empty folder is never replaced")
    p.add_argument("--quiet", action="store_true", help="print only the output path (no report, no progress bars)")
    _deterministic_arg(p)


def _deterministic_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--deterministic-report", action="store_true",
                   help="leave out what differs between identical runs (seconds, peak memory: 'timings' and "
                        "calibration.peak_device_memory_gib of multiflow_report.json, 'seconds' and "
                        "'peak_device_memory_gib' of the statistics metadata): same inputs and options, same bytes")


def build_parser() -> argparse.ArgumentParser:
    from multiflow.distribution.choices import DistributionChoices
    from multiflow.evaluation.retrieval import DEFAULT_CLASS_TEMPLATE
    from multiflow.options import add_arguments
    from multiflow.pruning.config import PruneConfig

    parser = _Parser(
        prog="multiflow",
        description="MULTIFLOW modality-aware pruning for vision-language models (LLaVA-1.5 first).",
    )
    parser.add_argument("--version", action="version", version=f"multiflow {__version__}")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="logging level for messages on stderr (default INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    d = sub.add_parser(
        "distribute",
        help="Step 1: per-layer sparsity each modality can afford (weights only, no data, no GPU)",
        description="Step 1 of MULTIFLOW (paper Eq. 7): for each modality, the k-th smallest |W| over all its "
                    "layers (k = floor(N * s)) is the threshold; each layer's sparsity is the share of its "
                    "weights at or below it. Reads the checkpoint tensor by tensor; memory does not grow with "
                    "model size. Writes sparsity_distribution_<s>.json (+ .png) per target.",
    )
    _model_args(d)
    d.add_argument("--target-sparsity", "--target_sparsity", dest="targets", type=_target, nargs="+",
                   required=True, metavar="S",
                   help="target sparsity in [0, 1); several values (e.g. 0.3 0.5 0.7) share one read of the weights")
    d.add_argument("--output", metavar="PATH", default=".",
                   help="folder for sparsity_distribution_<s>.json files (default: current folder), "
                        "or a .json file name when one target is given")
    d.add_argument("--overwrite", action="store_true",
                   help="replace existing output files (.json and .png); without it an existing one is an error")
    d.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True,
                   help="write a PNG chart next to each JSON (default on; --no-plot to skip)")
    d.add_argument("--all-layers", action="store_true", help="list every layer in the report, not the first and last 5")
    add_arguments(d, DistributionChoices, ("max_layer_sparsity", "prune_only"))
    d.add_argument("--quiet", action="store_true", help="print only the output paths (no report, no progress bars)")

    c = sub.add_parser(
        "calibrate",
        help="Step 2: activation statistics of every prunable layer from calibration image-text pairs",
        description="Step 2 of MULTIFLOW: run the dense model over calibration image-text pairs and record, per "
                    "prunable layer and input feature j, the mean of x_j^2 over all non-padding tokens "
                    "(activations are never stored). Writes one stats.safetensors that Step 3 reuses for any "
                    "sparsity and method.",
    )
    _model_args(c)
    _calibration_args(c)
    c.add_argument("--output", metavar="FILE", default="stats.safetensors",
                   help="statistics file to write (default stats.safetensors); never inside the model folder")
    c.add_argument("--overwrite", action="store_true",
                   help="replace an existing --output file; without it an existing one is an error")
    c.add_argument("--quiet", action="store_true", help="print only the output path (no report, no progress bar)")
    _deterministic_arg(c)

    p = sub.add_parser(
        "prune",
        help="Step 3: prune with a distribution and statistics; write a checkpoint that loads with from_pretrained",
        description="Step 3 of MULTIFLOW (paper Eq. 8): per layer, prune the k lowest scores (k from the "
                    "allocation; ties with the k-th pruned too) and write a copy of the checkpoint with those "
                    "weights zeroed: same files, keys, dtype and sharding, plus multiflow_report.json.",
    )
    _model_args(p)
    _prune_args(p)
    p.add_argument("--distribution", metavar="FILE",
                   help="Step 1's sparsity_distribution_<s>.json (allocation modality); computed here when omitted")
    p.add_argument("--stats", metavar="FILE", help="Step 2's stats.safetensors (needed by --method multiflow and wanda)")
    p.add_argument("--target-sparsity", "--target_sparsity", dest="target", type=_target, metavar="S",
                   help="target sparsity in [0, 1) (taken from --distribution when given)")

    r = sub.add_parser(
        "run",
        help="Steps 1-3 end to end: distribute, calibrate, prune; one output folder",
        description="Run MULTIFLOW end to end: Step 1 (distribution), Step 2 (calibration statistics, when the "
                    "method needs them) and Step 3 (prune and save). Accepts the options of distribute, "
                    "calibrate and prune. Without --method, run uses the configuration measured best on real "
                    "pretrained weights (README, 'Which configuration should I use'): --method sparsegpt "
                    "--allocation uniform --group row (SparseGPT's mask and OBS update of the kept weights, every "
                    "layer and every output row at the target; block by block, each block calibrated on the pruned "
                    "blocks before it). With "
                    "--method, --allocation, --group and --update default as the paper (modality, layer, none): "
                    "--method multiflow alone is the paper's exact method.",
    )
    _model_args(r)
    _prune_args(r)
    _calibration_args(r)
    r.add_argument("--target-sparsity", "--target_sparsity", dest="target", type=_target, metavar="S",
                   required=False, help="target sparsity in [0, 1) (required unless --structure N:M)")
    r.add_argument("--sequential", action="store_true",
                   help="calibrate each block on the outputs of the already-pruned blocks before it (as Wanda and "
                        "SparseGPT do; each block runs twice). Default: one pass over the dense model, as the paper")
    add_arguments(r, PruneConfig, ("update",))
    r.set_defaults(method=None, allocation=None, group=None, update=None)  # run_choices fills them (description)
    r.add_argument("--blocksize", type=_at_least_one, default=None, metavar="N",
                   help="--update obs and --method sparsegpt: columns per block of the update (default 128)")
    r.add_argument("--percdamp", type=float, default=None, metavar="F",
                   help="--update obs and --method sparsegpt: Hessian dampening, F x its mean diagonal (default 0.01)")

    e = sub.add_parser(
        "eval",
        help="what pruning cost: VQA exact match and ROUGE-L, and KL / top-1 agreement against the dense model",
        description="Generate answers (greedy) for image-question pairs and score them against the reference "
                    "answers: exact match after normalising case and punctuation (reported as 'accuracy') and "
                    "ROUGE-L; per question kind when the data names kinds. With --reference (the dense model), "
                    "also the mean token-level KL(dense || pruned) and top-1 agreement on the reference answers "
                    "(teacher forcing). Same data formats as calibrate. A plain language model (llama, qwen2, "
                    "gemma...) gets perplexity instead: exp of the mean next-token NLL over non-overlapping "
                    "windows of --seq-len tokens of the --data text, and with --reference KL and top-1 agreement. "
                    "A retrieval model (CLIP, SigLIP, BLIP retrieval, dual encoders) gets image-to-text and "
                    "text-to-image recall@1 and @5 on {image, caption[, label]} records, zero-shot accuracy when "
                    "they carry labels (--class-template), and with --reference its agreement with the dense model.",
    )
    e.add_argument("--model", "--model_path", dest="model", metavar="PATH",
                   help="model folder to evaluate (default: the bundled demo model)")
    e.add_argument("--reference", metavar="PATH", help="dense model folder to compare against (KL, top-1 agreement)")
    e.add_argument("--rules", metavar="FILE",
                   help="the rules file the model was pruned with (renames, image token, prompt), for "
                        "--model and --reference alike; needed for architectures multiflow does not know")
    e.add_argument("--data", metavar="PATH", help="evaluation data (JSON/JSONL, datasets folder, parquet; text "
                   "for a plain language model, as for calibrate); "
                   "default: the demo model's evaluation split, or the bundled photographs")
    e.add_argument("--nsamples", type=int, default=None,
                   help="evaluate at most this many samples, or text windows (default: all)")
    e.add_argument("--seed", type=int, default=0, help="which samples, in which order, with --nsamples (default 0)")
    e.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=8,
                   help="samples per generation batch (default 8)")
    e.add_argument("--max-new-tokens", type=_at_least_one, default=16, metavar="N",
                   help="longest generated answer in tokens, at least 1 (default 16)")
    e.add_argument("--seq-len", "--seq_len", dest="seq_len", type=int, default=DEFAULT_SEQ_LEN, metavar="N",
                   help=f"plain language model: perplexity over non-overlapping windows of N tokens "
                        f"(default {DEFAULT_SEQ_LEN}); --nsamples then counts windows")
    e.add_argument("--class-template", dest="class_templates", action="append", metavar="TEXT",
                   help="retrieval model (CLIP, SigLIP, BLIP retrieval): zero-shot class prompt with {label} for the "
                        "records' labels, e.g. 'a photo of the digit {label}'; repeat to average several "
                        f"(default {DEFAULT_CLASS_TEMPLATE!r})")
    e.add_argument("--dtype", choices=list(DTYPES), default="float32",
                   help="dtype to run the models in (default float32)")
    e.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    e.add_argument("--trust-remote-code", action="store_true", help="allow the checkpoint's own code (off by default)")
    e.add_argument("--output", metavar="FILE", help="write the results (overall, per kind, per item) as JSON")
    e.add_argument("--overwrite", action="store_true",
                   help="replace an existing --output file; without it an existing one is an error")
    e.add_argument("--quiet", action="store_true", help="print only the accuracy (no table, no progress bar)")

    g = sub.add_parser(
        "convert-gguf",
        help="convert a GGUF file (llama.cpp) into a safetensors checkpoint folder that every command reads",
        description="Dequantize a GGUF file through transformers (needs the gguf package: pip install gguf) and "
                    "write config.json, model.safetensors, the tokenizer and multiflow_report.json into --output. "
                    "Then pass --model DIR to any command. The whole model is in memory once.",
    )
    g.add_argument("gguf", metavar="FILE", help="the .gguf file")
    g.add_argument("--output", metavar="DIR", required=True, help="folder to write (new or empty)")
    g.add_argument("--dtype", choices=list(DTYPES), default="float32",
                   help="dtype of the written weights (default float32: every dequantized value exactly)")
    g.add_argument("--overwrite", action="store_true", help="replace a previous multiflow output folder")
    g.add_argument("--quiet", action="store_true", help="print only the output path")

    m = sub.add_parser(
        "modalities",
        help="print which layers belong to which modality, and what is skipped and why (reads headers only)",
        description="Show the modality grouping of a checkpoint: layers and parameters per modality, skipped "
                    "tensors with the reason, and the rules used. Reads only the safetensors headers.",
    )
    _model_args(m)
    return parser


def _resolve_model(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    from multiflow.demo import demo_label, ensure_demo_model

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "multiflow"
    folder = ensure_demo_model(cache)
    log.warning("no --model given: using the %s, at %s", demo_label(folder), folder)
    return folder


def _calibration_data(data: str | None, model: Path) -> Path | None:
    """--data, else the demo model's calibration split for the demo model, else None (the bundled photos)."""
    from multiflow.demo import demo_split, is_demo

    if data:
        return Path(data)
    return demo_split("calibration") if is_demo(model) else None


def _target_name(s: float) -> str:
    """The target as written in file names: %g, or every digit when %g would round it (0.5000001)."""
    from multiflow.distribution.distribute import target_name

    return target_name(s)


def _output_paths(output: str, targets: list[float]) -> list[tuple[Path, Path]]:
    out = output_path(output)
    if out.suffix.lower() == ".json" and not out.is_dir():
        if len(targets) > 1:
            raise MultiflowError(f"--output {out} names one file but {len(targets)} targets were given; give a folder")
        return [(out, out.with_suffix(".png"))]
    if out.exists() and not out.is_dir():
        raise MultiflowError(f"--output {out} is a file; give a folder, or a .json file name for one target")
    if len(set(targets)) < len(targets):
        twice = next(s for s in targets if targets.count(s) > 1)
        raise MultiflowError(f"--target-sparsity {twice:g} is given twice; give each target once")
    names = [f"sparsity_distribution_{_target_name(s)}" for s in targets]
    return [(out / f"{n}.json", out / f"{n}.png") for n in names]


def cmd_distribute(args: argparse.Namespace) -> int:
    from multiflow.distribution.choices import DistributionChoices
    from multiflow.distribution.distribute import distribute
    from multiflow.models import inventory as layers
    from multiflow.reporting.console import render
    from multiflow.reporting.plots import plot_distribution
    from multiflow.storage.outputs import check_file_output, files_together

    paths = _output_paths(args.output, args.targets)
    written = [p for pair in paths for p in (pair if args.plot else pair[:1])]
    model = _resolve_model(args.model)
    inv = layers.from_checkpoint(model, args.rules, args.vision_tower, args.allow_pickle)
    for path in written:
        check_file_output(path, {"the input model folder": model, "the --vision-tower folder": args.vision_tower,
                                 "the --rules file": args.rules}, args.overwrite)
    for note in inv.notes:
        log.warning(note)
    choices = DistributionChoices(max_layer_sparsity=args.max_layer_sparsity, prune_only=args.prune_only)
    dists = distribute(inv, args.targets, progress=not args.quiet, choices=choices)
    with files_together(written, args.overwrite) as temps:  # every JSON with its chart, or nothing
        staged = iter(temps)
        for dist in dists:
            dist.save(next(staged))
            if args.plot:
                plot_distribution(dist, next(staged))
    for dist, (json_path, png_path) in zip(dists, paths):
        if not args.quiet:
            print(render(dist, all_layers=args.all_layers))
        print(json_path)
        if args.plot:
            print(png_path)
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from multiflow.calibration.calibrate import CalibrationConfig, calibrate
    from multiflow.reporting.console import render_stats

    output = output_path(args.output)
    model = _resolve_model(args.model)
    config = CalibrationConfig(
        model=model, output=output, data=_calibration_data(args.data, model),
        nsamples=args.nsamples, seed=args.seed, batch_size=args.batch_size, dtype=args.dtype, device=args.device,
        include_answers=args.include_answers, split_token_types=args.split_token_types,
        rules=Path(args.rules) if args.rules else None,
        vision_tower=Path(args.vision_tower) if args.vision_tower else None,
        allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code, whole_model=args.whole_model,
        samples_per_pass=args.samples_per_pass, device_map=args.device_map, overwrite=args.overwrite,
        seq_len=args.seq_len, deterministic_report=args.deterministic_report,
    )
    stats, meta = calibrate(config, progress=not args.quiet)
    if not args.quiet:
        print(render_stats(stats, meta))
    print(output)
    return 0


def _prune_config(args: argparse.Namespace, model: Path, stats: Path | None, distribution: Path | None):
    from multiflow.pruning.config import PruneConfig, Structure

    return PruneConfig(
        model=model, output=output_path(args.output), target_sparsity=args.target, distribution=distribution,
        stats=stats, method=args.method, allocation=args.allocation, group=args.group,
        structure=Structure.parse(args.structure), dead_layers=args.dead_layers,
        max_layer_sparsity=args.max_layer_sparsity, prune_only=args.prune_only,
        rules=Path(args.rules) if args.rules else None, overwrite=args.overwrite,
        deterministic_report=args.deterministic_report,
    )


# commands whose --model may hold pickled weights (with --allow-pickle); the others read safetensors only
_PICKLE_COMMANDS = ("distribute", "modalities", "calibrate")


def _refuse_allow_pickle(args: argparse.Namespace) -> None:
    if args.allow_pickle:
        raise MultiflowError(f"--allow-pickle: multiflow {args.command} does not support it (it writes safetensors "
                             "copies of safetensors checkpoints); drop it and convert pickled weights to safetensors "
                             "first (transformers: save_pretrained(..., safe_serialization=True))")


def cmd_prune(args: argparse.Namespace) -> int:
    from multiflow.pruning.prune import prune
    from multiflow.reporting.console import render_prune

    if args.vision_tower:
        raise MultiflowError("prune writes the weights of the --model folder; a separate --vision-tower folder is "
                             "not part of it and is not pruned: drop --vision-tower")
    _refuse_allow_pickle(args)

    config = _prune_config(args, _resolve_model(args.model), Path(args.stats) if args.stats else None,
                           Path(args.distribution) if args.distribution else None)
    report = prune(config, progress=not args.quiet)
    if not args.quiet:
        print(render_prune(report))
    print(config.output)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from multiflow import api
    from multiflow.pruning.config import Structure, run_choices
    from multiflow.pruning.methods import METHODS
    from multiflow.reporting.console import render_prune

    Structure.parse(args.structure)  # validate before the long calibration pass
    _refuse_allow_pickle(args)
    if args.target is None and args.structure == "unstructured":
        raise MultiflowError("give --target-sparsity (or --structure N:M)")
    output_path(args.output)  # checked in full by api.run, before the calibration pass
    choices = run_choices(args.method, args.allocation, args.group, args.update)
    obs = {k: v for k, v in (("blocksize", args.blocksize), ("percdamp", args.percdamp)) if v is not None}
    if obs and not METHODS[choices["method"]].reconstructs and choices["update"] != "obs":
        raise MultiflowError(f"--{next(iter(obs))} sets the OBS weight update: add --update obs (or use --method "
                             "sparsegpt), or drop it")
    model = _resolve_model(args.model)
    report = api.run(
        model, args.output, args.target, data=_calibration_data(args.data, model), nsamples=args.nsamples, seed=args.seed,
        batch_size=args.batch_size, dtype=args.dtype, device=args.device, include_answers=args.include_answers,
        split_token_types=args.split_token_types, method=choices["method"], allocation=choices["allocation"],
        group=choices["group"],
        structure=args.structure, dead_layers=args.dead_layers, max_layer_sparsity=args.max_layer_sparsity,
        prune_only=args.prune_only, rules=args.rules, overwrite=args.overwrite,
        trust_remote_code=args.trust_remote_code, vision_tower=args.vision_tower, whole_model=args.whole_model,
        samples_per_pass=args.samples_per_pass, device_map=args.device_map, sequential=args.sequential,
        seq_len=args.seq_len, progress=not args.quiet, update=choices["update"], **obs,
        deterministic_report=args.deterministic_report,
    )
    if not args.quiet:
        print(render_prune(report))
    print(args.output)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from multiflow import api
    from multiflow.reporting.console import render_eval
    from multiflow.storage.outputs import check_file_output, write_atomic

    if args.nsamples is not None and args.nsamples < 1:
        raise MultiflowError(f"--nsamples {args.nsamples}: give at least 1")
    if args.batch_size < 1:
        raise MultiflowError(f"--batch-size {args.batch_size}: give at least 1")
    model = _resolve_model(args.model)
    output = output_path(args.output) if args.output is not None else None
    if output is not None:
        check_file_output(output, {"the --model folder": model, "the --reference folder": args.reference,
                                   "the --data input": args.data, "the --rules file": args.rules}, args.overwrite)
    results = api.evaluate(
        model, args.data if args.data else _default_eval_data(args.model, model), reference=args.reference,
        nsamples=args.nsamples, seed=args.seed, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
        dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code, seq_len=args.seq_len,
        rules=args.rules, class_templates=args.class_templates, progress=not args.quiet)
    if output is not None:
        write_atomic(output, json.dumps(results, indent=2) + "\n", overwrite=args.overwrite)
    if "perplexity" in results:  # a plain language model
        from multiflow.reporting.console import render_perplexity

        print(f"{results['perplexity']:.4f}" if args.quiet else render_perplexity(results))
        return 0
    if results.get("task") == "retrieval":
        from multiflow.reporting.console import render_retrieval

        print(f"{results['text_to_image']['recall@1']:.4f}" if args.quiet else render_retrieval(results))
        return 0
    print(f"{results['accuracy']:.4f}" if args.quiet else render_eval(results))
    return 0


def cmd_convert_gguf(args: argparse.Namespace) -> int:
    from multiflow.models.gguf import convert_gguf

    summary = convert_gguf(args.gguf, output_path(args.output), args.dtype, args.overwrite)
    if not args.quiet:
        print(f"{summary['model']} -> {summary['output']}: {', '.join(summary['architectures'] or ['?'])}, "
              f"{summary['parameters']:,} parameters in {summary['dtype']}"
              f"{', tied embeddings' if summary['tie_word_embeddings'] else ''}")
    print(summary["output"])
    return 0


def _default_eval_data(model_arg: str | None, model: Path) -> Path | None:
    """The demo model's evaluation split for the demo model (`model_arg`: --model as typed, None for the default)
    or a copy pruned from it; else None (the bundled photos)."""
    import json

    from multiflow.demo import demo_split, is_demo

    try:  # a pruned copy names its source model in its report; an unreadable report names none
        source = json.loads((model / "multiflow_report.json").read_text(encoding="utf-8")).get("model")
    except (OSError, ValueError, AttributeError):
        source = None
    if not isinstance(source, str):
        source = None
    if model_arg is None or is_demo(model) or (source and is_demo(Path(source))):
        return demo_split("evaluation")
    return None


def cmd_modalities(args: argparse.Namespace) -> int:
    from multiflow.models import inventory as layers
    from multiflow.reporting.console import render_inventory

    inv = layers.from_checkpoint(_resolve_model(args.model), args.rules, args.vision_tower, args.allow_pickle)
    print(render_inventory(inv), end="")
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that every cleanup path (`except BaseException`,
    `finally`, context managers) runs, as for Ctrl-C."""


def _on_sigterm(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not interrupt the cleanup
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = "WARNING" if getattr(args, "quiet", False) and args.log_level == "INFO" else args.log_level
    logging.basicConfig(level=level, format="multiflow: %(levelname)s: %(message)s")
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main else None
    try:
        commands = {"distribute": cmd_distribute, "calibrate": cmd_calibrate, "prune": cmd_prune, "run": cmd_run,
                    "eval": cmd_eval, "modalities": cmd_modalities, "convert-gguf": cmd_convert_gguf}
        return commands[args.command](args)
    except MultiflowError as exc:
        from multiflow.storage.checkpoint import PickledWeights

        if isinstance(exc, PickledWeights) and args.command not in _PICKLE_COMMANDS:
            exc = exc.without_flag(args.command)
        one_line = " ".join(str(exc).split())  # messages quoting a library's multi-line text stay one line
        print(f"multiflow: error: {one_line}", file=sys.stderr)
        return 2
    except Terminated:
        print("multiflow: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("multiflow: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # the file system refused (permissions, space, a vanished file): one line
        log.debug("traceback", exc_info=True)
        print(f"multiflow: error: {exc.filename or 'a file'}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # not foreseen: still one line; the traceback with --log-level DEBUG
        log.debug("traceback", exc_info=True)
        print(f"multiflow: error: unexpected {type(exc).__name__}: {' '.join(str(exc).split())[:500]} (rerun "
              "with --log-level DEBUG for the traceback; please report it if the input looks valid)", file=sys.stderr)
        return 1
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


if __name__ == "__main__":
    sys.exit(main())
