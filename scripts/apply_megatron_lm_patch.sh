#!/usr/bin/env bash
# Apply megatron-moe-spec's integration patch to a Megatron-LM checkout.
#
#   scripts/apply_megatron_lm_patch.sh MEGATRON_LM_DIR [REF]
#
# patches/megatron-lm.index maps each checked Megatron-LM ref (core_v0.16.1, core_v0.17.1, core_v0.18.0,
# core_v0.18.2, core_v0.19.0, main) to its patch; one patch serves several refs. REF picks the patch of
# that ref. Without REF, a git checkout at one of the index's tags uses that tag's patch; otherwise
# every patch of the index is tried with `git apply --check` and the one that applies is used.
# Nothing is changed unless `git apply --check` passes. Re-running on a patched tree is a no-op.
# docs/megatron_lm.md has the details.
set -euo pipefail

usage() { echo "usage: $0 MEGATRON_LM_DIR [REF]" >&2; exit 2; }
[ "$#" -ge 1 ] && [ "$#" -le 2 ] || usage
here="$(cd "$(dirname "$0")/.." && pwd)"
index="$here/patches/megatron-lm.index"
dir="$1"
ref="${2:-}"
[ -d "$dir" ] || { echo "error: $dir is not a directory" >&2; exit 2; }
dir="$(cd "$dir" && pwd)"
if [ ! -f "$dir/pretrain_gpt.py" ] || [ ! -d "$dir/megatron/training" ]; then
  echo "error: $dir does not look like a Megatron-LM checkout (no pretrain_gpt.py / megatron/training)" >&2
  exit 2
fi

refs=(); patches=()  # the index, in order; patches: distinct, in order
while read -r r p _; do
  case "$r" in ''|'#'*) continue ;; esac
  [ -f "$here/patches/$p" ] || { echo "error: $index names a missing patch: $p" >&2; exit 2; }
  refs+=("$r")
  case " ${patches[*]-} " in *" $p "*) ;; *) patches+=("$p") ;; esac
done < "$index"
patch_of() { awk -v r="$1" '$1 == r { print $2; exit }' "$index"; }

# git apply on the checkout's own root (paths in the patches are relative to it).
apply() { (cd "$dir" && git apply "$@"); }

patch=""
if [ -n "$ref" ]; then
  patch="$(patch_of "$ref")"
  [ -n "$patch" ] || { echo "error: no patch for '$ref'; supported: ${refs[*]}" >&2; exit 2; }
elif git -C "$dir" rev-parse --show-toplevel >/dev/null 2>&1 \
   && [ "$(git -C "$dir" rev-parse --show-toplevel)" = "$dir" ]; then
  tag="$(git -C "$dir" describe --tags --exact-match HEAD 2>/dev/null || true)"
  if [ -n "$tag" ]; then
    patch="$(patch_of "$tag")"
    [ -n "$patch" ] && ref="$tag" \
      || echo "note: $dir is at tag $tag, which is not in patches/megatron-lm.index; trying the patches" >&2
  fi
fi

if [ -z "$patch" ]; then
  for p in "${patches[@]}"; do
    if apply --reverse --check "$here/patches/$p" 2>/dev/null; then
      echo "$dir already has the megatron-moe-spec patch $p; nothing to do"; exit 0
    fi
  done
  for p in "${patches[@]}"; do
    if apply --check "$here/patches/$p" 2>/dev/null; then patch="$p"; break; fi
  done
  if [ -z "$patch" ]; then
    echo "error: no shipped patch applies cleanly to $dir." >&2
    echo "  checked Megatron-LM refs: ${refs[*]}" >&2
    echo "  check out one of them (git checkout core_v0.19.0), or port the hunks by hand: each is a" >&2
    echo "  one-line call into megatron_moe_spec.megatron_lm (docs/megatron_lm.md, 'What the patch changes')." >&2
    exit 1
  fi
  echo "detected: patches/$patch applies"
fi

if apply --reverse --check "$here/patches/$patch" 2>/dev/null; then
  echo "$dir already has the megatron-moe-spec patch $patch; nothing to do"; exit 0
fi
if ! check_out="$(apply --check -v "$here/patches/$patch" 2>&1)"; then
  echo "$check_out" >&2
  echo "error: patches/$patch does not apply cleanly to $dir (nothing was changed)." >&2
  echo "  is the checkout at ${ref:-one of: ${refs[*]}} with no local edits to the patched files? (git -C $dir status)" >&2
  exit 1
fi
apply "$here/patches/$patch"
echo "applied patches/$patch to $dir:"
grep '^+++ b/' "$here/patches/$patch" | sed 's|^+++ b/|  |'
echo "megatron_moe_spec must be importable by pretrain_gpt.py (pip install -e $here, or PYTHONPATH)."
