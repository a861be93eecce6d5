"""The CPU backend: explicit, reversible, inert when CUDA is present, and each patch correct."""
import pytest
import torch

from megatron_moe_spec import cpu
from megatron_moe_spec.testing.distributed import ParallelSizes, run_distributed


@pytest.fixture
def backend():
    assert cpu.enable()
    yield
    cpu.disable()


def test_enable_does_nothing_when_cuda_is_available(monkeypatch):
    original = torch.cuda.current_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cpu.enable() is False
    assert not cpu.is_enabled()
    assert torch.cuda.current_device is original


def test_disable_restores_every_patched_attribute():
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.transformer import torch_norm
    from megatron.core.transformer.moe import token_dispatcher

    before = (torch.cuda.current_device, torch.cuda.Stream, schedules.torch, torch.Tensor.cuda,
              torch_norm.WrappedTorchNorm.__new__, token_dispatcher.maybe_move_tensor_to_cpu)
    assert cpu.enable()
    try:
        assert cpu.is_enabled()
        assert torch.cuda.current_device() == torch.device("cpu")
        assert schedules.torch is not torch
    finally:
        cpu.disable()
    after = (torch.cuda.current_device, torch.cuda.Stream, schedules.torch, torch.Tensor.cuda,
             torch_norm.WrappedTorchNorm.__new__, token_dispatcher.maybe_move_tensor_to_cpu)
    assert all(a is b for a, b in zip(before, after))
    assert not cpu.is_enabled()


def test_cuda_literals_become_cpu_tensors(backend):
    from megatron.core.transformer.utils import get_default_causal_mask

    mask = get_default_causal_mask(4)
    assert mask.device.type == "cpu"
    assert torch.equal(mask, torch.triu(torch.ones(4, 4), diagonal=1).bool())
    assert torch.ones(2).cuda().device.type == "cpu"


def test_split_sizes_reach_all_to_all_as_numbers(backend):
    from megatron.core.transformer.moe import token_dispatcher

    sizes = token_dispatcher.maybe_move_tensor_to_cpu(torch.tensor([3, 1]), as_numpy=True)
    assert list(sizes) == [3, 1]
    assert not torch.is_tensor(sizes)


def test_rng_tracker_forks_the_cpu_generator(backend):
    from megatron.core.tensor_parallel import random as mrandom

    mrandom.initialize_rng_tracker(force_reset=True)
    tracker = mrandom.get_cuda_rng_tracker()
    torch.manual_seed(0)
    tracker.add("model-parallel-rng", 5)
    outside_before = torch.get_rng_state()
    with tracker.fork("model-parallel-rng"):
        forked = torch.rand(3)
    # The outer state is untouched by the fork, and the fork drew from seed 5.
    assert torch.equal(torch.get_rng_state(), outside_before)
    assert torch.equal(forked, torch.rand(3, generator=torch.Generator().manual_seed(5)))
    # A second fork continues the named stream instead of restarting it.
    with tracker.fork("model-parallel-rng"):
        again = torch.rand(3)
    expected = torch.rand(6, generator=torch.Generator().manual_seed(5))[3:]
    assert torch.equal(again, expected)


def test_norm_accepts_sequence_parallel_and_marks_its_params(backend):
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, normalization="RMSNorm",
                               sequence_parallel=True, tensor_model_parallel_size=2,
                               **cpu.cpu_model_config_overrides())
    norm = WrappedTorchNorm(config, 8)
    assert isinstance(norm, torch.nn.RMSNorm)
    assert all(getattr(p, "sequence_parallel", False) for p in norm.parameters())
    assert config.sequence_parallel  # the caller's config is not modified


def uneven_collectives():
    import torch.distributed as dist
    from megatron.core.tensor_parallel import mappings

    group = dist.group.WORLD
    rank = dist.get_rank()
    sizes = [1, 3]
    mine = torch.arange(sizes[rank] * 2, dtype=torch.float32).view(-1, 2) + 10 * rank
    gathered = mappings._gather_along_first_dim(mine, group, output_split_sizes=sizes)
    full = torch.arange(8, dtype=torch.float32).view(4, 2) * (rank + 1)
    scattered = mappings._reduce_scatter_along_first_dim(full, group, input_split_sizes=sizes)
    return gathered, scattered


def test_uneven_gather_and_reduce_scatter_over_gloo():
    results = run_distributed(uneven_collectives, 2, ParallelSizes(), timeout=120)
    expected_gather = torch.cat([torch.arange(2.0).view(1, 2), torch.arange(6.0).view(3, 2) + 10])
    full_sum = torch.arange(8, dtype=torch.float32).view(4, 2) * 3  # rank 0 x1 + rank 1 x2
    for rank, (gathered, scattered) in enumerate(results):
        assert torch.equal(gathered, expected_gather)
        assert torch.equal(scattered, full_sum[:1] if rank == 0 else full_sum[1:])


def test_gradient_clipping_scales_cpu_grads(backend):
    from megatron.core.optimizer import clip_grads, optimizer

    assert optimizer.clip_grad_by_total_norm_fp32 is clip_grads.clip_grad_by_total_norm_fp32
    p, q = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
    p.grad, q.grad = torch.tensor([3.0, 4.0]), torch.tensor([12.0])
    optimizer.clip_grad_by_total_norm_fp32([p, q], max_norm=1.0, total_norm=13.0)
    scale = 1.0 / (13.0 + 1e-6)
    assert torch.allclose(p.grad, torch.tensor([3.0, 4.0]) * scale) and torch.allclose(q.grad, torch.tensor([12.0]) * scale)
    optimizer.clip_grad_by_total_norm_fp32([p], max_norm=10.0, total_norm=0.5)  # below the max: untouched
    assert torch.allclose(p.grad, torch.tensor([3.0, 4.0]) * scale)
    with pytest.raises(AssertionError):  # fp32 gradients only, as megatron asserts (for CUDA tensors)
        r = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
        r.grad = torch.ones(1, dtype=torch.float64)
        optimizer.clip_grad_by_total_norm_fp32([r], max_norm=1.0, total_norm=2.0)
