# Sourced by the scripts in this folder: creates (once) and activates the project's virtual
# environment, and (re)installs the package when setup.py changed. Idempotent: a second run
# with an unchanged setup.py installs nothing.
#
#   MMS_VENV     where the environment lives (default: <repo>/.venv)
#   MMS_EXTRAS   which extras to install (default: test,data,report)
#   MMS_TORCH    the torch requirement (default: torch==2.13.0, the CPU build on this machine's disk;
#                on a GPU machine set it to the CUDA build you use, e.g. MMS_TORCH=torch)
set -euo pipefail
MMS_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MMS_VENV="${MMS_VENV:-$MMS_ROOT/.venv}"
MMS_EXTRAS="${MMS_EXTRAS:-test,data,report}"
MMS_TORCH="${MMS_TORCH:-torch==2.13.0}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$MMS_VENV/bin/python" ]; then
  echo "[setup] creating virtual environment in $MMS_VENV"
  "$PYTHON" -m venv "$MMS_VENV"
fi
# shellcheck disable=SC1091
source "$MMS_VENV/bin/activate"

stamp="$MMS_VENV/.mms-installed-$( (cat "$MMS_ROOT/setup.py"; echo "$MMS_EXTRAS $MMS_TORCH") | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "[setup] installing $MMS_TORCH and megatron-moe-spec[$MMS_EXTRAS] (once)"
  python -m pip install -q --upgrade pip >/dev/null
  # torch first and pinned, so that megatron-core's own dependency on torch installs nothing more.
  python -m pip install -q "$MMS_TORCH"
  python -m pip install -q -e "$MMS_ROOT[$MMS_EXTRAS]" "$MMS_TORCH"
  rm -f "$MMS_VENV"/.mms-installed-*
  touch "$stamp"
fi
