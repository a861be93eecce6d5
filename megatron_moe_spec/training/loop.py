"""``train(cfg)``: the training loop. Read this file first; each step is one call into a sibling module.

    init: torch.distributed + parallel_state + seeds        (distributed.py)
    data: train / valid datasets                            (data.py)
    model: GPTModel / HybridModel chunks, DDP, optimizer,   (model.py)
           lr schedule
    resume from a checkpoint                                (checkpointing.py)
    loop:
        batches of this data-parallel rank for the step     (data.py)
        forward/backward over the micro-batches, step       (step.py)
        at log steps: LM loss, validation (per domain; the test split at the end), aux losses,
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
    from megatron_moe_spec.training.data import BatchReader, build_data
    from megatron_moe_spec.training.model import (
        build_model, build_optimizer, build_transformer_config, moe_layers)
    from megatron_moe_spec.training.reporting import Reporter, Throughput, write_domain_names
    from megatron_moe_spec.training.step import local_lm_loss_totals, reduce_totals, train_step

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
        try:
            pc = count_parameters(cfg)
            params = f"{pc.total:,} parameters ({pc.active:,} active)"
        except ValueError as e:  # a hybrid pattern with layer families the count does not cover
            params = f"parameters not counted ({e})"
        model_name = (f"HybridModel {cfg.model.hybrid_layer_pattern!r}" if cfg.model.is_hybrid
                      else f"GPTModel, {cfg.model.num_layers} layers")
        print(f"run {run_dir}: {model_name}; world size {sizes.world_size} (tp {sizes.tp}, pp {sizes.pp}, "
              f"cp {sizes.cp}, dp {sizes.dp}, ep {sizes.ep}, etp {sizes.etp}), {sizes.num_microbatches} "
              f"micro-batch(es) of {sizes.micro_batch_size} x {cfg.model.seq_length} tokens per rank per step; "
              f"{params}", flush=True)

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
    coupling = (tracker.coupling_layers(config, spec.cp_pipeline, cfg.model.hybrid_layer_pattern)
                if moe_indices else [])

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
    domains_on = data.num_domains > 0
    valid_reader = BatchReader(data.valid, sizes, data.domain_from_dataset_index, domains_on) \
        if data.valid is not None else None
    test_reader = BatchReader(data.test, sizes, data.domain_from_dataset_index, domains_on) \
        if data.test is not None else None
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
                record.update(evaluate_split(model, valid_reader, cfg, data, "val_lm_loss"))
                if step == train_iters and test_reader is not None:
                    record.update(evaluate_split(model, test_reader, cfg, data, "test_lm_loss"))
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


def domain_key(prefix: str, name) -> str:
    """``<prefix>/<name>`` with the name reduced to letters, digits, ``_ . -`` (paths become one word)."""
    import re

    return f"{prefix}/{re.sub(r'[^A-Za-z0-9_.-]+', '_', str(name)).strip('_') or 'domain'}"


def domain_mean_losses(totals, per_domain, names, prefix: str) -> Dict[str, float]:
    """The logged losses of one evaluation: ``prefix`` = the mean over the domains that have tokens of
    their mean loss (every domain weighs the same), ``prefix/<name>`` = each domain's mean loss. Without
    domains (``per_domain`` None or no token with a domain) ``prefix`` is the token mean.

    ``totals``: [loss_sum, num_tokens]; ``per_domain``: [D, 2] of the same, per domain."""
    out: Dict[str, float] = {}
    means = []
    if per_domain is not None:
        for d in range(len(per_domain)):
            loss_sum, count = float(per_domain[d][0]), float(per_domain[d][1])
            if count > 0:
                name = names[d] if names and d < len(names) else d
                out[domain_key(prefix, name)] = loss_sum / count
                means.append(loss_sum / count)
    out[prefix] = sum(means) / len(means) if means else float(totals[0] / totals[1])
    return out


def evaluate_split(model, reader, cfg, data, prefix: str) -> Dict[str, float]:
    """Evaluate ``cfg.eval.iters`` global batches of ``reader``'s split (the same ones every time);
    :func:`domain_mean_losses` of them (collective: every rank)."""
    from megatron_moe_spec.training.data import valid_step_batches
    from megatron_moe_spec.training.step import domain_loss_totals, evaluate, lm_loss_totals

    reports = evaluate(model, [valid_step_batches(reader, e) for e in range(cfg.eval.iters)], cfg,
                       num_domains=data.num_domains)
    per_domain = domain_loss_totals(reports, data.num_domains) if data.num_domains else None
    return domain_mean_losses(lm_loss_totals(reports), per_domain, data.domain_names, prefix)
