#!/usr/bin/env bash
# Set up what the tests need and run them: `./test.sh [OPTIONS] [PYTEST ARGS...]`
#
#   ./test.sh                    # current releases (the "latest" set), then python -m pytest -q tests
#   ./test.sh --deps pins        # FramePack's versions (-c requirements-framepack-pins.txt)
#   ./test.sh -k sweep -x        # anything not listed below goes to pytest
#
# Options:
#   --deps latest|pins   which dependency set (default latest); each lives in .venv-test/SET
#   --setup-only         set up (chromium, venv) and stop; no tests
#   --system-only        only the system packages (Debian's chromium, through apt)
#   --rebuild            build the venv again even if its inputs are unchanged
#   -h, --help           this text
#
# What it sets up, each step skipped when already done:
#   - Debian's chromium (/usr/bin/chromium) for the browser test, via apt-get (root only;
#     otherwise that test is skipped, or fails under CI=true);
#   - .venv-test/SET: torch==2.14.1 torchvision==0.29.1 first, then requirements.txt,
#     requirements-test.txt and requirements-ray.txt, (pins:) constrained by
#     requirements-framepack-pins.txt. It is reused while a stamp of those files, the torch
#     pins and the Python is unchanged.
# Exit code: pytest's (5 = no tests collected), or 2 for bad usage/failed setup.
set -euo pipefail

SETUP_NAME=test.sh
source "$(dirname "${BASH_SOURCE[0]}")/scripts/setup_lib.sh"
cd "$ROOT"

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }
DEPS_SETS="latest pins"

DEPS=latest MODE=all
PYTEST_ARGS=()
while [ $# -gt 0 ]; do
    case $1 in
        --deps) [ $# -ge 2 ] || die "--deps needs a value: one of: $DEPS_SETS"; DEPS=$2; shift 2 ;;
        --deps=*) DEPS=${1#--deps=}; shift ;;
        --setup-only) MODE=setup; shift ;;
        --system-only) MODE=system; shift ;;
        --rebuild) export REBUILD=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; PYTEST_ARGS+=("$@"); break ;;
        *) PYTEST_ARGS+=("$1"); shift ;;
    esac
done
case $DEPS in
    latest) PIP_ARGS=(-r requirements.txt -r requirements-test.txt -r requirements-ray.txt) ;;
    pins) PIP_ARGS=(-r requirements.txt -r requirements-test.txt -r requirements-ray.txt
                    -c requirements-framepack-pins.txt) ;;
    *) die "unknown --deps value '$DEPS': accepted values are: $DEPS_SETS" ;;
esac
VENV="$ROOT/.venv-test/$DEPS"

ensure_chromium() {
    if [ -x /usr/bin/chromium ]; then
        say "/usr/bin/chromium present"
        return 0
    fi
    say "installing Debian's chromium for the browser test"
    if ! apt_install chromium || ! /usr/bin/chromium --version >/dev/null 2>&1; then
        [ "${CI:-}" = true ] && die "no working /usr/bin/chromium (the browser test must run in CI)"
        say "WARNING: no /usr/bin/chromium: the browser test will be skipped"
    fi
}

ensure_chromium
[ "$MODE" = system ] && exit 0
ensure_venv "$VENV" "test-$DEPS" "${PIP_ARGS[@]}" || die "building $VENV failed (output above)"
[ "$MODE" = setup ] && exit 0

# Tests and tools must not reach for the network (only package registries are open).
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TRANSFORMERS_OFFLINE=1
export GRADIO_ANALYTICS_ENABLED=False DO_NOT_TRACK=1 MPLBACKEND=Agg
# shellcheck disable=SC1091
source "$VENV/bin/activate"
set +e
python -m pytest -q tests "${PYTEST_ARGS[@]}"
exit $?
