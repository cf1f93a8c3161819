"""Platform property normalisation (queue keys, modifiers) and matching against workers."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reexec.errors import FailedPrecondition, InvalidArgument, Violation
from reexec.sched.matching import (
    PropertyModifier,
    apply_modifiers,
    matches,
    queue_key,
    worker_properties,
)

RULES = {
    "OSFamily": "exact",
    "container-image": "exact",
    "cpu_count": "minimum",
    "mem_gb": "minimum",
    "Priority": "priority",
    "label": "ignore",
}


# -- queue_key -----------------------------------------------------------------------------------


def test_empty_platform() -> None:
    assert queue_key([], RULES) == ()
    assert queue_key([], {}) == ()


def test_key_is_sorted_and_drops_priority_and_ignore() -> None:
    props = [
        ("label", "x"),
        ("cpu_count", "4"),
        ("Priority", "high"),
        ("OSFamily", "linux"),
        ("container-image", "docker://ubuntu"),
    ]
    assert queue_key(props, RULES) == (
        ("OSFamily", "linux"),
        ("container-image", "docker://ubuntu"),
        ("cpu_count", "4"),
    )


def test_order_of_properties_does_not_matter() -> None:
    props = [("OSFamily", "linux"), ("cpu_count", "2"), ("mem_gb", "8")]
    assert queue_key(props, RULES) == queue_key(list(reversed(props)), RULES)


def test_minimum_is_normalised_to_an_integer() -> None:
    assert queue_key([("cpu_count", "004")], RULES) == (("cpu_count", "4"),)
    assert queue_key([("cpu_count", " 2 ")], RULES) == (("cpu_count", "2"),)
    assert queue_key([("cpu_count", "+3")], RULES) == (("cpu_count", "3"),)


@pytest.mark.parametrize("value", ["", "two", "1.5", "0x10", "4cores"])
def test_minimum_must_be_a_whole_number(value: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        queue_key([("cpu_count", value)], RULES)
    assert "cpu_count" in e.value.message and "whole number" in e.value.message


def test_minimum_given_twice_is_invalid() -> None:
    with pytest.raises(InvalidArgument, match="more than once"):
        queue_key([("cpu_count", "1"), ("cpu_count", "2")], RULES)


def test_exact_given_twice_keeps_both_values() -> None:
    key = queue_key([("OSFamily", "linux"), ("OSFamily", "android")], RULES)
    assert key == (("OSFamily", "android"), ("OSFamily", "linux"))
    # Duplicate pairs collapse.
    assert queue_key([("OSFamily", "linux")] * 2, RULES) == (("OSFamily", "linux"),)


def test_unsupported_property_is_a_failed_precondition() -> None:
    with pytest.raises(FailedPrecondition) as e:
        queue_key([("OSFamily", "linux"), ("gpu", "a100")], RULES)
    err = e.value
    assert "'gpu'" in err.message
    assert "not supported" in err.message
    assert "OSFamily" in err.message  # lists what is supported
    assert len(err.violations) == 1
    v = err.violations[0]
    assert isinstance(v, Violation)
    assert v.type == "UNSUPPORTED_PROPERTY" and v.subject == "gpu"
    assert "gpu" in v.description


def test_no_properties_supported() -> None:
    with pytest.raises(FailedPrecondition, match=r"supported: none"):
        queue_key([("OSFamily", "linux")], {})


# -- modifiers --------------------------------------------------------------------------------------


def test_add_only_when_absent() -> None:
    add = [PropertyModifier("add", "OSFamily", "linux")]
    assert apply_modifiers([], add) == [("OSFamily", "linux")]
    assert apply_modifiers([("OSFamily", "mac")], add) == [("OSFamily", "mac")]
    assert queue_key([], RULES, add) == (("OSFamily", "linux"),)


def test_remove_drops_every_value() -> None:
    rm = [PropertyModifier("remove", "gpu")]
    props = [("gpu", "a"), ("OSFamily", "linux"), ("gpu", "b")]
    assert apply_modifiers(props, rm) == [("OSFamily", "linux")]
    # Removing an unsupported property makes the action acceptable.
    assert queue_key(props, RULES, rm) == (("OSFamily", "linux"),)


def test_replace_only_when_present() -> None:
    rep = [PropertyModifier("replace", "container-image", "docker://pinned")]
    assert apply_modifiers([], rep) == []
    assert apply_modifiers([("container-image", "a"), ("container-image", "b")], rep) == [
        ("container-image", "docker://pinned")
    ]
    assert queue_key([("container-image", "x")], RULES, rep) == (
        ("container-image", "docker://pinned"),
    )


def test_modifiers_apply_in_order() -> None:
    remove_then_add = [
        PropertyModifier("remove", "OSFamily"),
        PropertyModifier("add", "OSFamily", "linux"),
    ]
    add_then_remove = [
        PropertyModifier("add", "OSFamily", "linux"),
        PropertyModifier("remove", "OSFamily"),
    ]
    props = [("OSFamily", "mac")]
    assert apply_modifiers(props, remove_then_add) == [("OSFamily", "linux")]
    assert apply_modifiers(props, add_then_remove) == []
    add_then_replace = [
        PropertyModifier("add", "cpu_count", "1"),
        PropertyModifier("replace", "cpu_count", "8"),
    ]
    assert apply_modifiers([], add_then_replace) == [("cpu_count", "8")]
    replace_then_add = list(reversed(add_then_replace))
    assert apply_modifiers([], replace_then_add) == [("cpu_count", "1")]


def test_modifiers_do_not_mutate_the_input() -> None:
    props = [("OSFamily", "mac")]
    apply_modifiers(props, [PropertyModifier("remove", "OSFamily")])
    assert props == [("OSFamily", "mac")]


def test_modifier_values_are_validated_too() -> None:
    with pytest.raises(InvalidArgument):
        queue_key([], RULES, [PropertyModifier("add", "cpu_count", "lots")])
    with pytest.raises(FailedPrecondition):
        queue_key([], RULES, [PropertyModifier("add", "gpu", "1")])


# -- matching --------------------------------------------------------------------------------------


def test_worker_properties_collect_values() -> None:
    w = worker_properties([("pool", "a"), ("pool", "b"), ("OSFamily", "linux")])
    assert w == {"pool": frozenset({"a", "b"}), "OSFamily": frozenset({"linux"})}


def test_empty_key_matches_every_worker() -> None:
    assert matches((), {}, RULES)
    assert matches((), worker_properties([("OSFamily", "linux")]), RULES)


def test_exact_match() -> None:
    w = worker_properties([("OSFamily", "linux"), ("container-image", "img")])
    assert matches((("OSFamily", "linux"),), w, RULES)
    assert not matches((("OSFamily", "mac"),), w, RULES)
    assert matches((("OSFamily", "linux"), ("container-image", "img")), w, RULES)
    assert not matches((("OSFamily", "linux"), ("container-image", "other")), w, RULES)


def test_exact_match_with_a_multi_valued_worker() -> None:
    w = worker_properties([("container-image", "a"), ("container-image", "b")])
    assert matches((("container-image", "a"),), w, RULES)
    assert matches((("container-image", "b"),), w, RULES)
    assert not matches((("container-image", "c"),), w, RULES)
    # An action asking for both values of a multi-valued worker property gets them.
    assert matches((("container-image", "a"), ("container-image", "b")), w, RULES)


def test_missing_property_does_not_match() -> None:
    w = worker_properties([("OSFamily", "linux")])
    assert not matches((("cpu_count", "1"),), w, RULES)
    assert not matches((("container-image", "img"),), w, RULES)


def test_minimum_match() -> None:
    w = worker_properties([("cpu_count", "8")])
    for need, ok in [(1, True), (8, True), (9, False), (0, True)]:
        assert matches((("cpu_count", str(need)),), w, RULES) is ok


def test_minimum_uses_the_largest_numeric_worker_value() -> None:
    w = worker_properties([("cpu_count", "2"), ("cpu_count", "16"), ("cpu_count", "many")])
    assert matches((("cpu_count", "16"),), w, RULES)
    assert not matches((("cpu_count", "17"),), w, RULES)
    only_junk = worker_properties([("cpu_count", "many")])
    assert not matches((("cpu_count", "1"),), only_junk, RULES)


def test_minimum_compares_numbers_not_strings() -> None:
    w = worker_properties([("mem_gb", "10")])
    assert matches((("mem_gb", "9"),), w, RULES)  # "9" > "10" as strings
    assert not matches((("mem_gb", "11"),), w, RULES)


def test_keys_from_queue_key_match_a_suitable_worker() -> None:
    key = queue_key([("OSFamily", "linux"), ("cpu_count", "04"), ("Priority", "1")], RULES)
    w = worker_properties([("OSFamily", "linux"), ("cpu_count", "4")])
    assert matches(key, w, RULES)


@settings(max_examples=200, deadline=None)
@given(
    need=st.dictionaries(st.sampled_from(["cpu_count", "mem_gb"]), st.integers(0, 20)),
    offer=st.dictionaries(
        st.sampled_from(["cpu_count", "mem_gb"]), st.lists(st.integers(0, 20), min_size=1)
    ),
)
def test_minimum_matches_iff_every_need_is_met(
    need: dict[str, int], offer: dict[str, list[int]]
) -> None:
    key = queue_key([(k, str(v)) for k, v in need.items()], RULES)
    w = worker_properties([(k, str(v)) for k, vs in offer.items() for v in vs])
    expected = all(k in offer and max(offer[k]) >= v for k, v in need.items())
    assert matches(key, w, RULES) is expected
