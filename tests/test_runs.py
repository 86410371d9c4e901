"""The run-directory module's writes: a file or a directory is written whole or not at all."""

import pytest

from gptjax.runs import RunDir, atomic_directory, write_atomic


def test_a_directory_is_built_beside_its_destination_and_replaces_it_only_when_complete(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(dest) as tmp:
            (tmp / "new.txt").write_text("half")
            raise RuntimeError("killed mid-way")
    assert [p.name for p in dest.iterdir()] == ["old.txt"]  # as it was
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary sibling left
    with atomic_directory(dest) as tmp:
        (tmp / "new.txt").write_text("whole")
    assert [p.name for p in dest.iterdir()] == ["new.txt"] and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_file_is_replaced_whole(tmp_path):
    path = write_atomic(tmp_path / "summary.json", "{}")
    write_atomic(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_a_run_directory_names_its_files_and_a_missing_config_is_one_clear_error(tmp_path):
    run = RunDir(tmp_path / "r")
    assert run.config == tmp_path / "r" / RunDir.CONFIG and run.metrics.name == "metrics.jsonl"
    assert str(run) == str(tmp_path / "r") and run.read_summary() is None and not run.is_finished(1)
    with pytest.raises(FileNotFoundError, match="is .* a gptjax run directory"):
        run.read_config()


def test_a_fault_log_that_cannot_be_written_stays_silent(capsys, tmp_path):
    """On a full disk, errors.log cannot take the record either: nothing may print over the fault's one line
    (logging's default printed the failed write's traceback, 30 lines, in the full-disk test)."""
    import logging

    from gptjax.runs import FaultLogHandler

    logger = logging.getLogger("gptjax.test.fault_log")
    logger.propagate = False
    for path, written in (("/dev/full", False), (tmp_path / "errors.log", True)):
        handler = FaultLogHandler(path)
        logger.handlers[:] = [handler]
        logger.error("the save failed")
        handler.close()
        assert capsys.readouterr().err == ""
    assert "the save failed" in (tmp_path / "errors.log").read_text()
    logger.handlers[:] = []
