"""cache_key against JavaScript itself (clientlib._jsjson, clientlib._calls).

The seed keys its cache by ``md5(JSON.stringify(req.query))``; node computes
the reference texts and digests here, thousands of generated values in one
node process, so these tests check the port against the real thing.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import struct
import time
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from clientlib import cache_key, canonical_cache_key
from clientlib._jsjson import MAX_ARRAY_INDEX, QUICK_CHECK_DEPTH, stringify

from .javascript import run_node

#: The issue's example and the md5 the seed (node) gives it.
SEED_QUERY = {"q": "shoes", "page": "2"}
SEED_KEY = "12ccc97ec9b1b4d98cda70d23de18f90"
#: What cache_key gave before it matched the seed (sorted keys); canonical_cache_key keeps it.
SORTED_KEY = "865783cad72d3194edf90b2db5055612"

#: Generated values per hypothesis batch: enough to reach the rare shapes, one node run.
GENERATED_VALUES = 3000
#: Random doubles from random bit patterns: every exponent range, subnormals included.
RANDOM_DOUBLES = 4000
#: Key in a value sent to node that stands for a non-finite number JSON cannot carry.
NON_FINITE = "__wksd_non_finite__"

# node: revive the non-finite markers, then JSON.stringify and md5 each value.
NODE_KEYS = f"""
const crypto = require('crypto');
const revive = (v) => Array.isArray(v) ? v.map(revive)
  : v !== null && typeof v === 'object'
    ? ('{NON_FINITE}' in v ? Number(v['{NON_FINITE}'])
      : Object.fromEntries(Object.entries(v).map(([k, x]) => [k, revive(x)])))
    : v;
return input.map((value) => {{
  const text = JSON.stringify(revive(value));
  return [text, crypto.createHash('md5').update(text).digest('hex')];
}});
"""

EDGE_NUMBERS: list[Any] = [
    0,
    -0.0,
    0.0,
    1.0,
    -1.0,
    1.5,
    0.1,
    0.2 + 0.1,
    1 / 3,
    -1 / 3,
    100.0,
    1e20,
    1e21,
    -1e21,
    1.5e21,
    123456789012345680000.0,
    1e-6,
    1e-7,
    -1e-7,
    1.5e-7,
    0.000001,
    0.0000015,
    1e16,
    1e15,
    12345678901234567.0,
    5e-324,
    -5e-324,
    2.2250738585072014e-308,
    1.7976931348623157e308,
    -1.7976931348623157e308,
    4.35,
    0.5,
    2.5e-5,
    1e100,
    1e-100,
    math.nan,
    math.inf,
    -math.inf,
    2**53,
    2**53 + 1,
    -(2**53) - 1,
    2**63 - 1,
    2**64,
    -(2**64),
    10**21,
    10**21 + 1,
    10**22,
    2**1023,
    2**1024,
    10**400,
    -(10**400),
    9007199254740993,
    123456789,
]
TRICKY_KEYS = [
    "0",
    "1",
    "9",
    "10",
    "01",
    "00",
    "-1",
    "-0",
    "1.5",
    "1e3",
    " 1",
    "1 ",
    "+1",
    "0x1",
    "4294967293",
    "4294967294",
    "4294967295",
    "4294967296",
    "99999999999",
    "٣",
    "²",
    "",
    "a",
    "b",
    "__proto__",
    "constructor",
    "toString",
    "é",
    "😀",
    "\ud83d",
    "\n",
]
SPECIAL_CHARS = [
    *(chr(code) for code in range(0x20)),
    '"',
    "\\",
    "/",
    "\x7f",
    "\x80",
    "\u2028",
    "\u2029",
    "\ufeff",
    "\ufffd",
    "\uffff",
    "é",
    "€",
    "😀",
    "\U0010ffff",
    "\ud83d",
    "\ude00",
    "\udbff",
    "\udc00",
    "\ud800",
]

_chars = st.one_of(st.characters(exclude_categories=()), st.sampled_from(SPECIAL_CHARS))
_strings = st.text(_chars, max_size=12)
_keys = st.one_of(
    st.sampled_from(TRICKY_KEYS),
    st.integers(0, MAX_ARRAY_INDEX + 3).map(str),
    st.integers(0, 40).map(str),
    _strings,
)
_numbers = st.one_of(
    st.integers(-(2**60), 2**60),
    st.integers(),
    st.floats(),
    st.floats(-1e25, 1e25),
    st.floats(-1e-5, 1e-5),
    st.sampled_from(EDGE_NUMBERS),
)
_leaves = st.one_of(st.none(), st.booleans(), _numbers, _strings)
_values = st.recursive(
    _leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.lists(children, max_size=3).map(tuple),
        st.dictionaries(_keys, children, max_size=6),
    ),
    max_leaves=24,
)


def _draw(strategy: st.SearchStrategy[Any], count: int) -> list[Any]:
    """``count`` values from ``strategy``, the same ones on every run."""
    drawn: list[Any] = []

    @settings(
        derandomize=True,
        max_examples=count,
        database=None,
        phases=[Phase.generate],
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def collect(value: Any) -> None:
        drawn.append(value)

    collect()
    return drawn


def _random_doubles(count: int) -> list[float]:
    """Doubles from seeded random bit patterns, and short decimals at every scale."""
    rng = random.Random(20261202)
    doubles = [
        struct.unpack("<d", rng.getrandbits(64).to_bytes(8, "little"))[0] for _ in range(count)
    ]
    doubles += [
        round(rng.uniform(-10, 10), rng.randint(0, 6)) * 10.0 ** rng.randint(-30, 30)
        for _ in range(count)
    ]
    return doubles


def _joined_pairs(text: str) -> str:
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass")


def _has_colliding_keys(value: Any) -> bool:
    """True when two keys of one dict are one JavaScript string (a pair vs its astral char)."""
    if isinstance(value, dict):
        if len({_joined_pairs(key) for key in value}) != len(value):
            return True
        return any(_has_colliding_keys(item) for item in value.values())
    if isinstance(value, list | tuple):
        return any(_has_colliding_keys(item) for item in value)
    return False


def _for_node(value: Any) -> Any:
    """``value`` with non-finite numbers as markers, so plain JSON carries it to node."""
    if isinstance(value, float) and not math.isfinite(value):
        return {NON_FINITE: "NaN" if math.isnan(value) else str(value).replace("inf", "Infinity")}
    if isinstance(value, dict):
        return {key: _for_node(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_for_node(item) for item in value]
    return value


def _assert_like_node(values: list[Any]) -> None:
    """stringify and cache_key give node's text and md5 for every value, in one node run."""
    expected = run_node(NODE_KEYS, [_for_node(value) for value in values])
    mismatches = []
    for value, (text, digest) in zip(values, expected, strict=True):
        ours = stringify(value)
        if ours != text or cache_key(value) != digest:
            mismatches.append((value, ours, text))
    mismatches.sort(key=lambda mismatch: len(repr(mismatch[0])))
    assert mismatches == [], (
        f"{len(mismatches)} of {len(values)} differ, smallest: {mismatches[:3]!r}"
    )


def test_seed_example_key() -> None:
    """The issue's query gets the seed's md5, not the sorted-keys one of before."""
    assert cache_key(SEED_QUERY) == SEED_KEY
    assert stringify(SEED_QUERY) == '{"q":"shoes","page":"2"}'
    assert canonical_cache_key(SEED_QUERY) == SORTED_KEY


def test_seed_example_key_is_nodes() -> None:
    """node itself gives the seed example the md5 the tests name."""
    assert run_node(NODE_KEYS, [SEED_QUERY]) == [['{"q":"shoes","page":"2"}', SEED_KEY]]


def test_edge_values_match_node() -> None:
    """Edge numbers, tricky keys and special characters, alone and together, as node writes them."""
    values: list[Any] = [*EDGE_NUMBERS, *SPECIAL_CHARS, "".join(SPECIAL_CHARS)]
    values.append({key: index for index, key in enumerate(TRICKY_KEYS)})
    values.append({key: index for index, key in enumerate(reversed(TRICKY_KEYS))})
    values.append({key: [key] for key in TRICKY_KEYS})
    values += [{}, [], (), [[]], [{}], {"a": {}}, None, True, False, "", "shoes"]
    values.append({"user": {"id": 7, "tags": ["a", "b"]}, "page": 2, "ratio": 1.0, "q": None})
    _assert_like_node(values)


def test_random_doubles_match_node() -> None:
    """Doubles from random bit patterns and decimals at every scale print as in JavaScript."""
    _assert_like_node(_random_doubles(RANDOM_DOUBLES))


def test_generated_values_match_node() -> None:
    """Thousands of generated nested values give node's JSON.stringify text and md5."""
    values = [value for value in _draw(_values, GENERATED_VALUES) if not _has_colliding_keys(value)]
    assert len(values) > GENERATED_VALUES * 0.9
    _assert_like_node(values)


def test_generated_query_dicts_match_node() -> None:
    """Flat string-to-string dicts, what Express's req.query holds, match node."""
    queries = st.dictionaries(
        _keys, st.one_of(_strings, st.lists(_strings, max_size=3)), max_size=8
    )
    values = [value for value in _draw(queries, GENERATED_VALUES) if not _has_colliding_keys(value)]
    _assert_like_node(values)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ({"b": 1, "2": 2, "a": 3, "1": 4}, '{"1":4,"2":2,"b":1,"a":3}'),
        ({"10": 1, "9": 2, "01": 3, "-1": 4}, '{"9":2,"10":1,"01":3,"-1":4}'),
        ({"4294967295": 1, "4294967294": 2}, '{"4294967294":2,"4294967295":1}'),
        ({"x": {"2": 0, "y": 1, "0": 2}}, '{"x":{"0":2,"2":0,"y":1}}'),
        (
            [1.0, 1e21, 1e-7, 1e20, 0.000001, -0.0],
            "[1,1e+21,1e-7,100000000000000000000,0.000001,0]",
        ),
        ([2**64, 10**400, math.nan, -math.inf], "[18446744073709552000,null,null,null]"),
        (["\ud83d", "\ud83d\ude00", "\x01\x1f\x7f"], '["\\ud83d","😀","\\u0001\\u001f\x7f"]'),
        ('"\\\b\f\n\r\t/\u2028', '"\\"\\\\\\b\\f\\n\\r\\t/\u2028"'),
    ],
)
def test_known_texts(value: Any, text: str) -> None:
    """JavaScript's key order, number layout and escapes, on hand-picked values."""
    assert stringify(value) == text
    assert cache_key(value) == hashlib.md5(text.encode()).hexdigest()


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ({1: "a", "b": 2, 0: "c"}, '{"0":"c","1":"a","b":2}'),
        ({2.0: "x", 1.5: "y"}, '{"2":"x","1.5":"y"}'),
        ({True: 1, None: 2}, '{"true":1,"null":2}'),
        ({math.inf: 1, -math.inf: 2, math.nan: 3}, '{"Infinity":1,"-Infinity":2,"NaN":3}'),
        ({10**21: 1, 2**64: 2}, '{"1e+21":1,"18446744073709552000":2}'),
    ],
)
def test_non_string_keys_are_javascript_property_names(value: Any, text: str) -> None:
    """A non-string key becomes the name JavaScript's String(key) gives, then is ordered as such."""
    assert stringify(value) == text


@pytest.mark.parametrize(
    "value", [{1: "a", "1": "b"}, {"\ud83d\ude00": 1, "😀": 2}, {1.0: "x", "1": "y"}]
)
def test_keys_that_collide_in_javascript_are_rejected(value: Any) -> None:
    """Two keys that are one JavaScript property name are a ValueError, not a guess."""
    with pytest.raises(ValueError, match="collide"):
        cache_key(value)


@pytest.mark.parametrize(
    "value",
    [{1, 2}, b"bytes", Decimal("1.5"), object(), {"a": [1, {2}]}, {(1, 2): "tuple key"}],
)
def test_values_without_a_json_form_are_a_type_error(value: Any) -> None:
    """Sets, bytes, Decimals and other objects are a TypeError, as in json."""
    with pytest.raises(TypeError):
        cache_key(value)


def test_circular_value_is_a_value_error() -> None:
    """A value that contains itself is a ValueError; a shared, acyclic part is written twice."""
    loop: list[Any] = [1]
    loop.append(loop)
    with pytest.raises(ValueError, match="Circular"):
        cache_key(loop)
    shared = [1.0]
    assert stringify({"a": shared, "b": [shared]}) == '{"a":[1],"b":[[1]]}'


def test_nesting_past_the_quick_check_depth() -> None:
    """Values deeper than QUICK_CHECK_DEPTH take the careful walk and give the same text."""
    deep: Any = "x"
    for _ in range(QUICK_CHECK_DEPTH + 8):
        deep = {"k": [deep]}
    expected = '{"k":[' * (QUICK_CHECK_DEPTH + 8) + '"x"' + "]}" * (QUICK_CHECK_DEPTH + 8)
    assert stringify(deep) == expected
    assert stringify(deep) == json.dumps(deep, separators=(",", ":"))


def test_subclasses_are_their_base_types() -> None:
    """str, int, float, dict and list subclasses are written as their base values."""

    class Name(str):
        pass

    class Count(int):
        def __str__(self) -> str:
            return "not a number"

    class Ratio(float):
        pass

    class Params(dict[str, Any]):
        pass

    value = Params(q=Name("shoes"), n=Count(3), r=Ratio(2.0), tags=[Name("a")])
    assert stringify(value) == '{"q":"shoes","n":3,"r":2,"tags":["a"]}'


@given(_values)
@settings(derandomize=True, max_examples=300, deadline=None, database=None)
def test_canonical_key_ignores_insertion_order(value: Any) -> None:
    """canonical_cache_key sorts keys: reversing every dict's insertion order keeps the key."""

    def reverse(item: Any) -> Any:
        if isinstance(item, dict):
            return {key: reverse(item[key]) for key in reversed(list(item))}
        if isinstance(item, list | tuple):
            return [reverse(child) for child in item]
        return item

    try:
        key = canonical_cache_key(value)
    except (TypeError, ValueError):  # json.dumps cannot sort mixed keys, nor encode surrogates
        return
    assert canonical_cache_key(reverse(value)) == key


def test_cache_key_speed() -> None:
    """cache_key on small query dicts costs a few microseconds (printed, not asserted)."""
    cases = {
        "query (quick path)": {"q": "shoes", "page": "2", "sort": "price", "size": "42"},
        "with float and index key (walk)": {"q": "shoes", "2": "x", "ratio": 1.5},
    }
    for label, params in cases.items():
        rounds = 20000
        started = time.perf_counter()
        for _ in range(rounds):
            cache_key(params)
        elapsed = time.perf_counter() - started
        print(f"cache_key {label}: {elapsed / rounds * 1e6:.2f} µs")
