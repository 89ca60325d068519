#!/bin/sh
# Check a battery-aggregator config.json:  ./check_config.sh [--live] [PATH]
# PATH defaults to /data/setupOptions/BatteryAggregator/config.json (as on a GX). Prints OK, or every error with
# its key path, the bad value, what is allowed and its line and column; exit status 0 or 1. --live also lists
# the battery services on the bus and the role each would get.
# It uses the installed package: the installer's private library on a GX, the project's .venv here; whatever
# python3 is on the PATH (no hard-coded version).
here=$(cd "$(dirname "$0")" && pwd)
python=python3
[ -x "$here/.venv/bin/python" ] && python="$here/.venv/bin/python"
pythonpath="$here"
for dir in "$here/lib" "$here/app"; do
    [ -d "$dir" ] && pythonpath="$pythonpath:$dir"
done
PYTHONPATH="$pythonpath${PYTHONPATH:+:$PYTHONPATH}" exec "$python" -m aggregator check "$@"
