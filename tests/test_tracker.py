"""``core.moe_tracker``: the one path to megatron-core's MoE tracker, on every tested version.

megatron-core >= 0.18 keeps the tracker in ``moe_logging.MoEMetricsTracker``; its legacy
``moe_utils`` functions warn (DeprecationWarning) on every call and ``get_moe_layer_wise_logging_tracker()``
returns a copy. These tests hold on 0.16.1 and on 0.19.2 (``.ci/run`` runs both): what ``ensure``
registers is what megatron reduces, and nothing in this package calls a deprecated tracker function.
The pipeline layout with a stage without MoE layers (the reason names are registered up front) is
test_core_parity's ``pp2_dense_first_stage`` and test_megatron_lm's
``test_pipeline_stage_without_moe_layers_reduces_with_the_others``.
"""
import warnings

import pytest
import torch

from megatron_moe_spec.core import moe_tracker

_NAME = "mms_test_tracker_entry"


def _drop(name):
    try:
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
    except ImportError:
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        get_moe_layer_wise_logging_tracker().pop(name, None)
    else:
        get_moe_metrics_tracker().metrics.pop(name, None)


def _megatron_entry(name):
    """The entry megatron itself reduces and reports (not through moe_tracker)."""
    try:
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
    except ImportError:
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        entry = get_moe_layer_wise_logging_tracker().get(name)
        return None if entry is None else entry["values"]
    entry = get_moe_metrics_tracker().metrics.get(name)
    return None if entry is None else entry.values


def test_ensure_and_record_reach_the_tracker_megatron_reduces():
    _drop(_NAME)
    try:
        assert moe_tracker.ensure(_NAME, 4) is True
        assert moe_tracker.ensure(_NAME, 4) is False
        # megatron's own tracker has the entry (from 0.18 a write into the legacy getter's copy would not)
        assert _megatron_entry(_NAME) is not None and _megatron_entry(_NAME).tolist() == [0.0] * 4
        moe_tracker.record(_NAME, torch.tensor(1.5), layer_number=3, num_layers=4)
        moe_tracker.record(_NAME, torch.tensor(0.5), layer_number=3, num_layers=4)
        assert _megatron_entry(_NAME).tolist() == [0.0, 0.0, 2.0, 0.0]
        assert moe_tracker.values(_NAME) is _megatron_entry(_NAME)
        assert _NAME in moe_tracker.recorded_names()
        moe_tracker.clear()
        assert _megatron_entry(_NAME).tolist() == [0.0] * 4
    finally:
        _drop(_NAME)


def _step_and_report_collecting_warnings():
    """One forward/backward with every loss and megatron's own aux losses on, then the driver's tracker
    reads and the name-union reduction, recording every warning raised on the way."""
    from megatron_moe_spec.core.layer_specs import get_moe_block_spec
    from megatron_moe_spec.specialization_config import SpecializationConfig
    from megatron_moe_spec.testing.tiny_gpt import TinyGPTSettings, train_step_result
    from megatron_moe_spec.training import tracker

    import functools

    spec = SpecializationConfig(sp_coeff=0.05, cp_coeff=0.05, ortho_coeff=0.05, var_coeff=0.05, metrics=True)
    settings = TinyGPTSettings(num_moe_experts=4, moe_ffn_hidden_size=32, moe_z_loss_coeff=1e-3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train_step_result(settings, functools.partial(get_moe_block_spec, spec_config=spec))
        names = ["load_balancing_loss", "z_loss", "specialization_loss", "coupling_loss"]
        moe_tracker.ensure("z_loss", 4)
        tracker._fix_z_loss_groups("z_loss")
        tracker.read(names, 1, [0, 1, 2, 3])
        moe_tracker.reduce_union(names)
        tracker.clear()
    ours = [f"{w.category.__name__} at {w.filename}:{w.lineno}: {w.message}" for w in caught
            if issubclass(w.category, (DeprecationWarning, FutureWarning)) and "megatron_moe_spec" in w.filename]
    return {"ours": ours, "tracker_names": sorted(result["tracker"])}


@pytest.mark.multirank
@pytest.mark.timeout(300)
def test_no_deprecation_warning_from_our_tracker_calls():
    from megatron_moe_spec.testing.distributed import ParallelSizes, run_distributed

    (result,) = run_distributed(_step_and_report_collecting_warnings, 1, ParallelSizes(), timeout=240)
    # the step did record megatron's and our losses through the tracker
    assert {"load_balancing_loss", "specialization_loss", "coupling_loss"} <= set(result["tracker_names"])
    assert result["ours"] == []
