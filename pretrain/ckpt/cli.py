"""`pretrain ckpt`: inspect a checkpoint, export its weights, convert its format.

    pretrain ckpt inspect PATH [--json]
    pretrain ckpt export PATH --out FILE.safetensors [--part encoder|model] [--dtype float32|bfloat16|float16] [--force]
    pretrain ckpt convert PATH --to dcp|deepspeed --out DIR
    pretrain ckpt import --from mae|dino|moco_v1|moco_v2|moco_v3|dit|torchvision_resnet FILE --config CONFIG --out DIR [--set KEY=VALUE ...]

PATH is a checkpoint directory (`runs/<name>/checkpoints/step_XXXXXXXX`), or a run or checkpoints
directory, which stands for its latest complete checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys

from pretrain.ckpt.convert import FORMATS, convert_checkpoint
from pretrain.ckpt.export import DTYPES, PARTS, export_weights
from pretrain.ckpt.import_checkpoint import SOURCES, import_checkpoint
from pretrain.ckpt.inspect import format_bytes, format_report, inspect_checkpoint


def _fail(exc: BaseException) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return 2


def cmd_inspect(args: argparse.Namespace) -> int:
    try:
        info = inspect_checkpoint(args.path)
    except (FileNotFoundError, ValueError, OSError) as exc:
        return _fail(exc)
    print(json.dumps(info, indent=2) if args.json else format_report(info))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    try:
        done = export_weights(args.path, args.out, part=args.part, dtype=args.dtype, force=args.force)
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError, OSError) as exc:
        return _fail(exc)
    print(
        f"wrote {done['file']}: {done['part']} of step {done['step']}, {done['tensors']} tensors, "
        f"{done['parameters']:,} parameters, {done['dtype']}, {format_bytes(done['bytes'])} (from {done['checkpoint']})"
    )
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    try:
        out = convert_checkpoint(args.path, args.out, args.to)
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError, OSError) as exc:
        return _fail(exc)
    print(f'wrote {out} ({args.to}); resume from it with --set train.resume="{out}"')
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    try:
        done = import_checkpoint(args.source, args.file, args.config, args.out, args.overrides)
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError, OSError) as exc:
        return _fail(exc)
    print(
        f"wrote {done['checkpoint']}: {done['tensors']} tensors from {args.file} ({args.source}), "
        f"method of {done['method_parameters']:,} parameters"
    )
    for note in done["notes"]:
        print(f"note: {note}")
    if done["dropped"]:
        print(
            f"dropped {len(done['dropped'])} entries: {', '.join(done['dropped'][:6])}{' ...' if len(done['dropped']) > 6 else ''}"
        )
    print(f'start training from it with --set train.init_from="{args.out}"')
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `ckpt inspect`, `ckpt export` and `ckpt convert` to the top-level `pretrain` subparsers."""
    ckpt = subparsers.add_parser("ckpt", help="inspect, export, convert or import checkpoints")
    commands = ckpt.add_subparsers(dest="ckpt_command", required=True)
    where = "checkpoint directory, or a run/checkpoints directory (its latest complete checkpoint)"

    inspect = commands.add_parser("inspect", help="step, config summary and tensor sizes, without loading tensors")
    inspect.add_argument("path", help=where)
    inspect.add_argument("--json", action="store_true", help="print everything as JSON")
    inspect.set_defaults(func=cmd_inspect)

    export = commands.add_parser("export", help="write encoder (or whole method) weights to one .safetensors file")
    export.add_argument("path", help=where)
    export.add_argument("--out", required=True, help="the .safetensors file to write")
    export.add_argument(
        "--part",
        choices=PARTS,
        default="encoder",
        help="encoder: the backbone, keys as in its own state_dict (default); model: every weight of the method",
    )
    export.add_argument("--dtype", choices=DTYPES, default="float32", help="tensor dtype in the file (default float32)")
    export.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    export.set_defaults(func=cmd_export)

    convert = commands.add_parser("convert", help="convert between DeepSpeed and DCP checkpoints")
    convert.add_argument("path", help=where)
    convert.add_argument("--to", required=True, choices=FORMATS, help="the format to write")
    convert.add_argument("--out", required=True, help="the checkpoint directory to create")
    convert.set_defaults(func=cmd_convert)

    imp = commands.add_parser(
        "import", help="a checkpoint file of the released MAE, DINO, MoCo v3 or DiT code as a DCP checkpoint"
    )
    imp.add_argument("--from", dest="source", required=True, choices=list(SOURCES), help="the file's layout")
    imp.add_argument("file", help="the released file (read with tensors only: code in it is never executed)")
    imp.add_argument(
        "--config", required=True, help="the recipe whose method the weights fill (e.g. configs/dino_vit_s16.toml)"
    )
    imp.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="config override"
    )
    imp.add_argument(
        "--out", required=True, help="directory to create; the checkpoint goes to OUT/checkpoints/step_00000000"
    )
    imp.set_defaults(func=cmd_import)
