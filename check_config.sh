#!/bin/sh
# Check a battery-aggregator config.json:  ./check_config.sh [--live] [PATH]
# PATH defaults to /data/setupOptions/BatteryAggregator/config.json (as on a GX). Prints OK, or every error with
# its key path, the bad value, what is allowed and its line and column; exit status 0 or 1. --live also lists
# the battery services on the bus and the role each would get.
# It runs where it lies: in the installed app, in the SetupHelper package directory or in an unpacked release
# (both use the installed app: its Python, chosen by the installer, and its dependencies), or in a checkout
# (its .venv).
here=$(cd "$(dirname "$0")" && pwd)
app=${BA_APP:-/data/battery-aggregator}
for command in "$here/bin/battery-aggregator" "$app/bin/battery-aggregator"; do
    if [ -x "$command" ]; then exec "$command" check "$@"; fi
done
if [ -x "$here/.venv/bin/python" ]; then
    PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" exec "$here/.venv/bin/python" -m aggregator check "$@"
fi
for release in "$here" "$here/release"; do
    if [ -d "$release/aggregator" ]; then
        echo "battery-aggregator is not installed: checking with python3 and its own modules" >&2
        PYTHONPATH="$release${PYTHONPATH:+:$PYTHONPATH}" exec python3 -m aggregator check "$@"
    fi
done
echo "check_config.sh: battery-aggregator is not installed ($app/bin/battery-aggregator not found)" >&2
exit 2
