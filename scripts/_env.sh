# Sourced by the scripts in this folder: creates (once) and activates the project's virtual
# environment for one megatron-core version, and (re)installs when setup.py, this file or the
# choice changed.
# Idempotent: a second run with an unchanged setup.py and settings installs nothing.
#
#   MMS_MEGATRON_CORE  the megatron-core version (default: 0.16.1). Each version gets its own
#                      environment: <repo>/.venv for 0.16.1, <repo>/.venv-mcore-<version> otherwise.
#   MMS_VENV           where the environment lives (overrides the default above)
#   MMS_EXTRAS         which extras to install (default: test,data,report)
#   MMS_TORCH          the torch requirement (default: torch==2.13.0, the CPU build on this machine's disk;
#                      on a GPU machine set it to the CUDA build you use, e.g. MMS_TORCH=torch)
#
# The install order (docs/testing.md, "megatron-core versions"): torch; megatron-core alone, without
# its dependencies and with --ignore-requires-python (0.19.x declares Python >= 3.12 but ships a cp311
# wheel); then this package with its extras, which also brings megatron-core's own dependencies
# (torch, numpy, packaging); then triton==3.9.0 from 0.19 on (pipeline_parallel/schedules.py imports it);
# on Python < 3.12 a typing.override fallback (typing_extensions') for the wheel's megatron/training.
set -euo pipefail
MMS_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MMS_MEGATRON_CORE="${MMS_MEGATRON_CORE:-0.16.1}"
if [ "$MMS_MEGATRON_CORE" = "0.16.1" ]; then
  MMS_VENV="${MMS_VENV:-$MMS_ROOT/.venv}"
else
  MMS_VENV="${MMS_VENV:-$MMS_ROOT/.venv-mcore-$MMS_MEGATRON_CORE}"
fi
MMS_EXTRAS="${MMS_EXTRAS:-test,data,report}"
MMS_TORCH="${MMS_TORCH:-torch==2.13.0}"
PYTHON="${PYTHON:-python3}"
export MMS_MEGATRON_CORE

if [ ! -x "$MMS_VENV/bin/python" ]; then
  echo "[setup] creating virtual environment in $MMS_VENV"
  "$PYTHON" -m venv "$MMS_VENV"
fi
# shellcheck disable=SC1091
source "$MMS_VENV/bin/activate"

stamp="$MMS_VENV/.mms-installed-$( (cat "$MMS_ROOT/setup.py" "$MMS_ROOT/scripts/_env.sh"; echo "$MMS_EXTRAS $MMS_TORCH $MMS_MEGATRON_CORE") | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "[setup] installing $MMS_TORCH, megatron-core==$MMS_MEGATRON_CORE and megatron-moe-spec[$MMS_EXTRAS] (once)"
  python -m pip install -q --upgrade pip >/dev/null
  # torch first and pinned, so that megatron-core's own dependency on torch installs nothing more.
  python -m pip install -q "$MMS_TORCH"
  # megatron-core alone: with --ignore-requires-python on a combined install pip would also pick
  # dependency releases for the wrong Python (numpy's newest sdist, which needs 3.12 to build).
  python -m pip install -q --no-deps --ignore-requires-python "megatron-core==$MMS_MEGATRON_CORE"
  python -m pip install -q -e "$MMS_ROOT[$MMS_EXTRAS]" "$MMS_TORCH" "megatron-core==$MMS_MEGATRON_CORE"
  case "$MMS_MEGATRON_CORE" in
    0.1[0-8].*|0.[0-9].*) ;;
    # Undeclared from 0.19: pipeline_parallel/schedules.py -> transformer/moe/ops/paged_stash.py imports triton.
    # Pinned to the release the 0.19.2 environment was tested with; a triton already there (the one a CUDA
    # torch requires, e.g. through scripts/gpu_check.sh's base interpreter) is kept.
    *) python -c "import importlib.util as u, sys; sys.exit(u.find_spec('triton') is None)" \
         || python -m pip install -q "triton==3.9.0" ;;
  esac
  # Python < 3.12 has no typing.override, which the wheel's megatron/training/models/{gpt,hybrid}.py
  # (Megatron-LM's training package, shipped in the megatron-core wheel from 0.19) import. megatron.core
  # itself takes it from typing_extensions. Give typing the same backport, in this environment only.
  python - <<'PY'
import pathlib, sys, sysconfig
pth = pathlib.Path(sysconfig.get_paths()["purelib"]) / "mms_typing_override.pth"
if sys.version_info < (3, 12):
    pth.write_text("import typing, typing_extensions; typing.override = getattr(typing, 'override', "
                   "typing_extensions.override)\n")
PY
  python -c "import importlib.metadata as m, sys; v = m.version('megatron-core'); \
sys.exit(0 if v == '$MMS_MEGATRON_CORE' else f'[setup] megatron-core {v} installed, $MMS_MEGATRON_CORE wanted')"
  rm -f "$MMS_VENV"/.mms-installed-*
  touch "$stamp"
fi
