"""Progress: tqdm bars on a terminal, plain lines (no carriage returns) in a log."""
from __future__ import annotations

import io
import subprocess
import sys

from netanatomy.util import progress as prog


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _log(monkeypatch) -> io.StringIO:
    """stderr as a log file (not a terminal), progress on, no periodic lines. Set inside the
    test itself: pytest re-installs its own capture of sys.stderr between setup and call."""
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    monkeypatch.setenv("NETANATOMY_PROGRESS", "1")
    monkeypatch.setenv("NETANATOMY_PROGRESS_INTERVAL", "3600")
    return stream


def test_a_log_gets_one_plain_line_per_stage(monkeypatch):
    log = _log(monkeypatch)
    for _ in prog.progress(range(7), desc="shuffles", unit="net"):
        pass
    bar = prog.progress(total=3, desc="lesions", unit="layer")
    for _ in range(3):
        bar.update(1)
    bar.set_postfix(loss="0.123")
    bar.close()
    bar.close()                                                            # a second close adds nothing
    out = log.getvalue()
    assert "\r" not in out and "\x1b" not in out
    lines = out.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("shuffles: done, 7/7 net in ") and lines[0].endswith(" s")
    assert lines[1].startswith("lesions: done, 3/3 layer in ") and lines[1].endswith("s, loss=0.123")


def test_a_long_stage_writes_at_most_one_line_per_interval(monkeypatch):
    log = _log(monkeypatch)
    now = [0.0]
    monkeypatch.setattr(prog, "_now", lambda: now[0])
    monkeypatch.setenv("NETANATOMY_PROGRESS_INTERVAL", "30")
    bar = prog.progress(total=10, desc="capture", unit="ex", initial=2)
    for t in (1.0, 2.0, 31.0, 32.0, 70.0):                                 # lines at 31 s and 70 s only
        now[0] = t
        bar.update(1)
    now[0] = 71.0
    bar.close()
    assert log.getvalue().splitlines() == ["capture: 5/10 ex in 31.0 s", "capture: 7/10 ex in 70.0 s",
                                           "capture: done, 7/10 ex in 71.0 s"]


def test_a_terminal_gets_a_tqdm_bar(monkeypatch):
    stream = _Terminal()
    monkeypatch.setattr(sys, "stderr", stream)
    monkeypatch.setenv("NETANATOMY_PROGRESS", "1")
    bar = prog.progress(total=3, desc="render")
    assert not isinstance(bar, prog.PlainProgress)
    bar.update(3)
    bar.close()
    assert "\r" in stream.getvalue()                                      # tqdm redraws in place
    monkeypatch.setenv("NETANATOMY_PROGRESS", "plain")                    # forced plain on a terminal
    assert isinstance(prog.progress(total=3), prog.PlainProgress)


def test_disabled_progress_writes_nothing(monkeypatch):
    log = _log(monkeypatch)
    monkeypatch.setenv("NETANATOMY_PROGRESS", "0")
    assert list(prog.progress(range(3), desc="x")) == [0, 1, 2]
    bar = prog.progress(total=2, desc="y", disable=False)                 # asked for explicitly: shown
    bar.update(2)
    bar.close()
    lines = log.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("y: done, 2/2 it in ")


def test_a_command_logging_to_a_file_has_no_carriage_returns(tmp_path):
    """The real thing: a process whose stderr is a file."""
    code = ("from netanatomy.util.progress import progress\n"
            "for _ in progress(range(50), desc='epoch 1/1', unit='batch'):\n    pass\n")
    err = tmp_path / "err.log"
    with err.open("w") as f:
        subprocess.run([sys.executable, "-c", code], stderr=f, check=True, cwd=tmp_path,
                       env={**__import__("os").environ, "NETANATOMY_PROGRESS": "1"})
    text = err.read_text()
    assert "\r" not in text and text.splitlines()[0].startswith("epoch 1/1: done, 50/50 batch in ")
