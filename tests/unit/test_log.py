"""bench/log.py: which rank speaks, at which level, in which shape; the console renderer shows at every level."""
import logging

import pytest

from bench import log as bench_log
from bench.log import configure, log, note, show

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def restore():
    yield
    configure(0)


def test_rank_0_speaks_by_default_and_every_rank_refuses(capfd):
    configure(3)
    log.info("hello")
    note("resumed")
    log.warning("slow disk")
    log.error("bad flag\nsecond problem")
    out, err = capfd.readouterr()
    assert out == "" and err == "error: bad flag\nerror: second problem\n"
    configure(0)
    log.info("hello")
    note("resumed")
    log.warning("slow disk")
    out, err = capfd.readouterr()
    assert out == "hello\n" and err == "note: resumed\nwarning: slow disk\n"


def test_every_rank_tags_its_lines(capfd):
    configure(2, every_rank=True)
    log.info("step 1")
    log.error("lost rank 0")
    out, err = capfd.readouterr()
    assert out == "[rank 2] step 1\n" and err == "[rank 2] error: lost rank 0\n"


def test_the_level_silences_messages_but_not_the_console(capfd):
    configure(0, "warning")
    log.info("chatter")
    note("a note")
    log.warning("kept")
    show("| table |")
    out, err = capfd.readouterr()
    assert out == "| table |\n" and err == "warning: kept\n"
    configure(0, "debug")
    log.debug("detail")
    assert capfd.readouterr().out == "detail\n"


def test_an_embedding_program_keeps_its_own_handlers(caplog):
    configure(0, own=False)
    with caplog.at_level(logging.INFO, logger="bench"):
        log.info("to the host's handlers")
    assert [r.getMessage() for r in caplog.records] == ["to the host's handlers"]
    assert log.propagate and not log.handlers
    assert bench_log.LEVELS == ("debug", "info", "note", "warning", "error")


def test_no_bare_print_in_the_harness():
    """Messages go through the logger (a user can silence, redirect or raise them), tables through show."""
    import ast
    from support import REPO
    calls = [f"{path.relative_to(REPO)}:{node.lineno}"
             for folder in ("bench", "analysis") for path in sorted((REPO / folder).rglob("*.py"))
             for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"]
    assert calls == []


def test_every_message_call_passes_one_message():
    """show, note and the logger take the message alone: print's keywords (flush=, file=) are not theirs, and a
    call that kept one fails only when it runs (a sweep's progress line did)."""
    import ast
    from support import REPO
    calls = {"show", "note", "log.info", "log.warning", "log.error", "log.debug"}
    wrong = []
    for folder in ("bench", "analysis", "measurements"):
        for path in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.Call):
                    continue
                f = node.func
                name = f.id if isinstance(f, ast.Name) else \
                    f"{f.value.id}.{f.attr}" if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else None
                if name in calls and (node.keywords or len(node.args) != 1):
                    wrong.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert wrong == []
