# Shared by ./start.sh and ./test.sh (sourced, not run): the project-local virtual
# environments and the system packages they need.
#
# A venv is rebuilt only when what it was built from changes: its name, the torch pins,
# the base Python, and the contents of its requirement files. That fingerprint is
# written to DIR/.setup-stamp after a successful build; a later run with the same
# fingerprint reuses the venv at once.
#
# Knobs (environment): PYTHON (the base interpreter; default python3.11, else python3),
# REBUILD=1 (build the venv again even if its stamp matches).

# torch first and pinned: an unpinned torch would pull a multi-GB build.
TORCH_REQS=(torch==2.14.1 torchvision==0.29.1)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

say() { printf '[%s] %s\n' "${SETUP_NAME:-setup}" "$*"; }
die() { printf '[%s] ERROR: %s\n' "${SETUP_NAME:-setup}" "$*" >&2; exit 2; }

pick_python() {
    if [ -n "${PYTHON:-}" ]; then
        command -v "$PYTHON" >/dev/null || die "PYTHON=$PYTHON not found"
    elif command -v python3.11 >/dev/null; then
        PYTHON=python3.11
    elif command -v python3 >/dev/null; then
        PYTHON=python3
    else
        die "no python3 found: install Python 3.10+ (Debian/Ubuntu: apt-get install python3)"
    fi
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
        || die "$PYTHON is $("$PYTHON" -V 2>&1); Python 3.10 or newer is needed"
}

apt_install() {
    # apt_install PKG...: install Debian/Ubuntu packages (root only), one apt at a time.
    [ "$(id -u)" = 0 ] || { say "not root: cannot apt-get install $*"; return 1; }
    command -v apt-get >/dev/null || { say "no apt-get here: install $* yourself"; return 1; }
    mkdir -p "$ROOT/.venv-test"
    (
        # parallel ./test.sh runs (CI builds two venvs at once) must not race for apt's lock
        flock 9
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q && apt-get install -y -q "$@"
    ) 9>"$ROOT/.venv-test/.apt.lock"
}

ensure_venv_module() {
    # Debian/Ubuntu ship `python3 -m venv` separately (python3-venv / python3.X-venv).
    "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null && return 0
    local ver
    ver=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    say "$PYTHON has no venv/ensurepip module: installing python3-venv python$ver-venv"
    apt_install python3-venv "python$ver-venv" || die "cannot create a venv: apt-get install python$ver-venv"
}

venv_stamp() {
    # venv_stamp NAME PIP_ARGS...: the fingerprint of everything that decides what the venv
    # holds: its name, the torch pins, the base Python and every file named by -r or -c.
    local name=$1; shift
    {
        echo "$name ${TORCH_REQS[*]} $*"
        "$PYTHON" -c 'import sys; print(sys.version, sys.executable)'
        local prev=""
        for arg in "$@"; do
            case $prev in -r|-c) echo "== $arg"; cat "$ROOT/$arg" ;; esac
            prev=$arg
        done
    } | sha256sum | cut -d' ' -f1
}

# A venv with torch's build from this disk holds about 6.7 GB; pip needs room to unpack.
VENV_MIN_FREE_GB=${VENV_MIN_FREE_GB:-8}

check_disk() {
    # check_disk DIR: refuse to start a build that cannot fit, instead of failing halfway
    # with pip's "No space left on device" buried in its output.
    mkdir -p "$1"
    local free_kb
    free_kb=$(df -Pk "$1" | awk 'NR == 2 {print $4}')
    if [ -n "$free_kb" ] && [ "$free_kb" -lt $(( VENV_MIN_FREE_GB * 1024 * 1024 )) ]; then
        say "ERROR: only $(( free_kb / 1024 )) MB free under $1; a venv needs about ${VENV_MIN_FREE_GB} GB" \
            "(free some space, or set VENV_MIN_FREE_GB if you know it fits)"
        return 1
    fi
}

pip_install() {
    # pip_install PY ARGS...: `PY -m pip install ARGS` from the project root, tried up to 3
    # times. A registry that drops a connection mid-download fails pip as a whole; the
    # retry reuses what pip already has in its cache. A real conflict fails 3 times, fast.
    local py=$1; shift
    local attempt
    for attempt in 1 2 3; do
        say "pip install $* (attempt $attempt of 3)"
        (cd "$ROOT" && "$py" -m pip install --retries 10 --timeout 60 "$@") && return 0
        say "pip install failed (exit $?); free space: $(df -Ph "$ROOT" | awk 'NR == 2 {print $4}')"
        [ "$attempt" -lt 3 ] && sleep $(( attempt * 15 ))
    done
    return 1
}

ensure_venv() {
    # ensure_venv DIR NAME PIP_ARGS...: build DIR unless its stamp is current. PIP_ARGS are
    # pip's own (-r FILE, -c FILE), relative to the project root, after torch is in.
    local dir=$1 name=$2; shift 2
    pick_python
    local stamp
    stamp=$(venv_stamp "$name" "$@")
    if [ "${REBUILD:-0}" != 1 ] && [ -f "$dir/.setup-stamp" ] && [ "$(cat "$dir/.setup-stamp")" = "$stamp" ]; then
        say "reusing $dir (inputs unchanged)"
        return 0
    fi
    ensure_venv_module
    rm -rf "$dir"
    check_disk "$(dirname "$dir")" || return 1
    say "building $dir with $PYTHON ($("$PYTHON" -V 2>&1))"
    "$PYTHON" -m venv "$dir" || return 1
    local py="$dir/bin/python"
    export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off
    pip_install "$py" "${TORCH_REQS[@]}" || return 1
    # the torch pins again, so the resolver can never move them
    pip_install "$py" "${TORCH_REQS[@]}" "$@" || return 1
    "$py" -m pip check || say "WARNING: pip check reports conflicts (above)"
    echo "$stamp" > "$dir/.setup-stamp"
    say "built $dir"
}
