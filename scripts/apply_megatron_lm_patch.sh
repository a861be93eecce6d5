#!/usr/bin/env bash
# Apply megatron-moe-spec's integration patch to a Megatron-LM checkout.
#
#   scripts/apply_megatron_lm_patch.sh MEGATRON_LM_DIR [TAG]
#
# TAG is a Megatron-LM tag with a patch in patches/ (megatron-lm-TAG.patch), e.g. core_v0.16.1 or
# core_v0.19.0. Without TAG the checkout's exact tag is used when it is a git checkout of one;
# otherwise every shipped patch is tried with `git apply --check` and the one that applies is used.
# Nothing is changed unless `git apply --check` passes. Re-running on a patched tree is a no-op.
# docs/megatron_lm.md has the details.
set -euo pipefail

usage() { echo "usage: $0 MEGATRON_LM_DIR [TAG]" >&2; exit 2; }
[ "$#" -ge 1 ] && [ "$#" -le 2 ] || usage
here="$(cd "$(dirname "$0")/.." && pwd)"
dir="$1"
tag="${2:-}"
[ -d "$dir" ] || { echo "error: $dir is not a directory" >&2; exit 2; }
dir="$(cd "$dir" && pwd)"
if [ ! -f "$dir/pretrain_gpt.py" ] || [ ! -d "$dir/megatron/training" ]; then
  echo "error: $dir does not look like a Megatron-LM checkout (no pretrain_gpt.py / megatron/training)" >&2
  exit 2
fi

supported=()
for p in "$here"/patches/megatron-lm-*.patch; do
  t="$(basename "$p" .patch)"; supported+=("${t#megatron-lm-}")
done

# git apply on the checkout's own root (paths in the patches are relative to it).
apply() { (cd "$dir" && git apply "$@"); }

if [ -z "$tag" ] && git -C "$dir" rev-parse --show-toplevel >/dev/null 2>&1 \
   && [ "$(git -C "$dir" rev-parse --show-toplevel)" = "$dir" ]; then
  tag="$(git -C "$dir" describe --tags --exact-match HEAD 2>/dev/null || true)"
  if [ -n "$tag" ] && [ ! -f "$here/patches/megatron-lm-$tag.patch" ]; then
    echo "note: $dir is at tag $tag, which has no patch here; trying the shipped patches" >&2
    tag=""
  fi
fi

if [ -z "$tag" ]; then
  for t in "${supported[@]}"; do
    p="$here/patches/megatron-lm-$t.patch"
    if apply --reverse --check "$p" 2>/dev/null; then
      echo "$dir already has the megatron-moe-spec patch for $t; nothing to do"; exit 0
    fi
    if apply --check "$p" 2>/dev/null; then tag="$t"; break; fi
  done
  if [ -z "$tag" ]; then
    echo "error: no shipped patch applies cleanly to $dir." >&2
    echo "  supported Megatron-LM tags: ${supported[*]}" >&2
    echo "  check out one of them (git checkout core_v0.16.1), or port the hunks by hand: each is a" >&2
    echo "  one-line call into megatron_moe_spec.megatron_lm (docs/megatron_lm.md, 'What the patch changes')." >&2
    exit 1
  fi
  echo "detected: the patch for $tag applies"
fi

patch="$here/patches/megatron-lm-$tag.patch"
if [ ! -f "$patch" ]; then
  echo "error: no patch for tag '$tag'; supported: ${supported[*]}" >&2
  exit 2
fi
if apply --reverse --check "$patch" 2>/dev/null; then
  echo "$dir already has the megatron-moe-spec patch for $tag; nothing to do"; exit 0
fi
if ! check_out="$(apply --check -v "$patch" 2>&1)"; then
  echo "$check_out" >&2
  echo "error: patches/megatron-lm-$tag.patch does not apply cleanly to $dir (nothing was changed)." >&2
  echo "  is the checkout at $tag with no local edits to the patched files? (git -C $dir status)" >&2
  exit 1
fi
apply "$patch"
echo "applied patches/megatron-lm-$tag.patch to $dir:"
grep '^+++ b/' "$patch" | sed 's|^+++ b/|  |'
echo "megatron_moe_spec must be importable by pretrain_gpt.py (pip install -e $here, or PYTHONPATH)."
