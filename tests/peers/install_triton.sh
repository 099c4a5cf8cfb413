#!/bin/sh
# make triton-peer VENV: the Triton Inference Server the remote backend's tests and bench talk to, in its own
# virtualenv: nvidia-pytriton's wheel bundles the tritonserver binary and its python backend (no other backend;
# tests/peers/triton_backends/ adds an onnxruntime one in Python), and the backend stub needs numpy < 2 (numpy 2
# arrays come back as empty outputs). None of pytriton's own Python runs, so none of its dependencies are needed.
# Where it cannot be built (no python3 venv, no package index), its tests are skipped, each with the line to run.
set -eu

VENV=${1:-.venv-triton}
PINS="nvidia-pytriton==0.7.0 numpy==1.26.4 onnxruntime==1.32.0"
MARK="$VENV/.triton-peer"  # "building", then the pins once complete: this folder is ours to rebuild
HINT="make triton-peer"

[ -f "$MARK" ] && [ "$(cat "$MARK")" = "$PINS" ] && exit 0

skip() {
    echo "triton-peer: $1: the Triton tests will be skipped ($HINT)" >&2
    exit 0
}

if [ -e "$VENV" ] && [ ! -f "$MARK" ] && [ -n "$(ls -A "$VENV")" ]; then
    skip "$VENV exists and is not the Triton peer's virtualenv"
fi
command -v python3 >/dev/null 2>&1 || skip "no python3"
# The wheel's backend stubs are built for CPython 3.8 to 3.13 and load its shared libpython.
python3 -c 'import sys, sysconfig; sys.exit(not ((3, 8) <= sys.version_info[:2] <= (3, 13)
    and sysconfig.get_config_var("Py_ENABLE_SHARED")))' || skip "python3 is not a shared-library CPython 3.8 to 3.13"

echo "triton-peer: building $VENV ($PINS)" >&2
rm -rf "$VENV"
out=$(python3 -m venv "$VENV" 2>&1) || skip "python3 -m venv failed: $(echo "$out" | tail -n 1)"
echo building >"$MARK"
out=$("$VENV/bin/pip" install -q --no-deps nvidia-pytriton==0.7.0 2>&1) ||
    skip "pip install nvidia-pytriton failed: $(echo "$out" | tail -n 1)"
out=$("$VENV/bin/pip" install -q numpy==1.26.4 onnxruntime==1.32.0 2>&1) ||
    skip "pip install numpy onnxruntime failed: $(echo "$out" | tail -n 1)"
echo "$PINS" >"$MARK"
