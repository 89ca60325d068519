"""A simulated day per current-ratio method: how safe and how wasteful is each bank charge limit?

    .venv/bin/python bench/limits_day.py [--step 20] [--methods share,ir,capacity,count] [--load steady]

Physics: parallel LiFePO4 packs with different resistance, capacity, age and state of charge
(aggregator.simulator.physics), on one bus. Solar offers more current than the bank can take around noon;
the house takes a base load with appliances switching on and off minute by minute (`--load steady`: the base
alone, a day on which nothing ever switches); the charger delivers min(offered, published CCL). Each tick the
published CCL comes from the real charge-limit controller (the same code the service runs) fed with the
packs' own values.

Figures per method:
- worst over-current: the largest (I_k - CCL_k) / CCL_k of any pack (packs with CCL_k >= 5 A) that the
  published limit causes, i.e. beyond what the pack carries at the oracle's limit (a pack far behind the
  others takes circulating current from them even at 0 A bank current; no bank limit prevents that), after
  the first hour (convergence) and over the whole day;
- energy lost: solar energy refused because the published CCL was below what the packs could really take
  (an oracle that knows the true split finds the highest bank current with every pack within its CCL);
- tightness: while the published CCL holds the charger back (more is offered), how close the most loaded pack
  gets to what it may carry (its own CCL, or what it carries at the oracle's limit if that is more): the
  median and the lowest over the day after the first hour. 100% is the most the bank can take.
"""
from __future__ import annotations

import argparse
import logging
import math
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aggregator.charge_control import ChargeControl, MemberInput  # noqa: E402
from aggregator.config import parse_config  # noqa: E402
from aggregator.limits import DvccLimits  # noqa: E402
from aggregator.sanitize import check_values  # noqa: E402
from aggregator.simulator.physics import Bank, Pack, PackParams  # noqa: E402

PACKS = [
    PackParams(name="A 280Ah", service="a", capacity_ah=280, r_mohm=6, soc=20, temperature_c=22,
               max_charge_current=140, max_discharge_current=200),
    PackParams(name="B 200Ah aged", service="b", capacity_ah=200, soh=85, r_mohm=11, soc=30, temperature_c=24,
               max_charge_current=100, max_discharge_current=150),
    PackParams(name="C 100Ah", service="c", capacity_ah=100, r_mohm=8, soc=15, temperature_c=23,
               max_charge_current=50, max_discharge_current=100),
    PackParams(name="D 150Ah", service="d", capacity_ah=150, r_mohm=16, soc=25, temperature_c=21,
               max_charge_current=75, max_discharge_current=120),
]
DAY = 86400.0
SOLAR_PEAK = 320.0  # A offered at noon: more than the bank takes
LOAD = 15.0  # A: the base load
APPLIANCES = ((30.0, 0.15), (12.0, 0.3))  # A, and the chance it is on in a given minute: an oven, a pump


def load(t: float, household: bool = True) -> float:
    """The house's load (A): the base, and with `household` the appliances that are on in this minute."""
    if not household:
        return LOAD
    minute = random.Random(int(t // 60) * 7919 + 13)  # the same day every run
    return LOAD + sum(amps for amps, chance in APPLIANCES if minute.random() < chance)


def offered(t: float, household: bool = True) -> float:
    """Bank current the solar charger could deliver minus the load (A, + charging)."""
    hour = (t / 3600.0 + 5.0) % 24.0  # the day starts at 05:00
    solar = SOLAR_PEAK * math.sin(math.pi * (hour - 6.0) / 12.0) if 6.0 <= hour <= 18.0 else 0.0
    return solar - load(t, household)


def oracle_limit(bank: Bank, ceiling: float) -> tuple[float, list[float]]:
    """The bank current actually taken at the highest request <= ceiling at which no pack exceeds its own CCL
    (bisection on the physics)."""
    limits = [p.limits().ccl for p in bank.packs]

    def fits(current: float) -> bool:
        state = bank.solve(current)
        return all(i <= ccl + 1e-6 for i, ccl in zip(state.currents, limits))

    if not fits(ceiling):
        lo, hi = 0.0, ceiling
        for _ in range(30):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        ceiling = lo
    # What the bank really takes there (packs whose BMS opened the charge FET take nothing), and each pack.
    state = bank.solve(ceiling)
    return state.i_actual, state.currents


def run_day(method: str, step: float, household: bool = True) -> dict[str, float]:
    config = parse_config({"currentRatioMethod": method})  # the service defaults
    control = ChargeControl(config)
    packs = [Pack(p, seed=1) for p in PACKS]
    bank = Bank(packs)
    worst_after = worst_all = 0.0
    lost_wh = charged_wh = 0.0
    loads: list[float] = []  # the most loaded pack's current / what it may carry, while the CCL binds
    t = 0.0
    while t < DAY:
        inputs = [MemberInput(p.service, p.name, check_values(p.values())[0], True) for p in packs]
        control.observe(inputs, t)
        published = control.update(inputs, DvccLimits(), t).ccl
        request = offered(t, household)
        if request > 0:
            current = request if published is None else min(request, published)
            best, ideal = oracle_limit(bank, request)
            own = [p.limits().ccl for p in packs]
        else:
            current, best, own, ideal = request, request, [], []
        state = bank.step(current, step)
        held_back = published is not None and request > published
        load = 0.0
        for i_k, ccl, i_ideal in zip(state.currents, own, ideal):
            # Only what the published limit causes: a pack that is behind the others takes circulating
            # current from them even at 0 A bank current, which no bank limit can prevent.
            allowed = max(ccl, i_ideal)
            if allowed > 0:
                load = max(load, i_k / allowed)
            if ccl >= 5.0 and i_k > allowed:
                excess = (i_k - allowed) / ccl
                worst_all = max(worst_all, excess)
                if t >= 3600.0:
                    worst_after = max(worst_after, excess)
        if held_back and load > 0 and t >= 3600.0:
            loads.append(load)
        if request > 0:
            lost_wh += max(0.0, best - state.i_actual) * state.voltage * step / 3600.0
            charged_wh += max(0.0, state.i_actual) * state.voltage * step / 3600.0
        t += step
    return {"worst_after_pct": 100 * worst_after, "worst_all_pct": 100 * worst_all,
            "load_median_pct": 100 * statistics.median(loads) if loads else math.nan,
            "load_min_pct": 100 * min(loads) if loads else math.nan,
            "lost_kwh": lost_wh / 1000, "charged_kwh": charged_wh / 1000,
            "final_soc": sum(p.soc * p.capacity_eff_ah for p in packs) / sum(p.capacity_eff_ah for p in packs)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--step", type=float, default=5.0, help="simulated seconds per tick")
    parser.add_argument("--methods", default="share,ir,capacity,count")
    parser.add_argument("--load", choices=("household", "steady"), default="household",
                        help="appliances switching on and off over the base load, or the base alone")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # the over-current guard's warnings are counted in the figures
    print(f"simulated day, {len(PACKS)} packs ({', '.join(p.name for p in PACKS)}), solar peak "
          f"{SOLAR_PEAK:g} A, {args.load} load, {args.step:g} s ticks")
    print("| method | worst member over-current after 1 h | worst over the whole day | most loaded pack at the "
          "bank's CCL (median / lowest) | solar energy lost to a too-low CCL | energy charged |")
    print("|---|---|---|---|---|---|")
    for method in args.methods.split(","):
        started = time.perf_counter()
        r = run_day(method, args.step, args.load == "household")
        print(f"| {method} | {r['worst_after_pct']:.1f}% | {r['worst_all_pct']:.1f}% | "
              f"{r['load_median_pct']:.0f}% / {r['load_min_pct']:.0f}% | {r['lost_kwh']:.2f} kWh | "
              f"{r['charged_kwh']:.1f} kWh |  ({time.perf_counter() - started:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
