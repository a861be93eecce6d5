"""``train(cfg)``: the training loop. Read this file first; each step is one call into a sibling module.

    init: torch.distributed + parallel_state + seeds        (distributed.py)
    data: train / valid datasets                            (data.py)
    model: GPTModel chunks, DDP, optimizer, lr schedule     (model.py)
    resume from a checkpoint                                (checkpointing.py)
    loop:
        batches of this data-parallel rank for the step     (data.py)
        forward/backward over the micro-batches, step       (step.py)
        at log steps: LM loss, validation, aux losses,
        routing metrics -> console, metrics.jsonl, ...       (step.py, tracker.py, reporting.py)
        at save steps: atomic distributed checkpoint        (checkpointing.py)
"""
from __future__ import annotations

import math
import os
import time
from typing import Dict, Optional

from megatron_moe_spec.training import checkpointing, tracker
from megatron_moe_spec.training.distributed import (
    init_distributed, init_model_parallel, is_writer, set_seeds, use_cuda)


def train(cfg) -> Optional[Dict[str, float]]:
    """Train ``cfg`` (a validated ``RunConfig``) in this process, one of WORLD_SIZE ranks.

    Expects torch.distributed to be initialized or the torchrun variables set (a single process
    without them). Returns the last logged record (on every rank).
    """
    import torch
    from megatron.core.distributed import finalize_model_grads

    from megatron_moe_spec.core import layer_metrics
    from megatron_moe_spec.run_config import count_parameters, validate_for_world_size
    from megatron_moe_spec.training.data import BatchReader, build_data, valid_step_batches
    from megatron_moe_spec.training.model import (
        build_model, build_optimizer, build_transformer_config, moe_layers)
    from megatron_moe_spec.training.reporting import Reporter, Throughput, write_domain_names
    from megatron_moe_spec.training.step import (
        evaluate, lm_loss_totals, local_lm_loss_totals, reduce_totals, train_step)

    t0 = time.perf_counter()
    cuda = use_cuda(cfg.training.device)
    init_distributed(cfg.training.device)
    sizes = validate_for_world_size(cfg, torch.distributed.get_world_size())
    init_model_parallel(sizes)
    set_seeds(cfg.training.seed)
    writer = is_writer()
    run_dir = cfg.logging.run_dir
    if writer:
        os.makedirs(run_dir, exist_ok=True)
        cfg.save(os.path.join(run_dir, "config.yaml"))
        for w in cfg.warnings():
            print(f"warning: {w}", flush=True)
        pc = count_parameters(cfg)
        print(f"run {run_dir}: world size {sizes.world_size} (tp {sizes.tp}, pp {sizes.pp}, cp {sizes.cp}, "
              f"dp {sizes.dp}, ep {sizes.ep}, etp {sizes.etp}), {sizes.num_microbatches} micro-batch(es) of "
              f"{sizes.micro_batch_size} x {cfg.model.seq_length} tokens per rank per step; "
              f"{pc.total:,} parameters ({pc.active:,} active)", flush=True)

    # ------------------------------------------------------------------ data, model, optimizer
    data = build_data(cfg, sizes)
    config = build_transformer_config(cfg, cuda)
    if writer:
        print(f"layers: {config.transformer_impl} spec, {'grouped GEMM' if config.moe_grouped_gemm else 'sequential'} "
              f"experts, {cfg.training.precision} on {'CUDA (nccl)' if cuda else 'CPU (gloo)'}", flush=True)
    model = build_model(cfg, config, cuda)
    optimizer, scheduler = build_optimizer(cfg, model)
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss

    spec = cfg.specialization
    moe_indices = list(cfg.model.moe_layer_indices) if cfg.model.is_moe else []
    if spec.metrics:
        layer_metrics.register_layers([i + 1 for i in moe_indices], cfg.model.num_moe_experts,
                                      data.num_domains, eps=spec.eps)
    aux_names = tracker.register(cfg, config.num_layers + (config.mtp_num_layers or 0))
    moe_modules = moe_layers(model)
    coupling = tracker.coupling_layers(config, spec.cp_pipeline) if moe_indices else []

    # ------------------------------------------------------------------ resume
    iteration, consumed = 0, 0
    ckpt = checkpointing.resolve_resume(cfg)
    if ckpt is not None:
        iteration, consumed = checkpointing.load_checkpoint(cfg, ckpt, model, optimizer, scheduler)
        if writer:
            print(f"resumed from {ckpt}: iteration {iteration}, {consumed} samples consumed", flush=True)
    if writer:
        if data.num_domains:
            write_domain_names(run_dir, data.domain_names)  # RUN_DIR/domains.json, for the report
        domains = f"{data.num_domains} domains" if data.num_domains else "no domains"
        print(f"data: {cfg.data.type}, {len(data.train)} train samples"
              f"{f', {len(data.valid)} valid samples' if data.valid is not None else ''}, {domains}; "
              f"ready in {time.perf_counter() - t0:.1f}s", flush=True)

    reporter = Reporter(cfg, iteration, aux_names, writer)
    train_reader = BatchReader(data.train, sizes, data.domain_from_dataset_index, data.num_domains > 0)
    valid_reader = BatchReader(data.valid, sizes) if data.valid is not None else None
    throughput = Throughput(sizes.global_batch_size * cfg.model.seq_length)
    train_iters, gbs = cfg.training.train_iters, sizes.global_batch_size
    metrics_pending = False
    # Since the previous record (Megatron-LM's convention: logged values average the interval):
    interval_lm = torch.zeros(2, dtype=torch.float64)  # this rank's [loss_sum, tokens]
    interval_steps = 0  # the MoE tracker keeps summing until it is read
    last: Optional[Dict[str, float]] = None

    # ------------------------------------------------------------------ the loop
    while iteration < train_iters:
        step = iteration + 1
        metrics_now = spec.metrics and step % spec.metrics_interval == 0
        for layer in moe_modules:
            layer.begin_step(metrics_now, step=step)
        lr = optimizer.param_groups[0]["lr"]
        batches = train_reader.step_batches(consumed)
        reports, _, skipped = train_step(model, optimizer, scheduler, batches, cfg,
                                         metrics_domains=metrics_now and data.num_domains > 0)
        iteration, consumed = step, consumed + gbs
        interval_lm += local_lm_loss_totals(reports)
        interval_steps += 1
        metrics_pending |= metrics_now
        throughput.step()
        reporter.advance()

        evaluate_now = valid_reader is not None and cfg.eval.interval > 0 and (
            step % cfg.eval.interval == 0 or step == train_iters)
        if step % cfg.logging.log_interval == 0 or evaluate_now or step == train_iters:
            totals = reduce_totals(interval_lm)
            record = {"step": step, "lm_loss": float(totals[0] / totals[1])}
            record.update(throughput.read())  # before evaluation: training time only
            if evaluate_now:
                val = lm_loss_totals(evaluate(model, [valid_step_batches(valid_reader, e)
                                                      for e in range(cfg.eval.iters)], cfg))
                record["val_lm_loss"] = float(val[0] / val[1])
            record["lr"] = lr
            record.update(tracker.read(aux_names, sizes.num_microbatches * interval_steps, moe_indices,
                                       coupling))
            tracker.clear()
            interval_lm.zero_()
            interval_steps = 0
            matrices = None
            if metrics_pending:
                values = layer_metrics.report()
                matrices = values.pop("matrices", None)
                record.update(values)
                metrics_pending = False
            if skipped:
                reporter.print(f"step {step}: optimizer step skipped (loss scale overflow)")
            if not math.isfinite(record["lm_loss"]):
                reporter.print(f"step {step}: LM loss is {record['lm_loss']}")
            reporter.log(record, matrices)
            last = record
            throughput.reset()

        save_now = (cfg.checkpoint.save_interval and step % cfg.checkpoint.save_interval == 0) or (
            step == train_iters and cfg.checkpoint.save_final)
        if save_now:
            path = checkpointing.save_checkpoint(cfg, model, optimizer, scheduler, iteration, consumed)
            reporter.print(f"saved checkpoint {path}")
            throughput.reset()

    reporter.close()
    if writer:
        print(f"done: {iteration} iterations in {time.perf_counter() - t0:.1f}s; run directory {run_dir}",
              flush=True)
    return last
