"""`pretrain` command line: train, data, eval, config and the demo."""

from __future__ import annotations

import argparse
import json
import sys

from pretrain.config import ConfigError, UserError
from pretrain.logs import setup_logging
from pretrain.recipes import load_config


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="TOML file, e.g. configs/mae_vit_tiny_digits.toml")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set optim.base_lr=3e-4 (repeatable)",
    )


def cmd_train(args: argparse.Namespace) -> int:
    from pretrain.distributed import destroy_distributed
    from pretrain.runtime.preemption import exit_code_after_stop
    from pretrain.train import Trainer

    overrides = list(args.overrides) + ([f"train.resume={json.dumps(args.resume)}"] if args.resume else [])
    cfg = load_config(args.config, overrides)
    try:
        result = Trainer(cfg, force_lock=args.force).fit(until=args.until)
    finally:
        destroy_distributed()
    stopped = f" (stopped by {result.stopped_by})" if result.stopped_by else ""
    tracked = result.mlflow_run_id
    if tracked is None and cfg.tracking.enabled:
        tracked = f"none (not reached; `pretrain tracking sync {cfg.run_dir}` delivers the run's record later)"
    print(f"finished at step {result.step}{stopped}; checkpoint: {result.checkpoint}; mlflow run: {tracked}")
    return exit_code_after_stop(result.stopped_by)


def cmd_config(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    print(json.dumps(cfg.to_dict(), indent=2))
    return 0


def cmd_eval_knn(args: argparse.Namespace) -> int:
    from pretrain.eval.run import evaluate_knn

    report = evaluate_knn(args.checkpoint, shards=args.shards, random_init=args.random_init, overrides=args.overrides)
    print(json.dumps(report) if args.json else report["summary"])
    return 0


def cmd_eval_linear(args: argparse.Namespace) -> int:
    from pretrain.eval.run import evaluate_linear

    report = evaluate_linear(
        args.checkpoint, shards=args.shards, random_init=args.random_init, overrides=args.overrides
    )
    print(json.dumps(report) if args.json else report["summary"])
    return 0


def cmd_eval_finetune(args: argparse.Namespace) -> int:
    from pretrain.eval.finetune import evaluate_finetune

    report = evaluate_finetune(
        args.checkpoint,
        config=args.config,
        label_fraction=args.label_fraction,
        random_init=args.random_init,
        shards=args.shards,
        overrides=args.overrides,
    )
    if "summary" in report:  # rank 0
        print(json.dumps(report) if args.json else report["summary"])
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pretrain.demo import run_demo

    return run_demo(args.out, steps=args.steps, overrides=args.overrides)


def build_parser() -> argparse.ArgumentParser:
    from data_pipeline.cli import register as register_data
    from launch.cli import register as register_launch
    from pretrain.bench import register as register_bench
    from pretrain.ckpt.cli import register as register_ckpt
    from pretrain.eval.fid import register as register_fid
    from pretrain.eval.nll import register as register_nll
    from pretrain.eval.pca import register as register_viz
    from pretrain.latent_shards import register as register_latents
    from pretrain.plan.cli import register as register_plan
    from pretrain.sample import register as register_sample
    from pretrain.token_shards import register as register_tokens
    from pretrain.tracking.sync import register as register_tracking

    parser = argparse.ArgumentParser(prog="pretrain", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show the full traceback of user and environment errors")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a method from a config")
    _add_config_args(train)
    train.add_argument("--resume", help="auto (latest good checkpoint), none, or a checkpoint path")
    train.add_argument(
        "--until", type=int, metavar="STEP", help="stop after this step (the schedule still spans train.steps)"
    )
    train.add_argument(
        "--force",
        action="store_true",
        help="take over the run directory's lock from a holder on another host that is known to be gone",
    )
    train.set_defaults(func=cmd_train)

    config = commands.add_parser("config", help="validate a config with overrides and print it resolved")
    _add_config_args(config)
    config.set_defaults(func=cmd_config)

    data = commands.add_parser("data", help="data preparation")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    register_data(data_commands)
    register_latents(data_commands)
    register_tokens(data_commands)

    evaluate = commands.add_parser("eval", help="evaluate a checkpoint")
    eval_commands = evaluate.add_subparsers(dest="eval_command", required=True)
    for name, func, about in [
        ("knn", cmd_eval_knn, "weighted kNN top-1 on frozen encoder features (k=eval.k, T=eval.temperature)"),
        ("linear", cmd_eval_linear, "linear probe (BN without affine + linear) on frozen encoder features"),
    ]:
        sub = eval_commands.add_parser(name, help=about)
        sub.add_argument("--checkpoint", required=True, help="checkpoint directory, or a run directory (its latest)")
        sub.add_argument(
            "--shards", default="", help="evaluation shards (default: eval.shards, else the training data)"
        )
        sub.add_argument(
            "--random-init", action="store_true", help="evaluate a randomly initialized encoder of the same shape"
        )
        sub.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
        sub.add_argument("--json", action="store_true", help="print the full report as JSON")
        sub.set_defaults(func=func)

    finetune = eval_commands.add_parser(
        "finetune",
        help="fine-tune the encoder end to end with a classification head (a resumable run), then score the test split",
    )
    finetune.add_argument("checkpoint", help="pretraining checkpoint directory, or its run directory (the latest)")
    finetune.add_argument(
        "--config", help="fine-tuning recipe, e.g. configs/finetune_vit_b16.toml (default: eval.finetune_config)"
    )
    finetune.add_argument(
        "--label-fraction",
        type=float,
        metavar="F",
        help="train on a class-balanced fraction of the labels in (0, 1], e.g. 0.01 or 0.1 (default: data.label_fraction)",
    )
    finetune.add_argument("--shards", default="", help="labelled shards (default: the recipe's, else the run's)")
    finetune.add_argument(
        "--random-init", action="store_true", help="the same fine-tune from a randomly initialized encoder (baseline)"
    )
    finetune.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    finetune.add_argument("--json", action="store_true", help="print the full report as JSON")
    finetune.set_defaults(func=cmd_eval_finetune)

    register_ckpt(commands)
    register_bench(commands)
    register_launch(commands)
    register_plan(commands)
    register_sample(commands)
    register_tracking(commands)
    register_viz(commands)
    register_fid(eval_commands)
    register_nll(eval_commands)

    demo = commands.add_parser("demo", help="digits shards -> MAE ViT-tiny pretraining -> kNN vs random init")
    demo.add_argument("--out", default="runs/demo", help="directory for shards, run and MLflow store")
    demo.add_argument("--steps", type=int, default=0, help="training steps (default: the demo config's)")
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    demo.set_defaults(func=cmd_demo)
    return parser


# Mistakes of the user and problems of the environment: one line, exit code 2, no traceback (--debug keeps it).
_USER_ERRORS = (UserError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted anywhere on the line, not only before the command
    args = build_parser().parse_args([a for a in argv if a != "--debug"])
    args.debug = debug
    try:
        return args.func(args)
    except _USER_ERRORS as exc:
        if args.debug:
            raise
        kind = "config error" if isinstance(exc, ConfigError) else "error"
        print(f"{kind}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
