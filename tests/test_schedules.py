import pickle


import pytest
from fastai.callback.schedule import sched_cos, sched_lin

from fasterai.schedules import (SCHEDULES, annealing_agp, annealing_cos, annealing_linear, dsd, iterative, one_cycle,
                                one_shot, resolve_schedule)


@pytest.mark.parametrize('f', [f for n, f in SCHEDULES.items() if n != 'dsd'] + [iterative(1), iterative(4)])
def test_endpoints_and_monotonic(f):
    assert f(0, 30, 0) == pytest.approx(0) and f(0, 30, 1) == pytest.approx(30)
    values = [f(0, 30, i / 100) for i in range(101)]
    assert all(a <= b + 1e-12 for a, b in zip(values, values[1:]))


def test_values_by_hand():
    assert annealing_cos(0, 30, 1 / 3) == pytest.approx(7.5)    # the seed's first epoch of three
    assert annealing_cos(0, 30, 2 / 3) == pytest.approx(22.5)
    assert annealing_linear(10, 50, 0.25) == pytest.approx(20)
    assert annealing_agp(0, 80, 0.5) == pytest.approx(80 - 80 * 0.125)
    assert one_shot(0, 30, 0.999) == 0 and one_shot(0, 30, 1.0) == 30


def test_same_as_fastai_schedules():
    for pos in (0, 0.1, 0.5, 0.77, 1):
        assert annealing_cos(5, 40, pos) == pytest.approx(sched_cos(5, 40, pos))
        assert annealing_linear(5, 40, pos) == pytest.approx(sched_lin(5, 40, pos))


def test_resolve():
    assert resolve_schedule('cos') is annealing_cos
    assert resolve_schedule(sched_cos) is sched_cos
    with pytest.raises(ValueError, match=r"unknown schedule 'cosine'.*\['agp', 'cos', 'dsd', 'linear', 'one_cycle', 'one_shot'\]"):
        resolve_schedule('cosine')


def test_iterative_one_cycle_and_dsd_by_hand():
    f = iterative(4)
    assert f.__name__ == 'iterative(4)' and pickle.loads(pickle.dumps(f))(0, 40, 0.5) == 20
    assert [f(0, 40, p) for p in (0, 0.24, 0.25, 0.6, 0.99, 1)] == [0, 0, 10, 20, 30, 40]
    assert one_cycle(0, 50, 0) == 0 and one_cycle(0, 50, 1) == pytest.approx(50)
    assert one_cycle(0, 50, 0.2) < 0.1 * 50 < 0.9 * 50 < one_cycle(0, 50, 0.7)   # flat, steep, flat
    assert dsd(0, 60, 0) == 0 and dsd(0, 60, 0.25) == pytest.approx(30) and dsd(0, 60, 0.5) == pytest.approx(60)
    assert dsd(0, 60, 0.75) == pytest.approx(30) and dsd(0, 60, 1) == pytest.approx(0)
    with pytest.raises(ValueError, match='iterative needs n >= 1'):
        iterative(0)
