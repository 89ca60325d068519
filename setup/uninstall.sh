#!/bin/sh
# Remove battery-aggregator from a GX device:  ./setup/uninstall.sh [options]
#
# Stops the service (svc, when present), removes /service/battery-aggregator, its line in /data/rc.local (the
# rest of the file is kept) and /data/battery-aggregator. The config (/data/setupOptions/BatteryAggregator)
# and the logs are kept unless --purge. Safe to run again.
#
# Options:
#   --root DIR     treat DIR as / (env ROOT does the same)
#   --purge        also remove the config directory and the logs
#   --no-stop      do not call svc
#   --config PATH  config file whose directory --purge removes
#                  (default /data/setupOptions/BatteryAggregator/config.json)
#   -h, --help     this text
set -u

NAME=battery-aggregator
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
APP=$ROOT/data/$NAME
SVCDIR=$APP/service
LINK=$ROOT/service/$NAME
RCLOCAL=$ROOT/data/rc.local
LOGDIR=$ROOT/var/log/$NAME
CONFIG=$ROOT$CONFIG
MARKER="# $NAME: recreate the service link at boot (setup/install.sh)"

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

# 2. Our rc.local line (everything else in the file stays as it is).
if [ -f "$RCLOCAL" ] && grep -F -q "$MARKER" "$RCLOCAL"; then
    grep -F -v "$MARKER" "$RCLOCAL" > "$RCLOCAL.new"
    cat "$RCLOCAL.new" > "$RCLOCAL" && rm -f "$RCLOCAL.new" || die 1 "cannot update $RCLOCAL"
    say "removed our line from $RCLOCAL"
fi

# 3. The app (with its dependencies and the learned state kept there).
if [ -d "$APP" ]; then
    rm -rf "$APP" || die 1 "cannot remove $APP"
    say "removed $APP"
fi

# 4. Config and logs.
CONFDIR=$(dirname "$CONFIG")
if [ "$PURGE" = 1 ]; then
    rm -rf "$CONFDIR" "$LOGDIR"
    say "removed the config ($CONFDIR) and the logs ($LOGDIR)"
elif [ -e "$CONFIG" ]; then
    say "config kept: $CONFIG (--purge removes it)"
fi
say "battery-aggregator is uninstalled"
exit 0
