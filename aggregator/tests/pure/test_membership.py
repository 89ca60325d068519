"""Pure tests of role assignment and reference resolution (aggregator/membership.py)."""
from __future__ import annotations

from aggregator.battery.membership import (AUXILIARY, EXCLUDED, LOOP, MEMBER, OWN, PRIMARY, VIRTUAL_MEMBER, RoleConfig,
                                           ServiceInfo, assign_roles, resolve)

B = "com.victronenergy.battery."
OURS = B + "aggregator"


def svc(suffix: str, custom_name: str | None = None, serial: str | None = None,
        chain: tuple[str, ...] = ()) -> ServiceInfo:
    return ServiceInfo(B + suffix, custom_name, serial, chain)


def cfg(**kwargs) -> RoleConfig:
    return RoleConfig(own_names=frozenset({OURS}), **kwargs)


def test_plain_batteries_are_members_and_own_name_is_own():
    roles = assign_roles(cfg(), [svc("aggregator"), svc("ttyS1"), svc("ttyS2")])
    assert roles.roles == {OURS: OWN, B + "ttyS1": MEMBER, B + "ttyS2": MEMBER}
    assert roles.unresolved == roles.ambiguous == roles.conflicts == []


def test_each_role():
    config = cfg(excluded=(B + "shunt",), primary=(B + "p",), auxiliary=(B + "x",),
                 virtual_members={B + "vb": (B + "v1", B + "v2")})
    services = [svc(s) for s in ("shunt", "p", "x", "v1", "v2", "m")]
    roles = assign_roles(config, services)
    assert roles.roles == {B + "shunt": EXCLUDED, B + "p": PRIMARY, B + "x": AUXILIARY,
                           B + "v1": VIRTUAL_MEMBER, B + "v2": VIRTUAL_MEMBER, B + "m": MEMBER}
    assert roles.virtual_of == {B + "v1": B + "vb", B + "v2": B + "vb"}


def test_role_precedence_own_excluded_primary_auxiliary_virtual():
    # one service reached by a full name and by name: in every role
    config = cfg(excluded=(OURS, "name:X"), primary=("name:X", "name:P"), auxiliary=("name:P", "name:A"),
                 virtual_members={B + "vb": ("name:A", "name:V")})
    services = [svc("aggregator"), svc("x", "X"), svc("p", "P"), svc("a", "A"), svc("v", "V")]
    roles = assign_roles(config, services)
    assert roles.roles[OURS] == OWN
    assert roles.roles[B + "x"] == EXCLUDED
    assert roles.roles[B + "p"] == PRIMARY
    assert roles.roles[B + "a"] == AUXILIARY
    assert roles.roles[B + "v"] == VIRTUAL_MEMBER
    assert B + "a" not in roles.virtual_of
    assert set(roles.conflicts) == {OURS, B + "x", B + "p", B + "a"}


def test_name_reference_follows_a_changed_custom_name():
    config = cfg(excluded=("name:Shunt",))
    before = assign_roles(config, [svc("ttyS1", "Shunt"), svc("ttyS2", "Pack")])
    assert before.roles == {B + "ttyS1": EXCLUDED, B + "ttyS2": MEMBER}
    # tty renumbering / renaming: the reference follows the CustomName, not the service name
    after = assign_roles(config, [svc("ttyS1", "Pack"), svc("ttyS2", "Shunt")])
    assert after.roles == {B + "ttyS1": MEMBER, B + "ttyS2": EXCLUDED}
    gone = assign_roles(config, [svc("ttyS1", "Pack"), svc("ttyS2", "Shunt 2")])
    assert gone.roles == {B + "ttyS1": MEMBER, B + "ttyS2": MEMBER}
    assert gone.unresolved == ["name:Shunt"]


def test_serial_reference():
    config = cfg(primary=("serial:ABC123",))
    roles = assign_roles(config, [svc("ttyUSB0", "Pack", "XYZ"), svc("ttyUSB1", "Shunt", "ABC123")])
    assert roles.roles == {B + "ttyUSB0": MEMBER, B + "ttyUSB1": PRIMARY}
    assert resolve("serial:ABC123", [svc("ttyUSB0", serial="ABC123")]) == [B + "ttyUSB0"]
    assert resolve("serial:", [svc("ttyUSB0")]) == []  # an empty reference never matches a missing serial


def test_service_info_of_bus_values():
    info = ServiceInfo.of(B + "a", {"/CustomName": "", "/Serial": 5, "/Aggregator/Chain": [OURS, 3]})
    assert info == ServiceInfo(B + "a", None, None, (OURS,))
    assert ServiceInfo.of(B + "a", {"/Aggregator/Chain": "x"}).chain == ()


def test_ambiguous_reference_uses_all_matches():
    roles = assign_roles(cfg(excluded=("name:Pack",)), [svc("a", "Pack"), svc("b", "Pack"), svc("c", "Other")])
    assert roles.ambiguous == ["name:Pack"]
    assert roles.roles == {B + "a": EXCLUDED, B + "b": EXCLUDED, B + "c": MEMBER}


def test_unresolved_references_are_reported_except_absent_plain_excluded_names():
    config = cfg(excluded=(B + "absent", "name:Gone", "serial:S0"), primary=(B + "nop",), auxiliary=("name:Aux",),
                 virtual_members={B + "vb": (B + "v1", "serial:S9")})
    roles = assign_roles(config, [svc("v1"), svc("m")])
    assert roles.unresolved == ["name:Gone", "serial:S0", B + "nop", "name:Aux", "serial:S9"]
    assert roles.roles == {B + "v1": VIRTUAL_MEMBER, B + "m": MEMBER}


def test_an_aggregate_containing_us_is_a_loop_not_a_member():
    services = [svc("aggregator"), svc("top", chain=(B + "top", OURS)),
                svc("deep", chain=(B + "deep", B + "mid", OURS)), svc("other", chain=(B + "other", B + "x"))]
    roles = assign_roles(cfg(), services).roles
    assert roles[B + "top"] == LOOP
    assert roles[B + "deep"] == LOOP
    assert roles[B + "other"] == MEMBER  # another aggregate not containing us: multi-level is fine
    assert roles[OURS] == OWN


def test_own_name_is_never_a_member_even_when_absent_from_config():
    roles = assign_roles(cfg(), [svc("aggregator", chain=(OURS,))])
    assert roles.roles == {OURS: OWN}
    # own names not on the bus are not invented
    assert assign_roles(cfg(), [svc("a")]).roles == {B + "a": MEMBER}


def test_same_role_twice_is_no_conflict_but_two_virtual_batteries_are():
    config = cfg(primary=(B + "p", "name:P"),
                 virtual_members={B + "vb1": (B + "v",), B + "vb2": ("name:V",)})
    roles = assign_roles(config, [svc("p", "P"), svc("v", "V")])
    assert roles.roles[B + "p"] == PRIMARY
    assert roles.virtual_of == {B + "v": B + "vb1"}
    assert roles.conflicts == [B + "v"]
