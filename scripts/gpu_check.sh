#!/usr/bin/env bash
# The GPU checks on one CUDA GPU (docs/gpu.md), in under 8 minutes, with a short markdown report.
#
#   scripts/gpu_check.sh [OUT_DIR]             report: OUT_DIR/gpu_check.md (default: $OUT, else runs/gpu_check)
#   scripts/gpu_check.sh --fetch-wheels [DIR]  on a machine with PyPI: download into DIR (default .whl) what
#                                              an offline GPU machine lacks (megatron-core for its Python)
#
# What runs: tests/test_gpu.py without its CPU variants (-m "not slow" -k "not cpu"): the GPU smoke config's
# checks, the z capture through SequentialMLP and (with Transformer Engine) TEGroupedMLP on CUDA, the losses
# in bf16 against fp32 on CUDA, one NCCL rank of configs/ci_smoke_gpu.yaml through scripts/pretrain.sh, and
# the peak memory of a step with and without the losses; and tests/test_gpu_hybrid.py (HybridModel: R_cp across
# Mamba / gated delta net layers on megatron's TE hybrid spec against a float64 reference, GPT == *E*E on CUDA),
# which needs megatron-core >= 0.19 (MMS_MEGATRON_CORE=0.19.2) and, but for the local GPT == *E*E variant,
# Transformer Engine: otherwise those tests show as skipped with the reason.
#
# Environment, as scripts/_env.sh builds it (sourced here), with these choices for a GPU machine:
#   MMS_VENV     default <repo>/.venv-gpu
#   MMS_TORCH    default: the torch that $PYTHON (python3) already has when it sees CUDA (the venv then sees
#                that interpreter's packages through a .pth file, so nothing large is installed); else
#                "torch" from the index (PyPI's Linux wheels are CUDA builds)
#   MMS_EXTRAS   default test
#   MMS_MEGATRON_CORE  default 0.16.1 (the version CI tests first; passed on to scripts/_env.sh, and the
#                version --fetch-wheels downloads)
#   MMS_WHEELS   a folder of wheels for a machine without network (default: <repo>/.whl when it exists):
#                pip then installs from it alone (PIP_NO_INDEX, PIP_FIND_LINKS)
#   MMS_GPU_CHECK_TIMEOUT  seconds for the test run (default 420)
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
MMS_MEGATRON_CORE="${MMS_MEGATRON_CORE:-0.16.1}"
export MMS_MEGATRON_CORE

if [ "${1:-}" = "--fetch-wheels" ]; then
  dir="${2:-$ROOT/.whl}"
  pyver="${MMS_GPU_PYTHON_VERSION:-3.12}"  # the GPU image's python3 (docs/gpu.md)
  mkdir -p "$dir"
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dir" \
    "megatron-core==$MMS_MEGATRON_CORE" || exit 1
  # the editable install of this package builds in an isolated environment that needs setuptools
  # (wheel < 0.46 vendors packaging, so it needs nothing more); megatron-core needs packaging >= 24.2,
  # which pip takes from here only if the machine's is older
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: -d "$dir" "setuptools>=77" "wheel<0.46" \
    "packaging>=24.2" || exit 1
  ls -1 "$dir"
  exit 0
fi

OUT_DIR="${1:-${OUT:-$ROOT/runs/gpu_check}}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
REPORT="$OUT_DIR/gpu_check.md"
LOG="$OUT_DIR/pytest.log"
t_start=$(date +%s)

fail_report() {  # a report even when the environment cannot be built
  { echo "# GPU check: NOT RUN"; echo; echo "$1"; echo; echo '```'; tail -n 40 "$OUT_DIR/setup.log" 2>/dev/null; echo '```'; } >"$REPORT"
  echo "gpu_check: $1 (report: $REPORT)" >&2
  exit 1
}

# ---------------------------------------------------------------- the environment
# MMS_GPU_CHECK_ALLOW_CPU=1: build the environment and the report on a machine without CUDA (the gpu tests
# are then skipped; only for checking this script itself).
need_cuda='sys.exit(0 if torch.cuda.is_available() or os.environ.get("MMS_GPU_CHECK_ALLOW_CPU") == "1" else 1)'
if ! "$PYTHON" -c "import os, sys, torch; $need_cuda" >/dev/null 2>&1; then
  base_torch=""
else
  base_torch="$("$PYTHON" -c "import torch; print(torch.__version__)")"
fi
export MMS_VENV="${MMS_VENV:-$ROOT/.venv-gpu}"
export MMS_EXTRAS="${MMS_EXTRAS:-test}"
if [ -z "${MMS_TORCH:-}" ]; then
  if [ -n "$base_torch" ]; then MMS_TORCH="torch==$base_torch"; else MMS_TORCH="torch"; fi
fi
export MMS_TORCH
wheels="${MMS_WHEELS:-}"
if [ -z "$wheels" ] && [ -d "$ROOT/.whl" ]; then wheels="$ROOT/.whl"; fi
if [ -n "$wheels" ]; then
  export PIP_NO_INDEX=1 PIP_FIND_LINKS="$wheels"
fi
{
  echo "[gpu_check] python $("$PYTHON" -c 'import sys; print(sys.version.split()[0])'), torch with CUDA here: ${base_torch:-none}"
  echo "[gpu_check] MMS_VENV=$MMS_VENV MMS_TORCH=$MMS_TORCH MMS_MEGATRON_CORE=$MMS_MEGATRON_CORE wheels=${wheels:-index}"
  if [ -n "$base_torch" ] && [ ! -x "$MMS_VENV/bin/python" ]; then
    # A venv that sees the interpreter's own packages (torch with CUDA, numpy, pytest, pip, setuptools, ...)
    # through a .pth file: works whether $PYTHON is a system Python or itself a venv (--system-site-packages
    # would see the base interpreter only). pip counts those packages as installed, so MMS_TORCH installs
    # nothing, and installs what is missing into the venv. --without-pip: no ensurepip needed, and no
    # bundled old setuptools shadowing the interpreter's (torch requires a newer one).
    "$PYTHON" -m venv --without-pip "$MMS_VENV" || exit 1
    site_dir="$("$MMS_VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")"
    "$PYTHON" -c "import site; print('\n'.join(site.getsitepackages()))" >"$site_dir/_mms_base_env.pth"
    "$MMS_VENV/bin/python" -m pip --version || exit 1
  fi
} >"$OUT_DIR/setup.log" 2>&1 || fail_report "could not create the virtual environment"
# A separate bash, so that _env.sh's own `set -e` holds (a subshell on the left of || would ignore it).
bash -c 'source "$1"' _ "$ROOT/scripts/_env.sh" >>"$OUT_DIR/setup.log" 2>&1 \
  || fail_report "scripts/_env.sh failed (setup.log)"
# shellcheck disable=SC1091
source "$MMS_VENV/bin/activate"
set +e
python -c "import os, sys, torch; $need_cuda" || fail_report "torch in $MMS_VENV does not see a CUDA device"
t_setup=$(( $(date +%s) - t_start ))

# ---------------------------------------------------------------- the checks
JSON_DIR="$(mktemp -d)"
cd "$ROOT"
export MMS_GPU_REPORT_DIR="$JSON_DIR" PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
t_tests=$(date +%s)
timeout "${MMS_GPU_CHECK_TIMEOUT:-420}" python -m pytest tests/test_gpu.py tests/test_gpu_hybrid.py -m "not slow" -k "not cpu" \
  -p no:cacheprovider -rA --junitxml="$OUT_DIR/junit.xml" >"$LOG" 2>&1
rc=$?
t_tests=$(( $(date +%s) - t_tests ))

# ---------------------------------------------------------------- the report
python - "$REPORT" "$OUT_DIR/junit.xml" "$JSON_DIR" "$rc" "$t_setup" "$t_tests" "$OUT_DIR/results.json" <<'EOF'
import glob, json, os, platform, subprocess, sys
import xml.etree.ElementTree as ET

report, junit, json_dir, rc, t_setup, t_tests, results_path = sys.argv[1:]
import torch

def version(name):
    try:
        from importlib.metadata import version as v
        return v(name)
    except Exception:
        return "not installed"

try:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=30).stdout.strip()
except Exception:
    smi = "nvidia-smi not available"
te = version("transformer_engine")
if te == "not installed":
    te = version("transformer-engine")
lines = [f"# GPU check: {'PASSED' if rc == '0' else 'FAILED (exit code ' + rc + ')'}", "",
         f"- GPU: {smi or (torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none (MMS_GPU_CHECK_ALLOW_CPU)')}",
         f"- Python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
         f"megatron-core {version('megatron-core')}, Transformer Engine {te}, apex {version('apex')}",
         f"- time: {t_setup} s environment, {t_tests} s tests", "",
         "| test | outcome | seconds |", "|---|---|---|"]
if os.path.exists(junit):
    for case in ET.parse(junit).getroot().iter("testcase"):
        outcome, detail = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "FAILED", "error": "ERROR", "skipped": "skipped"}[tag]
                detail = (node.get("message") or "").splitlines()[0][:160] if node.get("message") else ""
        name = case.get("name")
        lines.append(f"| `{name}` | {outcome}{': ' + detail.replace('|', '/') if detail else ''} | "
                     f"{float(case.get('time', 0)):.1f} |")
else:
    lines.append("| (no junit.xml: pytest did not finish; see pytest.log) | | |")
results = {}
for path in sorted(glob.glob(os.path.join(json_dir, "*.json"))):
    with open(path) as f:
        results[os.path.basename(path)[:-5]] = json.load(f)
with open(results_path, "w") as f:
    json.dump(results, f, indent=1, sort_keys=True)
lines += ["", "## Measured", ""]
mem = results.get("peak_memory")
if mem:
    lines.append(f"- peak memory of a bf16 step ({mem['tokens_per_micro_batch']} tokens): "
                 f"{mem['peak_bytes_without_losses'] / 2**20:.1f} MiB without the losses, "
                 f"{mem['peak_bytes_with_losses'] / 2**20:.1f} MiB with all four and the metrics "
                 f"(x{mem['ratio']:.3f}; z and y in fp32: {mem['z_and_y_fp32_bytes'] / 2**20:.1f} MiB)")
smoke = results.get("smoke")
if smoke:
    lines.append(f"- smoke run ({smoke['transformer_impl']} spec, grouped GEMM {smoke['moe_grouped_gemm']}): "
                 f"{smoke['steps']} steps, LM loss {smoke['lm_loss_first']:.3f} -> {smoke['lm_loss_last']:.3f}, "
                 f"median step {smoke['step_time_s_median'] * 1000:.0f} ms")
    last = smoke["last"]
    lines.append("- its last step: " + ", ".join(f"{k} {last[k]:.4g}" for k in sorted(last)))
for key in sorted(results):
    if key.startswith(("capture_", "bf16_")):
        lines.append(f"- {key}: `{json.dumps(results[key], sort_keys=True)}`")
lines += ["", "Full output: pytest.log; numbers: results.json (scripts/gpu_check.sh)."]
with open(report, "w") as f:
    f.write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
rm -rf "$JSON_DIR"
echo "gpu_check: report in $REPORT (total $(( $(date +%s) - t_start )) s)"
exit "$rc"
