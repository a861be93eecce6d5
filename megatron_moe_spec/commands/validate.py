"""``megatron-moe-spec validate CONFIG [CONFIG ...] [--set KEY=VALUE ...] [--world-size N]``

Loads and merges the files, applies the overrides, validates everything (and, with
``--world-size``, the process-group arithmetic), then prints the resolved YAML: exactly what a
training run writes to RUN_DIR/config.yaml, preceded by comment lines with the parameter count
(and the derived parallel sizes). Warnings go to stderr. An invalid config: ``error: ...`` on
stderr, exit code 2.
"""
import argparse
import sys

HELP = "check run config(s) and print the resolved YAML (exit 2 on an invalid config)"


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The config arguments every run-config-based command shares (train will reuse them)."""
    parser.add_argument("configs", nargs="+", metavar="CONFIG",
                        help="YAML files, merged left to right (later files win)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one key after merging, e.g. --set training.lr=1e-4 "
                             "(value parsed as YAML; repeatable)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--world-size", type=int, default=None, metavar="N",
                        help="also check the parallel layout for N processes")
    parser.add_argument("--no-check-paths", action="store_true",
                        help="do not check that data / tokenizer / checkpoint paths exist")


def run(args: argparse.Namespace) -> int:
    from megatron_moe_spec.run_config import count_parameters, load_run_config, validate_for_world_size

    cfg = load_run_config(args.configs, args.overrides, check_paths=not args.no_check_paths)
    header = []
    if args.world_size is not None:
        sizes = validate_for_world_size(cfg, args.world_size)
        header.append(
            f"# world size {sizes.world_size}: tp {sizes.tp}, pp {sizes.pp}, cp {sizes.cp}, dp {sizes.dp}, "
            f"ep {sizes.ep}, etp {sizes.etp}, expert dp {sizes.expert_dp}, "
            f"{sizes.num_microbatches} micro-batch(es) of {sizes.micro_batch_size} per step")
    try:
        pc = count_parameters(cfg)
        header.append(f"# parameters: {pc.total:,} total, {pc.active:,} active per token "
                      f"({pc.embedding:,} in embeddings and output layer)")
    except ValueError as e:  # a hybrid pattern with layer families the count does not cover
        header.append(f"# parameters: not counted ({e})")
    for w in cfg.warnings():
        print(f"warning: {w}", file=sys.stderr)
    sys.stdout.write("\n".join(header) + "\n" + cfg.to_yaml())
    return 0
