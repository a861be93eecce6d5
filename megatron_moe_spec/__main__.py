"""``python -m megatron_moe_spec`` = the ``megatron-moe-spec`` command."""
import sys

from megatron_moe_spec.cli import main

sys.exit(main())
