"""jsonl-file source in follow mode: inotify tells it about appended lines (Linux), polling is the fallback;
either way a pull is a long poll bounded by its wait_ms."""

from __future__ import annotations

import asyncio
import errno
import sys
from pathlib import Path

import pytest

from etlrouter.connectors import _follow
from etlrouter.connectors.jsonl_file_source import JsonlFileSource
from etlrouter.sdk import records_from_proto, serving
from tests.sdk.grpc_helpers import channel_to, pull

# A pull that was not woken by the append would wait this long: far past the test's own 10 s bound.
HUGE_WAIT_MS = 60_000


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux only")
async def test_follow_uses_inotify_and_an_append_wakes_a_waiting_pull(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text("one\n")
    source = JsonlFileSource(path, follow=True)
    async with serving(source) as host, channel_to(host.address) as channel:
        assert source.follow_mode == "inotify"
        first = await pull(channel, 10, wait_ms=0)
        waiting = asyncio.ensure_future(pull(channel, 10, wait_ms=HUGE_WAIT_MS))
        await asyncio.sleep(0.2)
        assert not waiting.done()
        with path.open("a") as f:
            f.write("two\n")
        # Only a notification can answer this in time: in inotify mode nothing polls the file.
        second = await asyncio.wait_for(waiting, 10)
    assert [r.value for r in records_from_proto(first.batch.records)] == [b"one"]
    assert [(r.offset, r.value) for r in records_from_proto(second.batch.records)] == [(2, b"two")]
    assert source.follow_mode == ""  # closed


async def test_follow_without_inotify_polls_and_still_picks_up_appends(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text("")
    source = JsonlFileSource(path, follow=True, use_inotify=False)
    async with serving(source) as host, channel_to(host.address) as channel:
        assert source.follow_mode == "poll"
        waiting = asyncio.ensure_future(pull(channel, 10, wait_ms=5_000))
        await asyncio.sleep(0.1)
        with path.open("a") as f:
            f.write("late\n")
        reply = await asyncio.wait_for(waiting, 10)
    assert [r.value for r in records_from_proto(reply.batch.records)] == [b"late"]


@pytest.mark.parametrize("use_inotify", [True, False])
async def test_a_follow_pull_with_nothing_new_answers_empty_at_its_deadline(
    tmp_path: Path, use_inotify: bool
) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text("")
    source = JsonlFileSource(path, follow=True, use_inotify=use_inotify)
    async with serving(source) as host, channel_to(host.address) as channel:
        loop = asyncio.get_running_loop()
        started = loop.time()
        reply = await asyncio.wait_for(pull(channel, 10, wait_ms=300), 10)
        took = loop.time() - started
    assert reply.batch.header.record_count == 0 and not reply.end_of_stream
    assert took >= 0.25


async def test_without_follow_there_is_no_watch(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text("one\n")
    source = JsonlFileSource(path)
    async with serving(source):
        assert source.follow_mode == ""


async def test_when_inotify_cannot_be_set_up_the_source_polls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_watches(path: object, mask: int = 0) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")  # what the per-user watch limit says

    monkeypatch.setattr(_follow, "open_watch", no_watches)
    path = tmp_path / "in.jsonl"
    path.write_text("")
    source = JsonlFileSource(path, follow=True)
    async with serving(source) as host, channel_to(host.address) as channel:
        assert source.follow_mode == "poll"
        waiting = asyncio.ensure_future(pull(channel, 10, wait_ms=5_000))
        await asyncio.sleep(0.1)
        with path.open("a") as f:
            f.write("late\n")
        reply = await asyncio.wait_for(waiting, 10)
    assert [r.value for r in records_from_proto(reply.batch.records)] == [b"late"]
