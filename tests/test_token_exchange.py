"""core.token_exchange.rows_to_slots: rows placed into slots, against a plain loop (values and gradients)."""
import pytest
import torch

from megatron_moe_spec.core.token_exchange import rows_to_slots


def _loop_reference(rows_NW, dest_N, num_slots):
    out = [torch.zeros(rows_NW.shape[1], dtype=rows_NW.dtype) for _ in range(num_slots)]
    for n, d in enumerate(dest_N.tolist()):
        out[d] = rows_NW[n]
    return torch.stack(out)


@pytest.mark.parametrize("num_rows, num_slots", [(12, 12), (7, 12), (0, 5), (1, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_to_slots_matches_a_loop_in_value_and_gradient(num_rows, num_slots, dtype):
    gen = torch.Generator().manual_seed(num_rows * 31 + num_slots)
    dest = torch.randperm(num_slots, generator=gen)[:num_rows]  # unique slots, in no order
    rows = torch.randn(num_rows, 6, generator=gen).to(dtype).requires_grad_()
    weight = torch.randn(num_slots, 6, generator=gen).to(dtype)  # a loss that weighs every slot differently

    got = rows_to_slots(rows, dest, num_slots)
    (grad_got,) = torch.autograd.grad((got.float() * weight.float()).sum(), rows) if num_rows else (rows,)
    ref_rows = rows.detach().clone().requires_grad_()
    ref = _loop_reference(ref_rows, dest, num_slots)
    (grad_ref,) = torch.autograd.grad((ref.float() * weight.float()).sum(), ref_rows) if num_rows else (ref_rows,)

    assert got.dtype == dtype and got.shape == (num_slots, 6)
    assert torch.equal(got, ref)  # a copy: exact
    assert torch.equal(grad_got, grad_ref)
    empty = torch.ones(num_slots, dtype=torch.bool)
    empty[dest] = False
    assert not got[empty].any()  # slots without a row are zero


def test_rows_to_slots_saves_only_the_indices():
    rows = torch.randn(8, 1000, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        rows_to_slots(rows, torch.randperm(8), 8)
    assert [t.dtype for t in saved] == [torch.long] and saved[0].numel() == 8
