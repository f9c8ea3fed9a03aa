"""Write policies: the registry suite and each policy's decisions."""

from __future__ import annotations

import pytest

from policies import WRITE, WritePolicy, make_write


@pytest.mark.parametrize("name", sorted(WRITE))
def test_every_policy_decides_without_state(name):
    policy = make_write(name)
    assert isinstance(policy, WritePolicy) and isinstance(policy.write_on_evict, bool)
    answers = [policy.write_now(hits) for hits in range(6)]
    assert answers == [policy.write_now(hits) for hits in range(6)]
    assert answers == sorted(answers), "once written at some hit count, every higher count writes too"
    assert any(answers) or policy.write_on_evict, "a block must reach the lower tier some way"


def test_the_three_policies():
    assert [make_write("write-through").write_now(h) for h in (0, 1)] == [True, True]
    assert not make_write("write-through").write_on_evict
    assert [make_write("write-back").write_now(h) for h in (0, 5)] == [False, False]
    assert make_write("write-back").write_on_evict
    selective = make_write("write-through-selective")
    assert [selective.write_now(h) for h in range(4)] == [False, False, True, True]
    assert not selective.write_on_evict
    assert [make_write("write-through-selective", hit_threshold=1).write_now(h) for h in (0, 1)] == [False, True]


def test_bad_names_and_arguments():
    with pytest.raises(ValueError, match="valid names") as err:
        make_write("write-around")
    assert all(name in str(err.value) for name in WRITE)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="hit_threshold"):
            make_write("write-through-selective", hit_threshold=bad)
    with pytest.raises(TypeError, match="'write-back'"):
        make_write("write-back", hit_threshold=2)
