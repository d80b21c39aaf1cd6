"""The `ldmrt` command."""
from __future__ import annotations

import argparse
import json
import sys


def cmd_info(args) -> int:
    from .info import format_info, model_info, system_info
    info = model_info(args.model) if args.model else system_info()
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo
    run_demo(args.output, steps=args.steps, seed=args.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ldmrt", description="A compiled inference runtime for Latent "
                                     "Diffusion Models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="versions, CPU features, devices and backends; or a model's architecture")
    p.add_argument("--model", help="a preset name or config.yaml: show its architecture and parameter counts")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("demo", help="the README's main job: generate one image end to end")
    p.add_argument("-o", "--output", default="out.png")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .checkpoint import CheckpointError
    from .config import ConfigError
    try:
        return args.func(args)
    except (CheckpointError, ConfigError, ValueError, FileNotFoundError) as e:
        print(f"ldmrt {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
