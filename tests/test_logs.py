"""Rank-aware logging: rank 0 speaks at INFO, other ranks only warn; every rank can log to a file."""

from __future__ import annotations

import logging

import pytest

from ember.logs import add_log_file, setup_logging


@pytest.mark.parametrize("rank, shows_info", [("0", True), ("1", False)])
def test_console_level_depends_on_rank(monkeypatch, capsys, rank, shows_info):
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("EMBER_LOG_ALL_RANKS", raising=False)
    log = setup_logging()
    logging.getLogger("ember.test").info("hello info")
    logging.getLogger("ember.test").warning("hello warning")
    err = capsys.readouterr().err
    assert ("hello info" in err) == shows_info
    assert f"[rank{rank}] WARNING ember.test: hello warning" in err
    log.handlers.clear()


def test_all_ranks_switch(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("EMBER_LOG_ALL_RANKS", "1")
    setup_logging()
    logging.getLogger("ember.test").info("from rank one")
    assert "from rank one" in capsys.readouterr().err


def test_log_file_in_run_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("RANK", "1")
    setup_logging()
    path = add_log_file(tmp_path)
    add_log_file(tmp_path)  # idempotent: one handler per file
    logging.getLogger("ember.test").info("to the file")
    for h in logging.getLogger("ember").handlers:
        h.flush()
    assert path == tmp_path / "logs" / "rank1.log"
    lines = path.read_text().splitlines()
    assert len(lines) == 1 and lines[0].endswith("[rank1] INFO ember.test: to the file")
    logging.getLogger("ember").handlers.clear()
