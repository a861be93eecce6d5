"""The training driver: megatron-core's machinery, wired for the specialization losses.

Read in this order (one concept per file):

- ``distributed.py``  torchrun environment -> torch.distributed (nccl on GPU, gloo + the CPU backend
  without CUDA) -> megatron-core's ``parallel_state`` -> seeds.
- ``model.py``        ``GPTModel`` chunks from ``core.layer_specs.get_moe_block_spec`` (``HybridModel``
  chunks from ``core.hybrid.get_hybrid_stack_spec`` with ``model.hybrid_layer_pattern``), megatron's
  ``DistributedDataParallel``, ``get_megatron_optimizer`` and ``OptimizerParamScheduler``.
- ``data.py``         megatron-core ``GPTDataset``s (``megatron_moe_spec.data``), partitioned per
  data-parallel rank like Megatron-LM's pretraining sampler, broadcast over tensor parallelism.
- ``step.py``         forward step / loss function, one training step (``get_forward_backward_func``,
  ``finalize_model_grads``, optimizer step, lr schedule) and evaluation (forward only).
- ``tracker.py``      the auxiliary losses from megatron's MoE tracker, reduced like Megatron-LM.
- ``checkpointing.py`` megatron-core distributed checkpoints, atomic, and resume.
- ``reporting.py``    console / progress bar, RUN_DIR/metrics.jsonl, routing.jsonl, TensorBoard, wandb.
- ``loop.py``         ``train(cfg)``: the loop that ties everything together.

Nothing here imports ``megatron_moe_spec.testing``.
"""
