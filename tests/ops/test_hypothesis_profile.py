from hypothesis import given, settings, strategies as st

SEEN = []


@settings(max_examples=5)
@given(st.integers())
def _draws(n):
    SEEN.append(n)


def test_property_tests_draw_the_same_examples_on_every_run():
    assert settings().derandomize and settings().database is None
    _draws()
    first = list(SEEN)
    SEEN.clear()
    _draws()
    assert SEEN == first
