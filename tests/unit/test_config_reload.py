"""Live reloading of the configuration (`fusillade.config.ConfigWatcher`): a changed file is applied; an invalid,
refused or deleted one is not; restart keys warn; SIGHUP reloads; the watcher stops cleanly."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path

import pytest

from fusillade import errors
from fusillade.config import Config, ConfigWatcher, load_config
from tests.support.polling import until
from tests.unit.config_files import ROUTE, write


class Recorder:
    """An on_change callback that keeps what it was given, and can refuse configurations."""

    def __init__(self) -> None:
        self.seen: list[Config] = []
        self.refuse_port: int | None = None

    async def __call__(self, config: Config) -> None:
        if config.server.port == self.refuse_port:
            raise errors.ConfigurationError("refused for the test")
        self.seen.append(config)


def concurrency(config: Config) -> int:
    return config.models["m"].concurrency


async def test_the_watcher_applies_a_changed_file_and_ignores_an_invalid_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path, ROUTE + "concurrency = 1\n")
    recorder = Recorder()
    async with ConfigWatcher(
        path, load_config(path, environ={}), recorder, environ={}, poll_interval=0.01
    ) as watcher:
        write(tmp_path, ROUTE + "concurrency = 22\n")
        await until(lambda: recorder.seen, message="the new configuration")
        assert [concurrency(config) for config in recorder.seen] == [22]
        assert concurrency(watcher.config) == 22

        with caplog.at_level(logging.ERROR, logger="fusillade.config"):
            write(tmp_path, ROUTE + "concurrency = -1\n")
            await until(lambda: "Not reloading" in caplog.text, message="the error to be logged")
        assert "models.m.concurrency: must be at least 1" in caplog.text
        assert concurrency(watcher.config) == 22

        write(tmp_path, ROUTE + "concurrency = 333\n")
        await until(lambda: len(recorder.seen) == 2, message="the next valid configuration")
    assert [concurrency(config) for config in recorder.seen] == [22, 333]


async def test_a_configuration_the_callback_refuses_is_not_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path, ROUTE)
    recorder = Recorder()
    recorder.refuse_port = 1
    watcher = ConfigWatcher(path, load_config(path, environ={}), recorder, environ={})
    write(tmp_path, ROUTE + "[server]\nport = 1\n")
    with caplog.at_level(logging.ERROR, logger="fusillade.config"):
        assert await watcher.reload() is False
    assert "refused for the test" in caplog.text
    assert watcher.config.server.port == 8080
    assert await watcher.reload() is False  # the same file again: still refused, still not applied
    assert recorder.seen == []


async def test_a_reload_that_changes_nothing_calls_nothing_and_restart_keys_warn(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path, ROUTE)
    recorder = Recorder()
    watcher = ConfigWatcher(path, load_config(path, environ={}), recorder, environ={})
    assert await watcher.reload() is False
    write(tmp_path, 'database_url = "sqlite:///./other.db"\n' + ROUTE)
    with caplog.at_level(logging.WARNING, logger="fusillade.config"):
        assert await watcher.reload() is True
    assert "database_url changed" in caplog.text
    assert "only after a restart" in caplog.text
    assert len(recorder.seen) == 1


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on this platform")
async def test_sighup_reloads_even_when_the_file_looks_unchanged(tmp_path: Path) -> None:
    path = write(tmp_path, ROUTE + "concurrency = 11\n")
    before = os.stat(path)
    recorder = Recorder()
    async with ConfigWatcher(
        path, load_config(path, environ={}), recorder, environ={}, poll_interval=3600
    ) as watcher:
        watcher.handle_sighup()
        write(tmp_path, ROUTE + "concurrency = 12\n")  # same size; restore the time so polling cannot tell
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        os.kill(os.getpid(), signal.SIGHUP)
        await until(lambda: recorder.seen, message="the reload on SIGHUP")
    assert concurrency(recorder.seen[0]) == 12


async def test_a_deleted_file_keeps_the_configuration(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write(tmp_path, ROUTE)
    recorder = Recorder()
    with caplog.at_level(logging.ERROR, logger="fusillade.config"):
        async with ConfigWatcher(path, load_config(path, environ={}), recorder, environ={}, poll_interval=0.01):
            path.unlink()
            await until(lambda: "no such configuration file" in caplog.text, message="the error to be logged")
    assert recorder.seen == []


def test_the_poll_interval_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="poll_interval"):
        ConfigWatcher(tmp_path / "x.toml", Config(), Recorder(), poll_interval=0)


async def test_the_watcher_stops_cleanly(tmp_path: Path) -> None:
    path = write(tmp_path, ROUTE)
    watcher = ConfigWatcher(path, load_config(path, environ={}), Recorder(), environ={}, poll_interval=0.01)
    watcher.start()
    await watcher.stop()
    await watcher.stop()  # twice is fine
    assert not [task for task in asyncio.all_tasks() if task.get_name() == "config-watcher"]
