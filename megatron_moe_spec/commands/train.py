"""``megatron-moe-spec train CONFIG [CONFIG ...] [--set KEY=VALUE ...]``

One rank of a training run (launch several with torchrun: scripts/pretrain.sh). Everything that can
be checked cheaply is checked before torch.distributed or any model exists: the config (keys, values,
combinations, data and checkpoint paths), the parallel layout against WORLD_SIZE, the device and the
optional wandb package. A problem: ``error: <key>: <message with the fix>`` on stderr, exit code 2.
"""
import argparse
import importlib.util
import os

HELP = "train a model from run config(s) (one rank; launch with scripts/pretrain.sh / torchrun)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from megatron_moe_spec.commands.validate import add_config_arguments

    add_config_arguments(parser)
    parser.add_argument("--print-world-size", action="store_true",
                        help="print the smallest number of processes the config runs on and exit "
                             "(scripts/pretrain.sh uses it for NPROC_PER_NODE)")


def preflight(configs, overrides):
    """Load and check everything that needs no process group; returns (cfg, sizes)."""
    from megatron_moe_spec.run_config import ConfigError, load_run_config, validate_for_world_size

    cfg = load_run_config(configs, overrides, check_paths=True)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    sizes = validate_for_world_size(cfg, world_size)
    if cfg.training.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("training.device: cuda, but CUDA is not available here; set training.device: "
                              "auto (CPU with gloo when there is no GPU) or cpu", key="training.device")
    on_cpu = cfg.training.device == "cpu"
    if cfg.training.device == "auto":
        import torch

        on_cpu = not torch.cuda.is_available()
    if on_cpu and cfg.training.precision != "fp32":
        raise ConfigError(f"training.precision: {cfg.training.precision} does not run on CPU (megatron-core's "
                          f"mixed-precision optimizer needs CUDA tensors); set training.precision: fp32 "
                          f"for a CPU run", key="training.precision")
    if on_cpu and cfg.model.transformer_impl == "transformer_engine":
        raise ConfigError("model.transformer_impl: transformer_engine needs a GPU; set model.transformer_impl: "
                          "local (or auto) for a CPU run", key="model.transformer_impl")
    check_backend(cfg, on_cpu)
    if cfg.logging.wandb_project and importlib.util.find_spec("wandb") is None:
        raise ConfigError(f"logging.wandb_project: {cfg.logging.wandb_project!r} is set but the wandb package "
                          f"is not installed; pip install wandb, or set logging.wandb_project: null",
                          key="logging.wandb_project")
    if cfg.logging.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("logging.tensorboard: true but the tensorboard package is not installed; pip "
                          "install tensorboard (or megatron-moe-spec[report]), or set logging.tensorboard: "
                          "false", key="logging.tensorboard")
    return cfg, sizes


def check_backend(cfg, on_cpu: bool) -> None:
    """The layer implementation this machine can build (``auto`` resolved), or a ConfigError."""
    from megatron_moe_spec.run_config import ConfigError, resolve_backend, transformer_engine_importable

    m = cfg.model
    if not on_cpu and m.transformer_impl == "transformer_engine" and not transformer_engine_importable():
        raise ConfigError("model.transformer_impl: transformer_engine, but transformer_engine.pytorch does not "
                          "import here; pip install transformer-engine[pytorch] (megatron-moe-spec[gpu]), or set "
                          "model.transformer_impl: auto (local without Transformer Engine)",
                          key="model.transformer_impl")
    impl, grouped_gemm = resolve_backend(cfg, cpu=on_cpu)
    if on_cpu and grouped_gemm:
        raise ConfigError("model.moe_grouped_gemm: true needs a GPU with Transformer Engine (TEGroupedMLP); set "
                          "model.moe_grouped_gemm: false (or auto) for a CPU run", key="model.moe_grouped_gemm")
    s = cfg.specialization
    if impl == "local" and grouped_gemm and (s.sp_coeff > 0 or s.ortho_coeff > 0 or s.metrics):
        raise ConfigError("model.moe_grouped_gemm: true, and model.transformer_impl resolves to local here "
                          "(Transformer Engine does not import): megatron's legacy GroupedMLP has no linear_fc2 "
                          "module for R_sp, L_o and the metrics to capture; install Transformer Engine, or set "
                          "model.moe_grouped_gemm: auto", key="model.moe_grouped_gemm")


def min_world_size(cfg) -> int:
    """The smallest world size the config's parallel layout and batch sizes allow."""
    import math

    from megatron_moe_spec.run_config import ConfigError, validate_for_world_size

    p = cfg.parallel
    n = math.lcm(p.tp * p.pp * p.cp, p.resolved_etp * p.ep * p.pp)
    for size in range(n, 64 * n + 1, n):
        try:
            validate_for_world_size(cfg, size)
            return size
        except ConfigError:
            continue
    return n


def run(args: argparse.Namespace) -> int:
    if args.print_world_size:
        from megatron_moe_spec.run_config import load_run_config

        print(min_world_size(load_run_config(args.configs, args.overrides, check_paths=False)))
        return 0
    cfg, _ = preflight(args.configs, args.overrides)
    import warnings

    # Notices that say nothing actionable here: megatron-core's about missing TE / apex and its own
    # deprecated defaults, and torch's about the collective names megatron-core calls.
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|apex).*")
    warnings.filterwarnings("ignore", message=".*cuda_graph_scope.*")
    warnings.filterwarnings("ignore", message=".*torch.distributed.all_gather_into_tensor.*is deprecated.*")
    warnings.filterwarnings("ignore", message=".*torch.distributed.reduce_scatter_tensor.*is deprecated.*")
    from megatron_moe_spec.training.distributed import teardown
    from megatron_moe_spec.training.loop import train

    try:
        train(cfg)
    finally:
        teardown()
    return 0
