#!/bin/sh
# Remove battery-aggregator from a GX device:  /data/battery-aggregator/setup/uninstall.sh [options]
#
# Stops the service, removes /service/battery-aggregator, the boot check line in /data/rc.local and the PATH
# line in root's .profile (the rest of both files is kept), and the app in /data/battery-aggregator.
# The config (/data/setupOptions/BatteryAggregator/config.json) and the learned state (its state/ directory, or
# the config's stateDir) are kept, and so is anything in the app directory that the install did not put there;
# it says what it kept and where. Only --purge removes the config, the state and the logs. Safe to run again.
#
# Options:
#   --root DIR     treat DIR as / (env ROOT does the same)
#   --purge        also remove the config, the learned state and the logs
#   --no-stop      do not call svc
#   --config PATH  the config file (default /data/setupOptions/BatteryAggregator/config.json)
#   -h, --help     this text
set -u

ROOT=${ROOT:-}
PURGE=0
NO_STOP=0
CONFIG=/data/setupOptions/BatteryAggregator/config.json

# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"

while [ $# -gt 0 ]; do
    case "$1" in
        --root) [ $# -ge 2 ] || die 2 "--root needs a directory"; ROOT=$2; shift ;;
        --root=*) ROOT=${1#--root=} ;;
        --purge) PURGE=1 ;;
        --no-stop|--no-start) NO_STOP=1 ;;
        --config) [ $# -ge 2 ] || die 2 "--config needs a path"; CONFIG=$2; shift ;;
        --config=*) CONFIG=${1#--config=} ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die 2 "unknown option: $1" ;;
    esac
    shift
done

ROOT=${ROOT%/}
if [ -n "$ROOT" ]; then
    [ -d "$ROOT" ] || die 1 "no such directory: $ROOT"
    ROOT=$(cd "$ROOT" && pwd)
fi
set_paths "$ROOT" "$ROOT$CONFIG"
PYTHON=python3
if [ -f "$APP/install.env" ]; then
    PYTHON=$(sed -n "s/^PYTHON='\(.*\)'$/\1/p" "$APP/install.env")
    have "$PYTHON" || PYTHON=python3
fi

# 1. Stop: take the link away first (so svscan does not restart it), then stop the service and its logger
#    and let their supervise processes exit.
if [ -L "$LINK" ]; then
    rm -f "$LINK"
    say "removed $LINK"
elif [ -e "$LINK" ]; then
    die 1 "$LINK is not a link: not touching it"
fi
if [ -d "$SVCDIR" ] && [ "$NO_STOP" = 0 ]; then
    if have svc; then
        svc -dx "$SVCDIR" 2>/dev/null
        svc -dx "$SVCDIR/log" 2>/dev/null
        say "service stopped"
    else
        say "svc (daemontools) not found: stop a running battery-aggregator by hand if there is one"
    fi
fi

# 2. Our lines in rc.local and root's .profile (everything else in them stays as it is).
for file in "$RCLOCAL" "$RCLOCAL.disabled" "$USER_PROFILE"; do
    if [ -f "$file" ] && grep -F -q "$MARKER" "$file"; then
        grep -F -v "$MARKER" "$file" > "$file.new"
        cat "$file.new" > "$file" && rm -f "$file.new" || die 1 "cannot update $file"
        say "removed our line from $file"
    fi
done

# 3. The app: what the install put there. Anything else (old learned state, say) stays.
STATE_DIR=$(configured_state_dir 2>/dev/null)
case "$STATE_DIR" in ""|"?") STATE_DIR=$STATE_DEFAULT ;; *) STATE_DIR=$ROOT$STATE_DIR ;; esac
if [ -d "$APP" ]; then
    for item in $APP_ITEMS; do
        rm -rf "$APP/$item" "$APP/$item.new" "$APP/$item.old" || die 1 "cannot remove $APP/$item"
    done
    left=$(foreign_files)
    if [ -z "$left" ]; then
        rmdir "$APP" 2>/dev/null
        say "removed $APP"
    elif [ "$PURGE" = 1 ] && [ "$STATE_DIR" = "$APP" ]; then
        rm -rf "$APP" && say "removed $APP with the learned state in it (--purge)"
    else
        say "removed the app from $APP; kept there, as they are not part of it:"
        say "$left"
    fi
fi

# 4. Config, learned state and logs: kept unless --purge.
if [ "$PURGE" = 1 ]; then
    rm -f "$CONFIG" "$CONFIG.last-good"
    rm -rf "$LOGDIR"
    say "removed the config ($CONFIG) and the logs ($LOGDIR) (--purge)"
    if [ "$STATE_DIR" = "$STATE_DEFAULT" ]; then
        rm -rf "$STATE_DIR" && say "removed the learned state ($STATE_DIR) (--purge)"
    elif [ -d "$STATE_DIR" ]; then
        say "kept the learned state in $STATE_DIR (the config's stateDir): remove it yourself if you want"
    fi
    rmdir "$CONFDIR" 2>/dev/null   # PackageManager's flags for BatteryAggregator, if any, stay
else
    [ -e "$CONFIG" ] && say "kept the config: $CONFIG"
    [ -d "$STATE_DIR" ] && say "kept the learned state (energy totals, shares, grid batteries): $STATE_DIR"
    say "(a release's setup/uninstall.sh --purge removes them; installing again uses them)"
fi
say "battery-aggregator is uninstalled"
exit 0
