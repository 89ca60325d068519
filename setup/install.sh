#!/bin/sh
# Install battery-aggregator on a GX device (Venus OS), from the unpacked release:
#
#   cd /data/battery-aggregator-<version> && ./setup/install.sh [options]
#
# What it does (safe to run again: it updates in place, never duplicates, never overwrites the config):
#   - copies the app (aggregator/, config_generator/, check_config.sh) to /data/battery-aggregator
#   - installs the Python dependencies into /data/battery-aggregator/lib (pip --target), from the release's
#     wheels/ directory when present, else from PyPI; numpy is optional (without it the IR estimator is off),
#     so is aiomqtt (without it the dispatcher's MQTT adapters and the cooperative are off)
#   - writes the daemontools service in /data/battery-aggregator/service (run, log/run), links it as
#     /service/battery-aggregator and adds one line to /data/rc.local that recreates the link at every boot
#   - creates /data/setupOptions/BatteryAggregator/config.json with defaults if there is none
#
# Options:
#   --root DIR     treat DIR as / (every absolute path is taken relative to DIR; env ROOT does the same)
#   --no-start     do not call svc (do not stop/start the service)
#   --no-deps      skip the Python dependency step (env BA_NO_DEPS=1)
#   --wheels DIR   take the dependencies from DIR (default: <release>/wheels when it holds wheels)
#   --offline      never use PyPI (only the wheels directory)
#   --config PATH  config file (default /data/setupOptions/BatteryAggregator/config.json)
#   -h, --help     this text
# Environment: PYTHON (default python3 on the PATH); BA_REQUIREMENTS / BA_OPTIONAL override the required and
# optional dependency lists (space separated).
#
# Exit status: 0 installed; 2 usage error; 3 Python too old (needs >= 3.11: Venus OS v3.60 or later);
# 4 installed but required dependencies are missing (the service is not started); 1 other errors.
set -u

NAME=battery-aggregator
ROOT=${ROOT:-}
NO_START=0
NO_DEPS=${BA_NO_DEPS:-0}
WHEELS=
OFFLINE=0
CONFIG=/data/setupOptions/BatteryAggregator/config.json
REQUIRED=${BA_REQUIREMENTS-"dbus-next>=0.2.3 pydantic>=2.5 jsonschema>=4.17"}
OPTIONAL=${BA_OPTIONAL-"numpy>=1.24 aiomqtt>=2.0"}

# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"

while [ $# -gt 0 ]; do
    case "$1" in
        --root) [ $# -ge 2 ] || die 2 "--root needs a directory"; ROOT=$2; shift ;;
        --root=*) ROOT=${1#--root=} ;;
        --no-start) NO_START=1 ;;
        --no-deps) NO_DEPS=1 ;;
        --wheels) [ $# -ge 2 ] || die 2 "--wheels needs a directory"; WHEELS=$2; shift ;;
        --wheels=*) WHEELS=${1#--wheels=} ;;
        --offline) OFFLINE=1 ;;
        --config) [ $# -ge 2 ] || die 2 "--config needs a path"; CONFIG=$2; shift ;;
        --config=*) CONFIG=${1#--config=} ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die 2 "unknown option: $1" ;;
    esac
    shift
done
[ "$NO_DEPS" = 1 ] || NO_DEPS=0

# Paths. ROOT is a prefix for tests (a fake /); empty on the GX.
ROOT=${ROOT%/}
if [ -n "$ROOT" ]; then
    mkdir -p "$ROOT" || die 1 "cannot create $ROOT"
    ROOT=$(cd "$ROOT" && pwd)
fi
RELEASE=$(cd "$(dirname "$0")/.." && pwd)       # the unpacked release (setup/ is inside it)
APP=$ROOT/data/$NAME
LIB=$APP/lib
SVCDIR=$APP/service
LINK=$ROOT/service/$NAME
RCLOCAL=$ROOT/data/rc.local
LOGDIR=$ROOT/var/log/$NAME
PROFILE=$ROOT/etc/profile.d/profile.sh
CONFIG=$ROOT$CONFIG
MARKER="# $NAME: recreate the service link at boot (setup/install.sh)"
[ -n "$WHEELS" ] || WHEELS=$RELEASE/wheels

# 1. Python >= 3.11 (Venus OS before v3.60 has 3.8).
PYTHON=${PYTHON:-python3}
have "$PYTHON" || die 3 "python3 not found. battery-aggregator needs Python >= 3.11 (Venus OS v3.60 or later)."
PYTHON=$(command -v "$PYTHON")
PYVER=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>&1 |
    sed -n 's/^[^0-9]*\([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p' | head -n 1)
case "$PYVER" in
    [0-9]*.[0-9]*) ;;
    *) die 3 "cannot run $PYTHON to read its version. battery-aggregator needs Python >= 3.11." ;;
esac
PYMAJOR=${PYVER%%.*}
PYMINOR=${PYVER#*.}
if [ "$PYMAJOR" -lt 3 ] || { [ "$PYMAJOR" -eq 3 ] && [ "$PYMINOR" -lt 11 ]; }; then
    die 3 "Python $PYVER is too old: battery-aggregator needs Python >= 3.11. Venus OS up to v3.5x ships Python 3.8; update the GX firmware to Venus OS v3.60 or later (Python 3.12), then run this again. Nothing was installed."
fi
say "Python $PYVER ($PYTHON): OK"

[ -d "$RELEASE/aggregator" ] || die 1 "no aggregator/ package next to setup/ in $RELEASE: run this from the unpacked release"

# 2. Stop a running service while its files are replaced.
SVC_RUNNING=0
if [ "$NO_START" = 0 ] && [ -e "$LINK" ]; then
    if have svc; then
        svc -d "$LINK" 2>/dev/null && SVC_RUNNING=1
    fi
fi

# 3. The app. Other files in $APP (the learned state: stateDir defaults to this directory) are kept.
mkdir -p "$APP" || die 1 "cannot create $APP"
rm -rf "$APP/aggregator.new"
cp -R "$RELEASE/aggregator" "$APP/aggregator.new" || die 1 "cannot copy the app to $APP"
rm -rf "$APP/aggregator.new/tests"
find "$APP/aggregator.new" -name __pycache__ -type d | while read -r d; do rm -rf "$d"; done
rm -rf "$APP/aggregator" && mv "$APP/aggregator.new" "$APP/aggregator" || die 1 "cannot replace $APP/aggregator"
if [ -d "$RELEASE/config_generator" ]; then
    rm -rf "$APP/config_generator"
    cp -R "$RELEASE/config_generator" "$APP/config_generator" || die 1 "cannot copy config_generator/"
fi
if [ -f "$RELEASE/check_config.sh" ]; then
    cp "$RELEASE/check_config.sh" "$APP/check_config.sh" && chmod 755 "$APP/check_config.sh"
fi
say "app installed in $APP"

# 4. Python dependencies into $LIB (a fresh lib.new, swapped in only when the required ones installed).
DEPS_MISSING=0
deps_importable() {
    PYTHONPATH="$LIB" "$PYTHON" -c 'import dbus_next, pydantic, jsonschema' >/dev/null 2>&1
}
install_deps() {
    if ! "$PYTHON" -m pip --version >/dev/null 2>&1; then
        if deps_importable; then
            say "pip is not installed, but dbus-next, pydantic and jsonschema are importable: dependencies OK"
        else
            DEPS_MISSING=1
            warn "pip is not installed, so the Python dependencies ($REQUIRED) cannot be installed."
            warn "On the GX run:  opkg update && opkg install python3-pip   then run this installer again."
        fi
        return
    fi
    source_args="--no-index --find-links $WHEELS"
    if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        say "installing Python dependencies from $WHEELS (no network)"
    elif [ "$OFFLINE" = 1 ]; then
        DEPS_MISSING=1
        warn "--offline and no wheels in $WHEELS: dependencies not installed"
        return
    else
        source_args=""
        say "no wheels/ in the release: installing Python dependencies from PyPI (needs internet)"
    fi
    # --only-binary: never compile on the GX. --no-compile: bytecode is written at first run.
    export PIP_ROOT_USER_ACTION=ignore
    pip_args="--disable-pip-version-check --no-input --no-warn-script-location --only-binary=:all: --no-compile --retries 2 --timeout 30"
    rm -rf "$LIB.new"
    # shellcheck disable=SC2086  # word splitting of the lists is intended
    pip_required() { rm -rf "$LIB.new"; "$PYTHON" -m pip install -q $pip_args $source_args --target "$LIB.new" $REQUIRED; }
    ok=0
    pip_required && ok=1
    if [ "$ok" = 0 ] && [ -n "$source_args" ] && [ "$OFFLINE" = 0 ]; then
        # wheels/ has nothing for this CPU/Python: its wheels plus PyPI.
        say "the wheels in $WHEELS do not fit this GX ($(uname -m), Python $PYVER): trying PyPI as well"
        source_args="--find-links $WHEELS"
        pip_required && ok=1
    fi
    if [ "$ok" = 0 ]; then
        rm -rf "$LIB.new"
        DEPS_MISSING=1
        warn "could not install the required dependencies: $REQUIRED"
        warn "pydantic needs pydantic-core, a compiled wheel for this CPU ($(uname -m)) and Python $PYVER:"
        warn "use a release whose wheels/ has it, or connect the GX to the internet and run this again."
        if [ -d "$LIB" ]; then warn "the previously installed $LIB is kept"; fi
        return
    fi
    for req in $OPTIONAL; do
        # shellcheck disable=SC2086
        if "$PYTHON" -m pip install -q $pip_args $source_args --target "$LIB.new" "$req" >/dev/null 2>&1; then
            say "optional $req: installed"
        else
            case "$req" in
                numpy*) say "optional $req: no wheel for this CPU ($(uname -m)) / Python $PYVER, skipped: the IR estimator is off (shares fall back to capacity); everything else works. If 'opkg list | grep python3-numpy' shows a package on your Venus OS, 'opkg install python3-numpy' enables it." ;;
                aiomqtt*) say "optional $req: not available, skipped: the dispatcher's MQTT adapters and the cooperative are off; everything else works" ;;
                *) say "optional $req: not available for this CPU ($(uname -m)) / Python $PYVER, skipped" ;;
            esac
        fi
    done
    rm -rf "$LIB" && mv "$LIB.new" "$LIB" || { DEPS_MISSING=1; warn "cannot replace $LIB"; return; }
    say "Python dependencies installed in $LIB"
}
if [ "$NO_DEPS" = 1 ]; then
    say "skipping the Python dependencies (--no-deps)"
else
    install_deps
fi

# 5. The daemontools service.
mkdir -p "$SVCDIR/log" || die 1 "cannot create $SVCDIR"
cat > "$SVCDIR/run.new" <<EOF
#!/bin/sh
# battery-aggregator service (written by setup/install.sh)
[ -f $PROFILE ] && . $PROFILE
export PYTHONPATH=$APP:$LIB
export PYTHONUNBUFFERED=1
exec 2>&1
exec $PYTHON -m aggregator run --config $CONFIG
EOF
cat > "$SVCDIR/log/run.new" <<EOF
#!/bin/sh
exec 2>&1
exec multilog t s25000 n4 $LOGDIR
EOF
chmod 755 "$SVCDIR/run.new" "$SVCDIR/log/run.new"
mv "$SVCDIR/run.new" "$SVCDIR/run" && mv "$SVCDIR/log/run.new" "$SVCDIR/log/run" || die 1 "cannot write the run scripts"
mkdir -p "$LOGDIR" 2>/dev/null || true

# 6. /service link now, and at every boot from /data/rc.local (/service is rebuilt in RAM at boot).
LINK_CMD="if [ -d $SVCDIR ]; then ln -sfn $SVCDIR $LINK; fi"
mkdir -p "$ROOT/service" || die 1 "cannot create $ROOT/service"
if [ -L "$LINK" ] || [ ! -e "$LINK" ]; then
    ln -sfn "$SVCDIR" "$LINK" || die 1 "cannot link $LINK"
else
    die 1 "$LINK exists and is not a link: remove it and run this again"
fi
mkdir -p "$ROOT/data"
if [ ! -f "$RCLOCAL" ]; then
    printf '#!/bin/sh\n' > "$RCLOCAL" || die 1 "cannot create $RCLOCAL"
fi
# Drop our old line (whatever its paths), then add it once: before a final "exit" if the file has one.
awk -v marker="$MARKER" -v line="$LINK_CMD  $MARKER" '
    index($0, marker) { next }
    { lines[++n] = $0 }
    END {
        at = n + 1
        for (i = n; i >= 1; i--) {
            if (lines[i] ~ /^[ \t]*$/) continue
            if (lines[i] ~ /^[ \t]*exit([ \t]|$)/) at = i
            break
        }
        for (i = 1; i <= n; i++) { if (i == at) print line; print lines[i] }
        if (at == n + 1) print line
    }' "$RCLOCAL" > "$RCLOCAL.new" && cat "$RCLOCAL.new" > "$RCLOCAL" && rm -f "$RCLOCAL.new" \
    || die 1 "cannot update $RCLOCAL"
chmod 755 "$RCLOCAL"
say "service linked: $LINK -> $SVCDIR (recreated at boot by $RCLOCAL)"

# 7. The config: created with defaults once, never overwritten.
mkdir -p "$(dirname "$CONFIG")" || die 1 "cannot create $(dirname "$CONFIG")"
if [ -e "$CONFIG" ]; then
    say "config kept: $CONFIG"
elif [ -f "$RELEASE/setup/config.default.json" ]; then
    cp "$RELEASE/setup/config.default.json" "$CONFIG" && say "default config written: $CONFIG"
else
    printf '{}\n' > "$CONFIG" && say "default config written: $CONFIG"
fi

# 8. Start.
if [ "$DEPS_MISSING" = 1 ]; then
    if [ "$NO_START" = 0 ] && have svc; then svc -d "$LINK" 2>/dev/null; fi
    say "installed, but NOT working yet: the required Python dependencies are missing (see above)."
    exit 4
fi
if [ "$NO_START" = 1 ]; then
    say "installed (--no-start: the service was not started or restarted)"
elif have svc; then
    if svc -u "$LINK" 2>/dev/null; then
        [ "$SVC_RUNNING" = 1 ] && say "service restarted" || say "service started"
    else
        say "svscan starts the service within a few seconds (svc -u $LINK to start it by hand)"
    fi
else
    say "svc (daemontools) not found: start the service with your supervisor, or run:"
    say "  PYTHONPATH=$APP:$LIB $PYTHON -m aggregator run --config $CONFIG"
fi
say "check the config with $APP/check_config.sh; logs: tail -F $LOGDIR/current | tai64nlocal"
exit 0
