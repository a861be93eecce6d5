#!/usr/bin/env bash
# Sets up the environment (once) and runs the test suite on CPU.
#   scripts/test.sh                 the CI suite (everything but tests marked slow)
#   scripts/test.sh -m slow         the slow multi-rank and training tests
#   scripts/test.sh tests/test_losses.py -k grad    any pytest arguments
#   MMS_MEGATRON_CORE=0.19.2 scripts/test.sh         against another megatron-core (its own environment,
#                                                    .venv-mcore-0.19.2; default 0.16.1 in .venv)
set -euo pipefail
source "$(dirname "$0")/_env.sh"
cd "$MMS_ROOT"
if [ "$#" -eq 0 ]; then
  set -- -m "not slow"
fi
exec python -m pytest "$@"
