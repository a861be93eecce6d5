#!/usr/bin/env bash
# Builds the offline multi-domain corpus, its tokenizer and the megatron-core datasets (.bin/.idx).
#   scripts/prepare_data.sh                      full build into <repo>/data (a few minutes on 2 cores)
#   scripts/prepare_data.sh /tmp/tiny --tiny     a small corpus for tests and demos (seconds)
#   scripts/prepare_data.sh OUT --vocab-size 4096 --max-bytes-per-domain 2000000 --seed 1
# Re-running with the same options reuses the existing build (manifest + checksums); see docs/data.md.
set -euo pipefail
source "$(dirname "$0")/_env.sh"
out="$MMS_ROOT/data"
if [ "$#" -gt 0 ] && [[ "$1" != -* ]]; then
  out="$1"
  shift
fi
exec python -m megatron_moe_spec.commands.prepare_data --output "$out" "$@"
