#!/usr/bin/env bash
# Set up what is missing and start the app: `./start.sh [--f1] [APP FLAGS...]`
#
#   ./start.sh --tiny                 # FramePack app, tiny random weights on the CPU (no GPU, no download)
#   ./start.sh                        # FramePack app, real models (NVIDIA GPU; downloads ~30 GB to ./hf_download)
#   ./start.sh --f1                   # the FramePack-F1 app (magcache_demo_gradio_f1.py)
#   ./start.sh --tiny --port 7861     # every flag but --f1 goes to the app: see ./start.sh --help-app
#
# The first run builds .venv (git-ignored): torch==2.14.1 torchvision==0.29.1 first, then
# requirements.txt. Later runs reuse it while requirements.txt, the torch pins and the
# Python are unchanged, and start at once. The app listens on 127.0.0.1 only unless you
# pass --server ADDRESS or --share.
#
# Environment: MAGCACHE_VENV=DIR runs the app with that existing venv as it is (nothing is
# installed); PYTHON=python3.X picks the interpreter the venv is built from; REBUILD=1
# builds .venv again.
set -euo pipefail

SETUP_NAME=start.sh
source "$(dirname "${BASH_SOURCE[0]}")/scripts/setup_lib.sh"
cd "$ROOT"

APP=magcache_demo_gradio.py
ARGS=()
for arg in "$@"; do
    case $arg in
        --f1) APP=magcache_demo_gradio_f1.py ;;
        --help-app) ARGS+=(--help) ;;
        -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) ARGS+=("$arg") ;;
    esac
done

if [ -n "${MAGCACHE_VENV:-}" ]; then
    VENV=$MAGCACHE_VENV
    [ -x "$VENV/bin/python" ] || die "MAGCACHE_VENV=$VENV has no bin/python"
    say "using $VENV as it is (MAGCACHE_VENV)"
else
    VENV="$ROOT/.venv"
    ensure_venv "$VENV" app -r requirements.txt || die "building $VENV failed (output above)"
fi

say "starting $APP ${ARGS[*]}"
exec "$VENV/bin/python" "$APP" "${ARGS[@]}"
