"""Hypothesis strategies shared by property tests: JSON values as `json.loads` can return them."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
"""What a JSON document may hold at a leaf: integers in the 64-bit range, finite floats, any text."""


def json_values(*, max_leaves: int) -> st.SearchStrategy[Any]:
    """Nested JSON values (lists of up to 4 items, objects of up to 4 members with keys of up to 8 characters)."""
    return st.recursive(
        json_scalars,
        lambda children: (
            st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
        ),
        max_leaves=max_leaves,
    )
