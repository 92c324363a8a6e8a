#!/usr/bin/env bash
# wan_lite launcher for Linux and macOS.
#
#   ./launch.sh [app options]     set up (first time only) and start the app in your browser
#   ./launch.sh --test [pytest options]   set up, add the test tools, run the test suite
#   ./launch.sh --check           say what would be done (Python, venv, torch build, disk) and stop
#
# First run: creates .venv inside this folder, installs torch (CUDA build when an NVIDIA GPU
# answers, CPU build otherwise) and requirements.txt. Later runs see the stamp file in the venv
# and start in seconds. Nothing outside this folder is changed.
#
# Environment: WAN_LITE_VENV (use another venv), WAN_LITE_PYTHON (Python to create it with),
# WAN_LITE_TORCH (cpu | cu128 | default: skip the GPU check), WAN_LITE_MIN_FREE_GB (disk check),
# CI=true (no browser, nothing interactive).
set -euo pipefail

TORCH_VERSION="2.13.0"
CUDA_INDEX="https://download.pytorch.org/whl/cu128"
CPU_INDEX="https://download.pytorch.org/whl/cpu"
MIN_PYTHON="3.10"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
VENV="${WAN_LITE_VENV:-$ROOT/.venv}"
STAMP="$VENV/.wan_lite_stamp"
TEST_STAMP="$VENV/.wan_lite_test_stamp"

say() { printf '[wan_lite] %s\n' "$*"; }
die() {
    printf '\n[wan_lite] PROBLEM: %s\n' "$1" >&2
    [ -n "${2:-}" ] && printf '[wan_lite] What to do: %s\n' "$2" >&2
    exit 1
}

MODE="run"
case "${1:-}" in
    --test) MODE="test"; shift ;;
    --check) MODE="check"; shift ;;
    -h|--help)
        # the comment block at the top of this file, and nothing after it
        awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"
        exit 0 ;;
esac

# --- Python ------------------------------------------------------------------------------------
version_ok() {  # "$1" is a Python; true when it is >= MIN_PYTHON
    "$1" -c "import sys; sys.exit(0 if sys.version_info[:2] >= tuple(map(int, '$MIN_PYTHON'.split('.'))) else 1)" 2>/dev/null
}

if [ -x "$VENV/bin/python" ]; then
    PY="$VENV/bin/python"
else
    PY="${WAN_LITE_PYTHON:-}"
    if [ -z "$PY" ]; then
        for candidate in python3 python; do
            if command -v "$candidate" >/dev/null 2>&1; then PY="$(command -v "$candidate")"; break; fi
        done
    fi
    [ -n "$PY" ] || die "Python is not installed (no python3 or python command found)." \
        "Install Python $MIN_PYTHON or newer from https://www.python.org/downloads/ (or your package manager), then run this again."
fi
PY_VERSION="$("$PY" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null || true)"
[ -n "$PY_VERSION" ] || die "$PY does not run as Python." \
    "Install Python $MIN_PYTHON or newer from https://www.python.org/downloads/, or point WAN_LITE_PYTHON at one."
version_ok "$PY" || die "wan_lite needs Python $MIN_PYTHON or newer, but $PY is Python $PY_VERSION." \
    "Install a newer Python from https://www.python.org/downloads/, or point WAN_LITE_PYTHON at one."

# --- Which torch build --------------------------------------------------------------------------
if [ -n "${WAN_LITE_TORCH:-}" ]; then
    TORCH_BUILD="$WAN_LITE_TORCH"
    GPU_NOTE="torch build chosen by WAN_LITE_TORCH"
elif [ "$(uname -s)" = "Darwin" ]; then
    TORCH_BUILD="default"
    GPU_NOTE="macOS: the standard torch build (Apple GPU through MPS)"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    TORCH_BUILD="cu128"
    GPU_NOTE="NVIDIA GPU found: $(nvidia-smi -L 2>/dev/null | head -n 1)"
else
    TORCH_BUILD="cpu"
    GPU_NOTE="No NVIDIA GPU answered (nvidia-smi missing or failing): using the CPU build of torch. wan_lite will start, but a video takes hours on a CPU. If you do have an NVIDIA card, install its driver and run this again."
fi
case "$TORCH_BUILD" in cpu|cu128|default) ;; *)
    die "WAN_LITE_TORCH=$TORCH_BUILD is not a torch build this launcher knows." "Use cpu, cu128 or default." ;;
esac

# --- What is installed already ----------------------------------------------------------------
hash_file() {
    if command -v sha256sum >/dev/null 2>&1; then sha256sum "$1" | cut -d' ' -f1
    elif command -v shasum >/dev/null 2>&1; then shasum -a 256 "$1" | cut -d' ' -f1
    else "$PY" -c "import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],'rb').read()).hexdigest())" "$1"
    fi
}
WANT_STAMP="torch=$TORCH_VERSION+$TORCH_BUILD requirements=$(hash_file requirements.txt)"
WANT_TEST_STAMP="$WANT_STAMP tests=$(hash_file tests/requirements.txt)"
HAVE_STAMP="$(cat "$STAMP" 2>/dev/null || true)"
UP_TO_DATE=0
[ -x "$VENV/bin/python" ] && [ "$HAVE_STAMP" = "$WANT_STAMP" ] && UP_TO_DATE=1

# --- Disk space (a fresh install with CUDA torch takes about 8 GB) ------------------------------
if [ "$UP_TO_DATE" = 1 ]; then NEED_GB="${WAN_LITE_MIN_FREE_GB:-1}"; else NEED_GB="${WAN_LITE_MIN_FREE_GB:-10}"; fi
FREE_KB="$(df -Pk "$ROOT" 2>/dev/null | awk 'NR==2 {print $4}')"
FREE_GB=$(( ${FREE_KB:-0} / 1024 / 1024 ))

if [ "$MODE" = "check" ]; then
    say "Python: $PY ($PY_VERSION)"
    say "Virtual environment: $VENV ($([ -x "$VENV/bin/python" ] && echo exists || echo 'to be created'))"
    say "torch: $TORCH_VERSION, build $TORCH_BUILD ($GPU_NOTE)"
    say "Installed and up to date: $([ "$UP_TO_DATE" = 1 ] && echo yes || echo no)"
    say "Free disk: $FREE_GB GB (needs $NEED_GB GB)"
    exit 0
fi

if [ -n "$FREE_KB" ] && [ "$FREE_GB" -lt "$NEED_GB" ]; then
    die "Only $FREE_GB GB of disk space is free in $ROOT; setting up wan_lite needs about $NEED_GB GB (models need much more, see the Models tab)." \
        "Free some space on this disk, or move the wan_lite folder to a bigger disk, and run this again."
fi

# --- Set up -------------------------------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
    say "Creating the virtual environment in $VENV (first run only)…"
    "$PY" -m venv "$VENV" || die "Python could not create a virtual environment." \
        "On Debian/Ubuntu install it with: sudo apt install python3-venv   (then run this again)"
    PY="$VENV/bin/python"
fi
VPY="$VENV/bin/python"

torch_installed() {  # true when the wanted torch build is already in the venv
    local have
    have="$("$VPY" -c 'import torch; print(torch.__version__)' 2>/dev/null || true)"
    case "$TORCH_BUILD" in
        cpu) [ "$have" = "$TORCH_VERSION+cpu" ] || { [ "$have" = "$TORCH_VERSION" ] && [ "$(uname -s)" != "Linux" ]; } ;;
        cu128) [ "$have" = "$TORCH_VERSION+cu128" ] ;;
        *) [ "${have%%+*}" = "$TORCH_VERSION" ] ;;
    esac
}

pip_install() { "$VPY" -m pip install --disable-pip-version-check "$@"; }

if [ "$UP_TO_DATE" = 1 ]; then
    say "Everything is installed already; starting."
else
    say "$GPU_NOTE"
    if torch_installed; then
        say "torch $TORCH_VERSION ($TORCH_BUILD) is already installed."
    else
        say "Installing torch $TORCH_VERSION ($TORCH_BUILD build); this downloads up to a few GB…"
        case "$TORCH_BUILD" in
            cu128)
                pip_install "torch==$TORCH_VERSION" --index-url "$CUDA_INDEX" || die "torch (CUDA build) could not be installed." \
                    "Check the internet connection and run this again; WAN_LITE_TORCH=cpu installs the CPU build instead." ;;
            cpu)
                pip_install "torch==$TORCH_VERSION" --index-url "$CPU_INDEX" --timeout 20 --retries 1 \
                    || pip_install "torch==$TORCH_VERSION" \
                    || die "torch could not be installed." "Check the internet connection and run this again." ;;
            *)
                pip_install "torch==$TORCH_VERSION" || die "torch could not be installed." \
                    "Check the internet connection and run this again." ;;
        esac
    fi
    say "Installing wan_lite's other requirements…"
    pip_install -r requirements.txt || die "The requirements in requirements.txt could not be installed." \
        "Check the internet connection and run this again; the messages above name the package that failed."
    printf '%s\n' "$WANT_STAMP" > "$STAMP"
    say "Set up finished; the next start skips all of this."
fi

if [ "$MODE" = "test" ]; then
    if [ "$(cat "$TEST_STAMP" 2>/dev/null || true)" != "$WANT_TEST_STAMP" ]; then
        say "Installing the test tools (tests/requirements.txt)…"
        pip_install -r tests/requirements.txt || die "The test requirements could not be installed." \
            "Check the internet connection and run this again."
        printf '%s\n' "$WANT_TEST_STAMP" > "$TEST_STAMP"
    fi
    say "Running the tests…"
    exec "$VPY" -m pytest "$@"
fi

say "Starting wan_lite (stop it with Ctrl+C)…"
exec "$VPY" app.py "$@"
