"""The stop request's process side, in this process (no training): what a signal does, the test hook's plan,
the resume command. The runs that stop and resume are in test_resume.py (one process) and test_multirank.py."""
import os
import signal

from mindrlhf.training import preemption


def test_a_signal_sets_the_request_and_a_second_during_the_save_is_ignored():
    state = preemption.begin(None, None, log=lambda message: None)
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert state.reason == "SIGTERM" and state.local_request()
        state.saving = True
        os.kill(os.getpid(), signal.SIGTERM)  # finishing the save: no exception, the process lives on
        state.saving = False
    finally:
        preemption.end()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_signal_the_process_was_started_ignoring_stays_ignored():
    """A background job of a non-interactive shell starts with SIGINT ignored; Ctrl-C must not reach it."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        state = preemption.begin(None, None, log=lambda message: None)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) == state._on_signal  # pylint: disable=protected-access
        preemption.end()
    finally:
        signal.signal(signal.SIGINT, previous)


def test_the_stop_file_is_a_request(tmp_path):
    stop = tmp_path / "stop"
    state = preemption.StopState(str(stop), None, log=lambda message: None)
    assert not state.local_request()
    stop.touch()
    assert state.local_request() and state.reason == f"stop file {stop}"
    assert state.report()["resume_command"].startswith(f"rm {stop} && python ")


def test_test_signals_select_the_rank(monkeypatch):
    monkeypatch.setenv(preemption.TEST_SIGNALS, "TERM@6/rank1, INT@save")
    assert preemption.test_signals(0) == {"save": signal.SIGINT}
    assert preemption.test_signals(1) == {"6": signal.SIGTERM, "save": signal.SIGINT}


def test_the_resume_command_adds_resume_once():
    assert preemption.resume_command(["reward_train.py", "--config", "a b.yaml"]) == \
        "python reward_train.py --config 'a b.yaml' --resume"
    assert preemption.resume_command(["reward_train.py", "--resume", "True"]).endswith("--resume True")
