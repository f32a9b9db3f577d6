"""The training log (train_log.jsonl): resume truncation, workers that do not log, and reading it back."""

from t2i.training.runlog import LOG_NAME, Logger, read_log


def write_steps(log_dir, steps):
    logger = Logger(log_dir, resume_step=0, report_to="none")
    for step in steps:
        logger.log(step, loss=step / 10, lr=1e-4)
    logger.close()


def test_read_log_returns_the_records_as_logged_oldest_first(tmp_path):
    write_steps(tmp_path / "logs", [1, 2, 3])
    assert read_log(tmp_path / "logs") == [{"step": s, "loss": s / 10, "lr": 1e-4} for s in (1, 2, 3)]


def test_resume_keeps_the_records_up_to_the_resume_step_and_appends_after_them(tmp_path):
    log_dir = tmp_path / "logs"
    write_steps(log_dir, [1, 2, 3, 4, 5])
    before = read_log(log_dir)
    logger = Logger(log_dir, resume_step=3, report_to="none")
    # Steps 4 and 5 were never checkpointed: they go as soon as the resumed run opens its log.
    assert read_log(log_dir) == before[:3]
    logger.log(4, loss=9.0, lr=2e-4)
    logger.close()
    assert read_log(log_dir) == before[:3] + [{"step": 4, "loss": 9.0, "lr": 2e-4}]


def test_a_disabled_logger_writes_nothing(tmp_path):
    """Workers other than rank 0: no folder, no file, and a log rank 0 wrote is left as it is (not truncated to the
    resume step, not appended to)."""
    Logger(tmp_path / "fresh", resume_step=0, report_to="none", enabled=False).log(1, loss=1.0)
    assert not (tmp_path / "fresh").exists()
    log_dir = tmp_path / "logs"
    write_steps(log_dir, [1, 2, 3, 4, 5])
    text = (log_dir / LOG_NAME).read_text()
    logger = Logger(log_dir, resume_step=3, report_to="none", enabled=False)
    logger.log(4, loss=9.0)
    logger.close()
    assert (log_dir / LOG_NAME).read_text() == text
    assert sorted(p.name for p in log_dir.iterdir()) == [LOG_NAME]
