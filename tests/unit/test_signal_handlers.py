"""bench.signals in this process: outside training a signal stops at once; in training one Ctrl-C waits for
the step boundary and a second leaves at once. The same on real launches: tests/integration/test_signals.py."""
import os
import signal
import time

import pytest

from bench import signals


@pytest.fixture
def handlers(monkeypatch):
    """bench.signals installed in this process, fresh, and the previous handlers back afterwards."""
    saved = {s: signal.getsignal(s) for s in signals.STATUS}
    monkeypatch.setattr(signals, "_requested", None)
    monkeypatch.setattr(signals, "_training", False)
    monkeypatch.setattr(signals, "_closing", False)
    signals.install()
    yield
    for s, h in saved.items():
        signal.signal(s, h)



@pytest.mark.unit
def test_outside_training_a_signal_stops_at_once(handlers):
    with pytest.raises(signals.Stopped) as e:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)  # the handler runs at the next bytecode
    assert (e.value.status, e.value.signame) == ("preempted", "SIGTERM")
    assert signals.EXIT_CODE["preempted"] == 75


@pytest.mark.unit
def test_in_training_one_ctrl_c_waits_for_the_step_boundary_and_two_leave(handlers):
    signals.training(True)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.1)
    assert signals.requested() == "interrupted" and signals.requested_signal() == "SIGINT"
    os.kill(os.getpid(), signal.SIGTERM)  # the launcher's follow-up SIGTERM does not cut the step short
    time.sleep(0.1)
    assert signals.requested() == "interrupted"
    with pytest.raises(signals.Stopped):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)
    signals.closing()
    os.kill(os.getpid(), signal.SIGINT)  # while the run records how it ended: ignored
    time.sleep(0.1)


@pytest.mark.unit
def test_a_signal_just_before_the_loop_stops_it_from_starting(handlers):
    signals._requested = ("preempted", "SIGUSR1")  # arrived while the loop was being set up
    with pytest.raises(signals.Stopped):
        signals.training(True)


def the_summary(out) -> dict:
    (path,) = glob.glob(f"{out}/*/summary.json")
    return json.loads(open(path).read())
