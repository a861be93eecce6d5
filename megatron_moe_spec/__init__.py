"""megatron-moe-spec: expert-specialization losses for megatron-core MoE models.

Layers, from the bottom up (each imports only from the ones below it):

- ``losses``, ``metrics``: pure PyTorch, no Megatron import. The mathematical contract.
- ``specialization_config``: the ``SpecializationConfig`` dataclass (coefficients and options).
- ``cpu``: an explicit CPU/gloo backend for megatron-core (tests and the CPU demo only).
- ``core``: the thin megatron-core adapter (router, experts, dispatcher, MoE layer, layer specs).
- ``training``, ``cli``: the YAML-configured training driver and the command line.

Importing this package imports neither Megatron nor Transformer Engine.
"""

__version__ = "0.1.0"
