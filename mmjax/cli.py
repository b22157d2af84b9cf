"""`mmjax <command>`: a thin command line over importable functions.

Every command takes `--config=PATH[:ARG]`, `--config.KEY=VALUE` overrides and `--workdir=DIR`.
User errors (a bad flag, a missing file, an unknown config key) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence

from mmjax import __version__
from mmjax.errors import UserError

EXIT_USER_ERROR = 2

class _Parser(argparse.ArgumentParser):
  """An ArgumentParser whose errors are UserErrors, so that main() reports them in one line."""

  def error(self, message):
    raise UserError(f"{self.prog}: {message} (see {self.prog} --help)")


def _add_common(parser: argparse.ArgumentParser, *, config_required: bool) -> None:
  parser.add_argument("--config", required=config_required, metavar="PATH[:ARG]",
                      help="config file and optional variant argument; override keys with "
                           "--config.KEY=VALUE")
  parser.add_argument("--workdir", metavar="DIR", help="directory the command writes to")


def _build_parser() -> argparse.ArgumentParser:
  parser = _Parser(prog="mmjax", description=(
      "Pretrain multimodal models on discrete tokens: 4M-style any-to-any masked modeling and "
      "mixed-modal decoders, from a CPU to TPU pods."))
  parser.add_argument("--version", action="version", version=f"mmjax {__version__}")
  commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

  demo = commands.add_parser("demo", help="the whole pipeline on the embedded shapes data, on CPU")
  _add_common(demo, config_required=False)
  demo.add_argument("--num-train", type=int, help="training scenes to generate (default 2000)")
  demo.add_argument("--num-val", type=int, help="validation scenes to generate (default 200)")
  demo.add_argument("--quick", action="store_true",
                    help="smoke-test sizes: every stage runs, in seconds of work")
  demo.add_argument("--reference", action="store_true",
                    help="the reference run: more data, longer tokenizers, and 4M with "
                         "configs/fourm/shapes.py:reference (about 2 hours; default workdir "
                         "runs/reference)")
  demo.add_argument("--model", choices=("fourm", "decoder"), default="fourm",
                    help="the model trained on the demo's tokens: 4M (default) or the "
                         "mixed-modal decoder (report_decoder.md)")
  demo.set_defaults(run=_run_demo)

  prepare = commands.add_parser("prepare", help="prepare a dataset: shapes scenes or token shards")
  prepare_kinds = prepare.add_subparsers(dest="kind", metavar="KIND", parser_class=_Parser)
  shapes = prepare_kinds.add_parser("shapes", help="generate the synthetic shapes scenes")
  _add_common(shapes, config_required=False)
  shapes.add_argument("--out", required=True, metavar="DIR", help="tfds data directory to write")
  shapes.add_argument("--num-train", type=int, default=20000, help="scenes in the train split")
  shapes.add_argument("--num-val", type=int, default=1000, help="scenes in the validation split")
  shapes.add_argument("--seed", type=int, default=0, help="scene i is a function of (seed, i)")
  shapes.add_argument("--image-size", type=int, default=64, help="side of the square images")
  shapes.set_defaults(run=_run_prepare_shapes)
  tokens = prepare_kinds.add_parser("tokens", help="pre-tokenize a raw dataset into ArrayRecords")
  _add_common(tokens, config_required=True)
  tokens.add_argument("--overwrite", action="store_true",
                      help="re-encode every shard instead of skipping finished ones")
  tokens.set_defaults(run=_run_prepare_tokens)

  verify = commands.add_parser("verify", help="check every token shard's size and checksum")
  verify.add_argument("directory", metavar="DIR", help="a token set, or a tfds data_dir (e.g. the "
                      "workdir of `mmjax prepare tokens`) holding mmjax_tokens/<name>/")
  verify.set_defaults(run=_run_verify, config=None)

  tokenizer = commands.add_parser("tokenizer", help="train a text or image-like tokenizer")
  tokenizer_actions = tokenizer.add_subparsers(dest="action", metavar="ACTION",
                                               parser_class=_Parser)
  tokenizer_train = tokenizer_actions.add_parser("train", help="train a tokenizer, report quality")
  _add_common(tokenizer_train, config_required=True)
  tokenizer_train.set_defaults(run=_run_tokenizer_train)
  fingerprint = tokenizer_actions.add_parser(
      "fingerprint", help="(re)write tokenizer.json of a trained image tokenizer from its weights")
  _add_common(fingerprint, config_required=True)
  fingerprint.set_defaults(run=_run_tokenizer_fingerprint)

  train = commands.add_parser(
      "train", help="train (4M, decoder or tokenizer objective); resumes from DIR's checkpoint")
  _add_common(train, config_required=True)
  train.set_defaults(run=_run_train)

  evaluate = commands.add_parser("eval", help="metrics and PNG grids from the latest checkpoint")
  _add_common(evaluate, config_required=True)
  evaluate.add_argument("--num-scenes", type=int, default=32,
                        help="validation scenes for the generation-based (any-to-any) metrics")
  evaluate.add_argument("--seed", type=int, default=0, help="sampling seed")
  evaluate.add_argument("--tasks", default="", help="generation tasks to score, comma-separated "
                        "(e.g. 'rgb->caption,caption->tok_rgb'); default: every task the config "
                        "supports")
  evaluate.add_argument("--out", metavar="DIR", help="where metrics and grids go; default "
                        "<workdir>/eval")
  evaluate.set_defaults(run=_run_eval)

  generate = commands.add_parser("generate", help="any-to-any generation from given inputs")
  _add_common(generate, config_required=True)
  generate.add_argument("--input", action="append", default=[], metavar="MODALITY=VALUE",
                        help="a conditioning input: text for a sequence modality, an image file "
                             "for an image modality (repeatable)")
  generate.add_argument("--target", action="append", default=[], metavar="MODALITY",
                        help="a modality to generate, in order (repeatable)")
  generate.add_argument("--out", metavar="DIR", help="where outputs go; default <workdir>/generate")
  generate.add_argument("--seed", type=int, default=0, help="sampling seed")
  generate.add_argument("--num-samples", type=int, default=1, help="samples per input")
  generate.add_argument("--allow-random-init", action="store_true",
                        help="without a checkpoint in the workdir, sample from a random model")
  generate.set_defaults(run=_run_generate)

  bench = commands.add_parser("bench", help="throughput figures as one JSON line on stdout")
  bench_kinds = bench.add_subparsers(dest="kind", metavar="KIND", parser_class=_Parser)
  for name, help_text in (("step", "train-step throughput and MFU"),
                          ("data", "input-pipeline samples/s"),
                          ("decode", "decoder tokens/s with and without the KV cache")):
    command = bench_kinds.add_parser(name, help=help_text)
    _add_common(command, config_required=True)
    command.set_defaults(run={"step": _run_bench_step, "data": _run_bench_data,
                              "decode": _run_bench_decode}[name])
  bench_kinds.choices["step"].add_argument("--steps", type=int, default=10, help="timed steps")
  bench_step = bench_kinds.choices["step"]
  bench_step.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
  bench_step.add_argument("--batch", choices=("synthetic", "masked", "data"), default="synthetic",
                          help="synthetic: every slot budget filled; masked: random records "
                               "through the training masking (the reference's budget "
                               "statistics); data: the first batch of data.data_dir")
  bench_step.add_argument("--valid-targets", type=int, metavar="N",
                          help="with --batch=masked: the first batch (seed by seed) with exactly "
                               "N valid target slots, e.g. 1258 for the reference's 4M-tiny batch")
  bench_step.add_argument("--text-tokens", type=int, metavar="N",
                          help="with --batch=masked: tokens per random caption/box sequence "
                               "(default 8, as the reference's batch)")
  bench_step.add_argument("--no-profile", dest="profile", action="store_false",
                          help="skip the profiled step and its per-phase breakdown")
  bench_shapes = bench_kinds.add_parser("shapes", help="shapes scene generation speed")
  _add_common(bench_shapes, config_required=False)
  bench_shapes.add_argument("--num-scenes", type=int, default=5000)
  bench_shapes.add_argument("--image-size", type=int, default=64)
  bench_shapes.set_defaults(run=_run_bench_shapes)

  aot = commands.add_parser("aot", help="compile the train step for a TPU topology without TPUs")
  _add_common(aot, config_required=False)
  aot.add_argument("--topology",
                   help="TPU kind and chips per axis: v5p:2x2x2, v4:2x2x1, v5e:2x4, v6e:4x4")
  aot.add_argument("--out", metavar="DIR", help="write the program there (StableHLO; when "
                   "compiled also the optimised HLO and the serialized executable); default: "
                   "--workdir if given")
  aot.add_argument("--lower-only", action="store_true",
                   help="lower on stand-in CPU devices without the TPU compiler (what runs "
                        "without libtpu): shardings, state bytes and HLO FLOPs, no memory analysis")
  aot.add_argument("--table", metavar="DIR",
                   help="instead of one config: compile every row of the README's AOT table "
                        "(mmjax/train/aot_table.py), one process each, and write "
                        "DIR/aot_table.md and .json")
  aot.add_argument("--rows", metavar="REGEX", help="with --table: only the rows whose name "
                   "matches (the others keep their earlier result in DIR)")
  aot.add_argument("--row-timeout", type=float, default=3600, metavar="S",
                   help="with --table: seconds one row may compile (default 3600)")
  aot.add_argument("--resume", action="store_true",
                   help="with --table: skip the rows that compiled in an earlier run")
  aot.add_argument("--render-only", action="store_true",
                   help="with --table: rebuild the table from DIR without compiling, "
                        "counting FLOPs and bytes again from the saved programs")
  aot.set_defaults(run=_run_aot)

  _add_convert_commands(commands)

  sweep = commands.add_parser("sweep", help="run or emit a grid of runs; collect results")
  _add_common(sweep, config_required=False)
  sweep.add_argument("--sweep", required=True, metavar="PATH", help="sweep file, e.g. "
                     "configs/sweeps/scaling.py")
  sweep.add_argument("--emit", action="store_true",
                     help="print one `mmjax train` command per point instead of running them")
  sweep.add_argument("--collect", action="store_true",
                     help="only collect the results already in the points' workdirs")
  sweep.set_defaults(run=_run_sweep)
  return parser


def _shipped(config: str) -> str:
  """A shipped config, relative to the working directory or else to the repository."""
  if os.path.isfile(config):
    return config
  return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), config)


def _add_convert_commands(commands) -> None:
  """`mmjax import {fourm,chameleon}` and `mmjax export chameleon` (mmjax/convert/)."""
  importer = commands.add_parser("import", help="released weights (ml-4m 4M, HF Chameleon) into "
                                 "a workdir that train, eval and generate load")
  kinds = importer.add_subparsers(dest="kind", metavar="KIND", parser_class=_Parser)
  fourm = kinds.add_parser("fourm", help="an ml-4m checkpoint (safetensors + config.json)")
  fourm.add_argument("--config", metavar="PATH[:ARG]", default=_shipped("configs/fourm/4m.py"),
                     help="base config: its data, train and generate sections are kept; model "
                          "and modalities come from the checkpoint (default configs/fourm/4m.py)")
  fourm.add_argument("--drop-modality", action="append", default=[], metavar="NAME",
                     help="leave a reference modality out (e.g. a T5-embedding input; repeatable)")
  fourm.add_argument("--text-tokenizer", default="", metavar="TOKENIZER_JSON",
                     help="4M's WordPiece tokenizer.json: copied into the workdir and used by the "
                          "sequence modalities (prepare tokens, generate)")
  chameleon = kinds.add_parser("chameleon", help="a Hugging Face Chameleon directory "
                               "(config.json + safetensors shards)")
  chameleon.add_argument("--config", metavar="PATH[:ARG]",
                         default=_shipped("configs/decoder/shapes.py"),
                         help="base config: data, train and generate sections are kept; model, "
                              "modalities come from the checkpoint")
  for command, run in ((fourm, _run_import_fourm), (chameleon, _run_import_chameleon)):
    command.add_argument("--from", dest="source", required=True, metavar="DIR_OR_FILE",
                         help="the checkpoint to import")
    command.add_argument("--workdir", required=True, metavar="DIR",
                         help="empty directory for the checkpoint, config.json and config.py")
    command.set_defaults(run=run)
  exporter = commands.add_parser("export", help="an mmjax model in a released layout")
  export_kinds = exporter.add_subparsers(dest="kind", metavar="KIND", parser_class=_Parser)
  to_chameleon = export_kinds.add_parser("chameleon", help="a dense mmjax decoder as a Hugging "
                                         "Face Chameleon directory that transformers loads")
  _add_common(to_chameleon, config_required=False)
  to_chameleon.add_argument("--out", required=True, metavar="DIR", help="directory to write")
  to_chameleon.set_defaults(run=_run_export_chameleon)


def _run_import_fourm(args: argparse.Namespace) -> int:
  from mmjax.convert import fourm

  base = _load_config(args)
  summary = fourm.run_import(args.source, base, args.workdir, tuple(args.drop_modality),
                             args.text_tokenizer)
  print(json.dumps(summary, default=str))
  return 0


def _run_import_chameleon(args: argparse.Namespace) -> int:
  from mmjax.convert import chameleon

  summary = chameleon.run_import(args.source, _load_config(args), args.workdir)
  print(json.dumps(summary, default=str))
  return 0


def _run_export_chameleon(args: argparse.Namespace) -> int:
  from mmjax.convert import chameleon

  workdir = _require_workdir(args, "the checkpoint is read from there")
  config = _load_config(args) if args.config else chameleon.workdir_config(workdir)
  print(json.dumps(chameleon.run_export(config, workdir, args.out), default=str))
  return 0


def _load_config(args: argparse.Namespace):
  """The command's config with its overrides applied and validated, or None without --config."""
  from mmjax import (
    config as mmconfig,  # imported late: `mmjax --help` should not load absl
  )

  if args.config is None:
    if args.overrides:
      raise UserError(f"{args.overrides[0].split('=')[0]} given without --config")
    return None
  return mmconfig.load(args.config, args.overrides)


# Each command imports its modules inside its handler: jax, tensorflow_datasets and matplotlib
# take seconds to import, and `mmjax --help` or one command should pay only for what it uses.


def _run_aot(args: argparse.Namespace) -> int:
  from mmjax.train import aot

  if args.table:
    from mmjax.train import aot_table

    if args.config or args.overrides or args.topology:
      raise UserError("mmjax aot --table: the rows name their configs and topologies "
                      "(mmjax/train/aot_table.py); drop --config, --config.* and --topology")
    result = aot_table.run_table(args.table, args.rows, timeout_s=args.row_timeout,
                                 render_only=args.render_only, resume=args.resume)
    print(result.pop("markdown"), end="", file=sys.stderr)
    print(json.dumps(result))
    return 0
  if not args.config or not args.topology:
    raise UserError("mmjax aot: give --config and --topology (or --table DIR)")
  config = _load_config(args)
  result = aot.run_aot(config, args.topology, out_dir=args.out or args.workdir,
                       lower_only=args.lower_only)
  print(json.dumps(result, default=str))
  return 0


def _run_sweep(args: argparse.Namespace) -> int:
  from mmjax.train import sweep

  if args.config or args.overrides:
    raise UserError("mmjax sweep: the sweep file names the base config; put overrides in its "
                    "points, not in --config")
  if args.emit and args.collect:
    raise UserError("mmjax sweep: --emit and --collect exclude each other")
  workdir = _require_workdir(args, "each point trains in a directory under it")
  if not args.emit and not args.collect:
    _join_cluster(workdir)
  result = sweep.run_sweep(args.sweep, workdir, emit=args.emit, collect_only=args.collect)
  if args.emit:
    print("\n".join(result["commands"]))
    return 0
  print(result.pop("table_text"))
  print(json.dumps(result, default=str))
  return 0


def _run_prepare_shapes(args: argparse.Namespace) -> int:
  from mmjax.data.shapes import records as shapes_records

  _load_config(args)
  try:
    summary = shapes_records.prepare_shapes(args.out, num_train=args.num_train,
                                            num_val=args.num_val, seed=args.seed,
                                            image_size=args.image_size, progress=True)
  except ValueError as e:
    raise UserError(f"prepare shapes: {e}") from None
  print(json.dumps(summary, default=str))
  return 0


def _run_bench_shapes(args: argparse.Namespace) -> int:
  from mmjax.data.shapes import world as shapes

  _load_config(args)
  result = shapes.benchmark_generation(args.num_scenes, image_size=args.image_size)
  print(json.dumps({"bench": "shapes", "image_size": args.image_size, **result}))
  return 0


def _run_tokenizer_train(args: argparse.Namespace) -> int:
  config = _load_config(args)
  if not args.workdir:
    raise UserError("mmjax tokenizer train: --workdir is required (the tokenizer is written there)")
  _join_cluster(args.workdir)
  if config.get("kind", "") == "text":
    from mmjax.objectives import text_tokenizer
    result = text_tokenizer.run_text_tokenizer_train(config, args.workdir)
  elif config.get("objective", "") == "tokenizer":
    from mmjax.objectives import tokenizer
    result = tokenizer.run_image_tokenizer_train(config, args.workdir)
  else:
    raise UserError(f"{args.config}: not a tokenizer config (needs kind='text' or "
                    "objective='tokenizer')")
  print(json.dumps(result, default=str))
  return 0


def _join_cluster(workdir: str | None) -> None:
  """Every command that uses devices starts here, before its first JAX call: it joins the other
  processes of a multi-host run (see mmjax/distributed.py), whose output goes to workdir/logs."""
  from mmjax import distributed

  distributed.join(workdir)


def _run_tokenizer_fingerprint(args: argparse.Namespace) -> int:
  from mmjax.objectives import tokenizer

  config = _load_config(args)
  if not args.workdir:
    raise UserError("mmjax tokenizer fingerprint: --workdir is required (the trained tokenizer)")
  if config.get("objective", "") != "tokenizer":
    raise UserError(f"{args.config}: not an image tokenizer config (needs objective='tokenizer')")
  _join_cluster(args.workdir)
  print(json.dumps(tokenizer.run_write_info(config, args.workdir), default=str))
  return 0


def _require_workdir(args: argparse.Namespace, what: str) -> str:
  if not args.workdir:
    raise UserError(f"mmjax {args.command}: --workdir is required ({what})")
  return args.workdir


def _run_train(args: argparse.Namespace) -> int:
  from mmjax.eval import curves
  from mmjax.train import loop

  config = _load_config(args)
  workdir = _require_workdir(args, "checkpoints and metrics are written there")
  _join_cluster(workdir)
  evaluator = curves.make_training_eval(config, workdir)  # config.eval.every_steps
  print(json.dumps(loop.run_train(config, workdir, evaluator=evaluator), default=str))
  return 0


def _run_eval(args: argparse.Namespace) -> int:
  from mmjax.eval import run

  config = _load_config(args)
  workdir = _require_workdir(args, "the checkpoint is read from there")
  if args.num_scenes < 0:
    raise UserError(f"--num-scenes must be >= 0, got {args.num_scenes}")
  _join_cluster(workdir)
  summary = run.run_eval(config, workdir, out_dir=args.out or os.path.join(workdir, "eval"),
                         num_scenes=args.num_scenes, seed=args.seed,
                         tasks=[t.strip() for t in args.tasks.split(",") if t.strip()] or None)
  print(json.dumps(summary, default=str))
  return 0


def _run_generate(args: argparse.Namespace) -> int:
  from mmjax.generate import run

  config = _load_config(args)
  workdir = _require_workdir(args, "the checkpoint is read from there")
  inputs = {}
  for item in args.input:
    name, sep, value = item.partition("=")
    if not sep or not name:
      raise UserError(f"--input {item!r}: expected MODALITY=VALUE, e.g. caption=\"a red circle\"")
    inputs[name] = value
  if not args.target:
    raise UserError("mmjax generate: give at least one --target MODALITY")
  _join_cluster(workdir)
  summary = run.run_generate(config, workdir, inputs, args.target,
                             out_dir=args.out or os.path.join(workdir, "generate"),
                             seed=args.seed, num_samples=args.num_samples,
                             allow_random_init=args.allow_random_init)
  print(json.dumps(summary, default=str))
  return 0


def _run_prepare_tokens(args: argparse.Namespace) -> int:
  from mmjax import pretokenize

  config = _load_config(args)
  workdir = _require_workdir(args, "tokenizers are read from <workdir>/tokenizers and the shards "
                                   "written under it unless the config says otherwise")
  summary = pretokenize.run_prepare_tokens(config, workdir, overwrite=args.overwrite)
  print(json.dumps(summary, default=str))
  return 0


def _run_verify(args: argparse.Namespace) -> int:
  from mmjax.data.tokens import records

  if args.overrides:
    raise UserError("mmjax verify takes no --config overrides")
  result = records.verify_token_sets(args.directory)
  for ds_dir, count in result["verified"].items():
    print(f"mmjax verify: {ds_dir}: {count} shards, sizes and sha256 as recorded", file=sys.stderr)
  for ds_dir in result["unrecorded"]:
    print(f"mmjax verify: {ds_dir}: written before shard checksums were recorded; nothing to "
          f"compare (re-run `mmjax prepare tokens --overwrite` to record them)", file=sys.stderr)
  print(json.dumps(result))
  return 0


def _run_bench_step(args: argparse.Namespace) -> int:
  from mmjax.train import bench

  config = _load_config(args)
  _join_cluster(args.workdir)
  result = bench.run_bench_step(config, steps=args.steps, warmup=args.warmup, batch=args.batch,
                                valid_targets=args.valid_targets, text_tokens=args.text_tokens,
                                profile=args.profile)
  print(json.dumps(result, default=str))
  return 0


def _run_bench_decode(args: argparse.Namespace) -> int:
  from mmjax.generate import decoder_bench

  config = _load_config(args)
  _join_cluster(args.workdir)
  print(json.dumps(decoder_bench.run_bench_decode(config), default=str))
  return 0


def _run_bench_data(args: argparse.Namespace) -> int:
  from mmjax.data.pipeline import bench

  config = _load_config(args)
  _join_cluster(args.workdir)
  result = bench.run_bench_data(config, args.workdir)
  print(json.dumps(result, default=str))
  return 0


def _run_demo(args: argparse.Namespace) -> int:
  from mmjax import demo

  _load_config(args)
  if args.quick and args.reference:
    raise UserError("demo: --quick and --reference are exclusive")
  settings = (demo.DemoSettings.quick_settings() if args.quick else
              demo.DemoSettings.reference_settings() if args.reference else demo.DemoSettings())
  sizes = {k: v for k, v in (("num_train", args.num_train), ("num_val", args.num_val))
           if v is not None}
  settings = dataclasses.replace(settings, model=args.model, **sizes)
  workdir = args.workdir or os.path.join("runs", "reference" if args.reference else "demo")
  _join_cluster(workdir)
  demo.run_demo(workdir, settings)
  return 0


def _split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Separates `--config.KEY=VALUE` / `--config.KEY VALUE` overrides from argparse's arguments."""
  rest, overrides = [], []
  expects_value = False
  for arg in argv:
    if expects_value:
      overrides.append(arg)
      expects_value = False
    elif arg.startswith("--config."):
      overrides.append(arg)
      expects_value = "=" not in arg
    else:
      rest.append(arg)
  return rest, overrides


def _prepare_process(command: str) -> None:
  """Process-wide settings of every command, before JAX starts its threads: freed host memory
  is kept for reuse (mmjax/hostmem.py), libtpu stays quiet on a host without TPU chips
  (mmjax/libtpu_env.py) and the persistent compilation cache is on (mmjax/compile_cache.py; not
  for `aot`)."""
  from mmjax import compile_cache, hostmem, libtpu_env

  hostmem.retain_freed_memory()
  libtpu_env.one_host_slice_without_chips()
  if command != "aot":
    compile_cache.enable()


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  rest, overrides = _split_overrides(argv)
  parser = _build_parser()
  try:
    args = parser.parse_args(rest)
    args.overrides = overrides
    _prepare_process(getattr(args, "command", "") or "")
    if not hasattr(args, "run"):
      command = " ".join(a for a in rest if not a.startswith("-"))
      if not command:
        parser.print_help()
        return EXIT_USER_ERROR
      raise UserError(f"mmjax {command}: choose one of its subcommands (see mmjax {command} "
                      "--help)")
    return args.run(args)
  except UserError as e:
    print(f"mmjax: error: {e}", file=sys.stderr)
    return EXIT_USER_ERROR
  except FileNotFoundError as e:
    print(f"mmjax: error: file not found: {e.filename or e}", file=sys.stderr)
    return EXIT_USER_ERROR
  except KeyboardInterrupt:
    print("mmjax: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
