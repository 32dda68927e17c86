#!/usr/bin/env bash
# Set up jetson-dllm on a Jetson (JetPack 6.1/6.2 = L4T 36.4: TensorRT 10.3, CUDA 12.6, Python 3.10).
#
#   ./jetson-setup.sh                  create the venv and install everything (safe to run again)
#   ./jetson-setup.sh --check          only diagnose: L4T/JetPack, TensorRT, CUDA, memory, swap, power mode
#   ./jetson-setup.sh --onnxruntime-gpu   also install onnxruntime-gpu from the Jetson wheel index
#   ./jetson-setup.sh --venv DIR       where the venv goes (default ~/.venvs/jetson-dllm)
#
# TensorRT comes from JetPack (apt python3-libnvinfer), never from pip: the venv is created with
# --system-site-packages so JetPack's `tensorrt` is importable inside it.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VENV=${JETSON_DLLM_VENV:-$HOME/.venvs/jetson-dllm}
RELEASE_FILE=${JETSON_DLLM_TEGRA_RELEASE:-/etc/nv_tegra_release}
MEMINFO=${JETSON_DLLM_MEMINFO:-/proc/meminfo}
SYSTEM_PYTHON=${JETSON_DLLM_PYTHON:-/usr/bin/python3}
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
ORT_INDEX=https://pypi.jetson-ai-lab.io/jp6/cu126
CHECK=0
WITH_ORT=0

usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; }
say() { printf '%s\n' "$*"; }
ok() { printf '  [ok]   %s\n' "$*"; }
warn() { printf '  [warn] %s\n' "$*"; }
bad() { printf '  [fail] %s\n' "$*"; PROBLEMS=$((PROBLEMS + 1)); }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

while [ $# -gt 0 ]; do
  case "$1" in
    --check) CHECK=1 ;;
    --onnxruntime-gpu) WITH_ORT=1 ;;
    --venv) [ $# -ge 2 ] || die "--venv needs a folder"; VENV=$2; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
  shift
done

PROBLEMS=0

# --- what is this machine? -----------------------------------------------------------------------------

if [ ! -r "$RELEASE_FILE" ]; then
  die "this is not a Jetson ($RELEASE_FILE not found): jetson-setup.sh is for JetPack devices; on a desktop use: pip install -e '.[train,export]'"
fi
release_line=$(head -n 1 "$RELEASE_FILE")
l4t_major=$(printf '%s' "$release_line" | sed -n 's/^# R\([0-9][0-9]*\).*/\1/p')
l4t_revision=$(printf '%s' "$release_line" | sed -n 's/.*REVISION: *\([0-9.]*\).*/\1/p')
[ -n "$l4t_major" ] || die "cannot read the L4T release from $RELEASE_FILE ('$release_line')"
l4t="$l4t_major.${l4t_revision:-0}"
case "$l4t" in
  36.4.*) jetpack="6.1/6.2" ;;
  36.3*|36.2*) jetpack="6.0" ;;
  35.*) jetpack="5.x" ;;
  *) jetpack="unknown" ;;
esac
model="unknown board"
if [ -r /proc/device-tree/model ]; then model=$(tr -d '\0' < /proc/device-tree/model); fi

say "jetson-dllm setup check"
say "  board: $model"
case "$l4t" in
  36.4.*) ok "L4T $l4t (JetPack $jetpack: TensorRT 10.3, CUDA 12.6)" ;;
  *) bad "L4T $l4t (JetPack $jetpack): jetson-dllm needs JetPack 6.1 or newer (L4T 36.4) for TensorRT 10; reflash with SDK Manager" ;;
esac

trt_version=$("$SYSTEM_PYTHON" -c 'import tensorrt; print(tensorrt.__version__)' 2>/dev/null || true)
if [ -z "$trt_version" ]; then
  bad "TensorRT Python bindings not found for $SYSTEM_PYTHON: sudo apt install python3-libnvinfer (part of JetPack)"
else
  case "$trt_version" in
    10.*) ok "TensorRT $trt_version" ;;
    *) bad "TensorRT $trt_version: jetson-dllm needs TensorRT 10.x (JetPack 6.1/6.2)" ;;
  esac
fi

if [ -x "$CUDA_HOME/bin/nvcc" ]; then
  cuda_version=$("$CUDA_HOME/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')
  case "$cuda_version" in
    12.*) ok "CUDA $cuda_version at $CUDA_HOME (pycuda builds against it)" ;;
    *) bad "CUDA $cuda_version at $CUDA_HOME: JetPack 6 ships CUDA 12.6; point CUDA_HOME at it" ;;
  esac
else
  bad "nvcc not found at $CUDA_HOME/bin: sudo apt install cuda-toolkit-12-6 (or set CUDA_HOME)"
fi

mem_kb() { awk -v k="$1" '$1 == k":" { print $2 }' "$MEMINFO"; }
mem_total=$(( $(mem_kb MemTotal) / 1024 ))
mem_avail=$(( $(mem_kb MemAvailable) / 1024 ))
swap_total=$(( $(mem_kb SwapTotal) / 1024 ))
ok "memory: ${mem_avail} MiB available of ${mem_total} MiB (CPU and GPU share it)"
if [ "$swap_total" -lt 4096 ]; then
  warn "swap is ${swap_total} MiB: engine builds for large/xlarge configs may run out of memory. Add a swap file on NVMe:"
  warn "  sudo systemctl disable nvzramconfig; sudo fallocate -l 16G /mnt/16GB.swap; sudo chmod 600 /mnt/16GB.swap"
  warn "  sudo mkswap /mnt/16GB.swap; sudo swapon /mnt/16GB.swap   (and add it to /etc/fstab)"
else
  ok "swap: ${swap_total} MiB"
fi

if command -v nvpmodel >/dev/null 2>&1; then
  mode=$(nvpmodel -q 2>/dev/null | sed -n 's/^NV Power Mode: *//p' | head -n 1)
  ok "power mode: ${mode:-unknown} (query: sudo nvpmodel -q; benchmark with the highest mode and sudo jetson_clocks)"
else
  warn "nvpmodel not found: cannot read the power mode"
fi

if [ -x "$VENV/bin/python" ]; then
  if "$VENV/bin/python" -c 'import tensorrt, pycuda.driver, jetson_dllm' 2>/dev/null; then
    ok "venv $VENV: tensorrt, pycuda and jetson_dllm import"
  else
    warn "venv $VENV exists but tensorrt/pycuda/jetson_dllm do not all import: run ./jetson-setup.sh"
  fi
else
  warn "no venv at $VENV yet: run ./jetson-setup.sh to create it"
fi

if [ "$CHECK" -eq 1 ]; then
  if [ "$PROBLEMS" -eq 0 ]; then say "all checks passed"; else say "$PROBLEMS problem(s) found"; fi
  exit $(( PROBLEMS > 0 ))
fi
[ "$PROBLEMS" -eq 0 ] || die "fix the problems above first (./jetson-setup.sh --check lists them again)"

# --- install -------------------------------------------------------------------------------------------

say "installing into $VENV"
if [ ! -x "$VENV/bin/python" ]; then
  "$SYSTEM_PYTHON" -m venv --system-site-packages "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install --upgrade pip
export PATH="$CUDA_HOME/bin:$PATH"
export CUDA_ROOT="$CUDA_HOME"
# JetPack's TensorRT bindings are built against NumPy 1.x: keep the venv on it.
"${PIP[@]}" install "numpy>=1.24,<2"
if ! "$VENV/bin/python" -c 'import pycuda.driver' 2>/dev/null; then
  "${PIP[@]}" install pycuda  # builds from source against the CUDA above
fi
"${PIP[@]}" install jetson-stats "cuda-python>=12.6,<13"
if [ "$WITH_ORT" -eq 1 ]; then
  "${PIP[@]}" install onnxruntime-gpu --index-url "$ORT_INDEX"
fi
"${PIP[@]}" install -e "${REPO}[jetson]" "numpy>=1.24,<2"
"$VENV/bin/python" -c 'import tensorrt, pycuda.driver, jetson_dllm; print("tensorrt", tensorrt.__version__, "ok")'

say ""
say "done. Next:"
say "  source $VENV/bin/activate"
say "  dllm build BUNDLE --precision fp16 --canvas 128      # engines are built here, on this device"
say "  dllm run BUNDLE --backend trt -p 'Once upon a time'"
say "for power and memory readings jtop needs its service: sudo pip3 install -U jetson-stats (outside the venv), then reboot"
say "for steady benchmarks: sudo nvpmodel -m <highest mode>; sudo jetson_clocks"
