"""The cooperative's ledger (pure: the caller gives the powers, the time and the stream): each household's meters
over the settlement period, and what the cooperative owes it for balancing."""
from __future__ import annotations

import csv
from dataclasses import dataclass, fields
from typing import IO, Any


@dataclass(slots=True)
class Account:
    """One household's meters over the settlement period, kWh."""

    production: float = 0.0  # P
    load: float = 0.0
    stored: float = 0.0  # net into the battery
    grid_import: float = 0.0  # L
    grid_export: float = 0.0  # T
    transfer_import: float = 0.0  # the part of L taken to charge for the fleet's balance
    transfer_export: float = 0.0  # the part of T delivered for the others

    @property
    def use(self) -> float:
        """V: the household's own use, its load plus what it stored."""
        return self.load + self.stored

    @property
    def balance_error(self) -> float:
        """V - (P + L - T): zero when the meters agree (losses, missed samples otherwise)."""
        return self.use - (self.production + self.grid_import - self.grid_export)

    @property
    def net_transfer(self) -> float:
        """What the cooperative owes the household (+) for balancing: delivered minus taken."""
        return self.transfer_export - self.transfer_import


class Ledger:
    """Metering per site, so the cooperative can settle. Per household, over a period,

        V = P + L - T

    V use: its load plus the energy it stored (net, into its battery);
    P production: what its panels delivered (curtailed production is not produced);
    L import ("levering"): energy taken from the grid;
    T export ("teruglevering"): energy delivered to the grid.

    The transfer is the cooperative's part of L and T: the energy a site imported because the fleet asked it
    to charge (transfer import) and the energy it delivered for the others (transfer export). The metered
    transfer is the commanded transfer as far as the grid meter shows it flowing that way:
    transfer import = min(T+, grid import), transfer export = min(T-, grid export)."""

    FIELDS = ("site", "production_kwh", "load_kwh", "stored_kwh", "use_kwh", "import_kwh", "export_kwh",
              "transfer_import_kwh", "transfer_export_kwh", "net_transfer_kwh", "balance_error_kwh")

    def __init__(self) -> None:
        self.accounts: dict[str, Account] = {}

    def record(self, site_id: str, seconds: float, *, production_w: float, load_w: float, battery_w: float,
               grid_w: float, transfer_w: float = 0.0) -> Account:
        """Add `seconds` at these (average) powers."""
        a = self.accounts.setdefault(site_id, Account())
        h = seconds / 3_600_000.0  # W*s -> kWh
        a.production += production_w * h
        a.load += load_w * h
        a.stored += battery_w * h
        a.grid_import += max(grid_w, 0.0) * h
        a.grid_export += max(-grid_w, 0.0) * h
        a.transfer_import += min(max(transfer_w, 0.0), max(grid_w, 0.0)) * h
        a.transfer_export += min(max(-transfer_w, 0.0), max(-grid_w, 0.0)) * h
        return a

    def merge(self, site_id: str, account: Account) -> None:
        """Add an account metered elsewhere (a site's own ledger) under `site_id`."""
        mine = self.accounts.setdefault(site_id, Account())
        for f in fields(Account):
            setattr(mine, f.name, getattr(mine, f.name) + getattr(account, f.name))

    def totals(self) -> Account:
        total = Account()
        for a in self.accounts.values():
            for f in fields(Account):
                setattr(total, f.name, getattr(total, f.name) + getattr(a, f.name))
        return total

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for site in sorted(self.accounts):
            a = self.accounts[site]
            out.append({"site": site, "production_kwh": a.production, "load_kwh": a.load, "stored_kwh": a.stored,
                        "use_kwh": a.use, "import_kwh": a.grid_import, "export_kwh": a.grid_export,
                        "transfer_import_kwh": a.transfer_import, "transfer_export_kwh": a.transfer_export,
                        "net_transfer_kwh": a.net_transfer, "balance_error_kwh": a.balance_error})
        return out

    def write_csv(self, out: IO[str]) -> None:
        writer = csv.DictWriter(out, fieldnames=self.FIELDS, lineterminator="\n")
        writer.writeheader()
        for row in self.rows():
            writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()})
