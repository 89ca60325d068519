#!/bin/sh
# Blind install of battery-aggregator from a USB stick or SD card (no SSH needed): copy venus-data.tgz (built by
# setup/release.py) to the stick and reboot the GX with it inserted. At boot Venus OS unpacks the archive into
# /data (here: /data/BatteryBankAggregator) and runs this hook, which installs the package unless this version
# is installed already (the stick may stay in). Its output goes to install.log in the package directory and to
# battery-aggregator-install.log on the stick. If pulquero's BatteryAggregator is installed, it is replaced
# only when the stick also holds a file named REPLACE_BATTERYAGGREGATOR (its config is kept and read as is);
# otherwise nothing is installed and the log says so.
ROOT=${ROOT:-}
package=$ROOT/data/BatteryBankAggregator
log=$package/install.log
new=$(cat "$package/release/VERSION" 2>/dev/null)
installed=$(cat "$ROOT/data/battery-aggregator/VERSION" 2>/dev/null)
if [ -n "$new" ] && [ "$new" = "$installed" ]; then
    exit 0
fi
option=""
for media in "$ROOT"/media/*; do
    if [ -e "$media/REPLACE_BATTERYAGGREGATOR" ]; then option=--replace-batteryaggregator; fi
done
{
    echo "$(date): blind install of battery-aggregator $new (installed: ${installed:-none})"
    ROOT=$ROOT "$package/release/setup/install.sh" --background $option
    echo "exit status $?"
} > "$log" 2>&1
for media in "$ROOT"/media/*; do
    for archive in venus-data.tgz venus-data.tar.gz; do
        if [ -f "$media/$archive" ]; then cp "$log" "$media/battery-aggregator-install.log" 2>/dev/null; fi
    done
done
exit 0
