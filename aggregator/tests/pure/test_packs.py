"""Which service stands for a pack seen through several services (battery/identity.py's Packs): the one seen
first, the lowest name on a tie, whatever the order the services are fed in."""
from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from aggregator.battery.identity import Duplicate, Packs

B = "com.victronenergy.battery."


def test_the_service_seen_first_stands_for_the_pack_and_the_next_takes_over_when_it_leaves() -> None:
    packs = Packs()
    assert packs.set(B + "ttyUSB1", "SN1", 10.0)
    assert packs.set(B + "can0", "SN1", 20.0)
    assert packs.set(B + "other", "SN2", 5.0)
    assert not packs.set(B + "can0", "SN1", 30.0)  # nothing changed: still seen at 20
    assert packs.duplicates == {"SN1": Duplicate("SN1", (B + "can0", B + "ttyUSB1"), B + "ttyUSB1")}
    assert packs.shadowed == {B + "can0"}
    assert packs.stands_for(B + "can0") == packs.stands_for(B + "ttyUSB1") == B + "ttyUSB1"
    assert packs.stands_for(B + "other") is None
    assert packs.identity_of(B + "can0") == "SN1" and packs.identity_of(B + "gone") is None
    assert packs.remove(B + "ttyUSB1") and not packs.remove(B + "ttyUSB1")
    assert packs.duplicates == {} and packs.shadowed == frozenset()
    assert packs.published("SN1") and not packs.published("SN-gone")
    assert sorted(packs.services()) == [B + "can0", B + "other"]


def test_a_tie_goes_to_the_lowest_name_and_a_new_identity_keeps_when_the_service_was_first_seen() -> None:
    packs = Packs()
    packs.set(B + "b", "SN1", 1.0)
    packs.set(B + "a", "SN1", 1.0)
    assert packs.shadowed == {B + "b"}
    packs.set(B + "c", B + "c", 0.5)  # no serial yet: known by its name
    packs.set(B + "c", "SN1", 7.0)  # its serial arrives: seen at 0.5, so it stands for the pack now
    assert packs.duplicates["SN1"].chosen == B + "c" and packs.shadowed == {B + "a", B + "b"}
    packs.remove(B + "c")
    packs.set(B + "c", "SN1", 9.0)  # back as a new member: seen last
    assert packs.duplicates["SN1"].chosen == B + "a"


MEMBERS = st.dictionaries(st.sampled_from([B + s for s in "abcdefgh"]),
                          st.tuples(st.sampled_from(["SN1", "SN2", "SN3"]), st.sampled_from([0.0, 1.0, 2.0, 3.0])),
                          min_size=1)


@given(MEMBERS, st.data())
def test_the_choice_does_not_depend_on_the_order_the_services_are_fed(
        members: dict[str, tuple[str, float]], data: st.DataObject) -> None:
    order = data.draw(st.permutations(list(members)))
    packs, reversed_packs = Packs(), Packs()
    for name in order:
        packs.set(name, *members[name])
    for name in reversed(order):
        reversed_packs.set(name, *members[name])
    assert packs.duplicates == reversed_packs.duplicates and packs.shadowed == reversed_packs.shadowed
    for identity in {i for i, _ in members.values()}:
        services = sorted(n for n, (i, _) in members.items() if i == identity)
        chosen = min(services, key=lambda n: (members[n][1], n))
        if len(services) > 1:
            assert packs.duplicates[identity] == Duplicate(identity, tuple(services), chosen)
            assert all(packs.stands_for(n) == chosen for n in services)
        else:
            assert identity not in packs.duplicates
    assert packs.shadowed == {n for d in packs.duplicates.values() for n in d.services if n != d.chosen}
