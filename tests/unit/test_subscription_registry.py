"""The notifier's registry (`shard.subscriptions.registry`): `empty`, which the notifier
reads on every append before it asks `matches`, says exactly whether any registration is
held, whatever sequence of registrations and removals led there."""

from hypothesis import given
from hypothesis import strategies as st

from ds_cluster.shard.subscriptions.registry import Registry

SUBS = st.sampled_from(["s1", "s2", "s3"])
PATHS = st.sampled_from(["a/b", "a/c", "x"])
steps = st.lists(
    st.one_of(
        st.tuples(st.just("add"), SUBS, st.sampled_from(["explicit", "pattern"]), PATHS),
        st.tuples(st.just("add"), SUBS, st.just("pattern"), st.sampled_from(["a/*", "*"])),
        st.tuples(st.just("remove"), SUBS, st.none(), st.none()),
        st.tuples(st.just("remove"), SUBS, st.none(), PATHS),
    ),
    max_size=12,
)


@given(steps=steps)
def test_empty_says_whether_anything_is_registered(steps):
    registry = Registry()
    assert registry.empty
    for op, sub_id, kind, value in steps:
        if op == "add":
            registry.add(sub_id, kind, value)
        else:
            registry.remove(sub_id, None if value is None else [value])
        assert registry.empty == (len(registry) == 0)
        if registry.empty:
            assert not registry.matches("a/b")
