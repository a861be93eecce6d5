"""One training step and one evaluation, with megatron-core's pipeline schedules.

``get_forward_backward_func()`` picks the schedule (no pipelining, 1F1B, interleaved 1F1B) and runs
``forward_step`` on every micro-batch; it also sets the scale of megatron's ``MoEAuxLossAutoScaler``
(1 / num_microbatches, times the loss scale), which every auxiliary loss, ours included, rides on.
``finalize_model_grads`` (set on the config) all-reduces gradients over data parallel, the embedding
group and, for sequence-parallel parameters (router, norms), over tensor parallel. Then the optimizer
steps and the learning-rate schedule advances by one iteration.
"""
from __future__ import annotations

from functools import partial
from typing import Dict, List, Optional

import torch


def forward_step(data_iterator, model, metrics_domains: bool = False, num_domains: int = 0):
    """megatron's forward-step contract: ``(output_tensor, loss_func)``. ``num_domains`` > 0: the loss
    report also has the per-domain sums (evaluation, :func:`loss_func`)."""
    from megatron.core import parallel_state

    batch = next(data_iterator)
    if parallel_state.get_context_parallel_world_size() > 1:
        from megatron.core.utils import get_batch_on_this_cp_rank

        batch = get_batch_on_this_cp_rank(dict(batch))
    if metrics_domains:
        from megatron_moe_spec.core import layer_metrics

        sp = model.config.sequence_parallel
        layer_metrics.set_token_domains(
            batch["domain"],
            parallel_state.get_tensor_model_parallel_rank() if sp else 0,
            parallel_state.get_tensor_model_parallel_world_size() if sp else 1,
        )
    output = model(input_ids=batch["tokens"], position_ids=batch["position_ids"], attention_mask=None,
                   labels=batch["labels"])
    domains = dict(domain=batch["domain"], num_domains=num_domains) if num_domains > 0 else {}
    return output, partial(loss_func, batch["loss_mask"], model.config.calculate_per_token_loss, **domains)


def loss_func(loss_mask: torch.Tensor, per_token: bool, per_token_loss: torch.Tensor,
              domain: Optional[torch.Tensor] = None, num_domains: int = 0):
    """Masked mean LM loss of the micro-batch; reports ``[loss_sum, num_tokens]`` under ``lm loss``.

    With ``domain`` (int64, the shape of ``loss_mask``: the domain of each input token, -1 unknown) and
    ``num_domains`` > 0 it also reports ``lm loss domains``: [num_domains, 2] float, row d = [sum of the
    masked losses of domain d's tokens, their number] (tokens of unknown domain counted in no row)."""
    losses = per_token_loss.float().view(-1)
    mask = loss_mask.view(-1).float()
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum()
    report = {"lm loss": torch.stack([loss_sum.detach(), num_tokens.detach()])}
    if domain is not None and num_domains > 0:
        report["lm loss domains"] = domain_sums(losses.detach(), mask, domain.reshape(-1), num_domains)
    if per_token:
        return loss_sum, num_tokens.to(torch.int), report
    return loss_sum / num_tokens.clamp(min=1), report


def domain_sums(losses_T: torch.Tensor, mask_T: torch.Tensor, domain_T: torch.Tensor, num_domains: int
                ) -> torch.Tensor:
    """[num_domains, 2] float32: per domain d, [sum of losses_T * mask_T over tokens of domain d, sum of
    mask_T there]. ``domain_T`` ids outside [0, num_domains) (-1: unknown, padding) are left out."""
    d = domain_T.to(losses_T.device).long()
    keep = (d >= 0) & (d < num_domains)
    idx = torch.where(keep, d, torch.zeros_like(d))
    w = mask_T * keep.float()
    out = torch.zeros(num_domains, 2, dtype=torch.float32, device=losses_T.device)
    out[:, 0].index_add_(0, idx, (losses_T * w).float())
    out[:, 1].index_add_(0, idx, w.float())
    return out


def _run_schedule(model_chunks, batches, cfg, forward_only: bool, metrics_domains: bool, num_domains: int = 0):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    iterators = [iter(batches) for _ in model_chunks]
    return get_forward_backward_func()(
        forward_step_func=partial(forward_step, metrics_domains=metrics_domains, num_domains=num_domains),
        data_iterator=iterators,
        model=model_chunks,
        num_microbatches=len(batches),
        seq_length=cfg.model.seq_length,
        micro_batch_size=cfg.training.micro_batch_size,
        forward_only=forward_only,
    )


def train_step(model_chunks, optimizer, scheduler, batches: List[Dict[str, torch.Tensor]], cfg,
               metrics_domains: bool = False):
    """Forward, backward, optimizer step, lr schedule. Returns (loss_reports, grad_norm, skipped)."""
    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    reports = _run_schedule(model_chunks, batches, cfg, forward_only=False, metrics_domains=metrics_domains)
    ok, grad_norm, _ = optimizer.step()
    if ok:
        scheduler.step(increment=1)
    return reports, grad_norm, not ok


@torch.no_grad()
def evaluate(model_chunks, step_batches, cfg, num_domains: int = 0) -> List[Dict[str, torch.Tensor]]:
    """Forward only over ``step_batches`` (a list of per-step micro-batch lists); the loss reports (with
    ``lm loss domains`` when ``num_domains`` > 0)."""
    for chunk in model_chunks:
        chunk.eval()
    reports = []
    try:
        for batches in step_batches:
            reports += _run_schedule(model_chunks, batches, cfg, forward_only=True, metrics_domains=False,
                                     num_domains=num_domains)
    finally:
        for chunk in model_chunks:
            chunk.train()
    return reports


def local_lm_loss_totals(reports) -> torch.Tensor:
    """This rank's [loss_sum, num_tokens] of ``reports`` (float64, CPU).

    Only the last pipeline stage has loss reports; every tensor-parallel rank has the same ones, so
    only TP rank 0 counts them: summed over the world (:func:`reduce_totals`) they give the sum over
    the data-parallel replicas (and context-parallel shards).
    """
    from megatron.core import parallel_state

    totals = torch.zeros(2, dtype=torch.float64)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True) and \
            parallel_state.get_tensor_model_parallel_rank() == 0:
        for item in reports:
            totals += item["lm loss"].detach().double().cpu()
    return totals


def domain_loss_totals(reports, num_domains: int) -> torch.Tensor:
    """[num_domains, 2] float64 ([loss_sum, num_tokens] per domain) of ``reports`` over the whole global
    batch, on every rank (a collective; counted once per data-parallel replica as
    :func:`local_lm_loss_totals`)."""
    from megatron.core import parallel_state

    totals = torch.zeros(num_domains, 2, dtype=torch.float64)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True) and \
            parallel_state.get_tensor_model_parallel_rank() == 0:
        for item in reports:
            if "lm loss domains" in item:
                totals += item["lm loss domains"].detach().double().cpu()
    return reduce_totals(totals)


def reduce_totals(totals: torch.Tensor) -> torch.Tensor:
    """Sum over the world (a collective: every rank), result on every rank."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
        totals = totals.to(device)
        torch.distributed.all_reduce(totals)
        totals = totals.cpu()
    return totals


def lm_loss_totals(reports) -> torch.Tensor:
    """[loss_sum, num_tokens] of ``reports`` over the whole global batch, on every rank."""
    return reduce_totals(local_lm_loss_totals(reports))
