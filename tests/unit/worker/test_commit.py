"""Stage 5: commits name their run, and their log lines tell a retry from another writer."""

from __future__ import annotations

import logging
import threading

import pytest

from tests.support.lossy_proxy import LossyProxy
from worker.commit import CommitQueue, Committer, ShardResult
from worker.results import part_name
from worker.storage.gcs import GCSStorage

FINGERPRINT = "0123456789abcdef"
RESULT = ShardResult(rows=[("a", "cat", 3, 0.5, "gs://in/a.jpg")], errors=[("gs://in/b.jpg", "empty file")])


def test_scan_counts_only_this_runs_parts(tmp_path):
    out = str(tmp_path / "out")
    Committer(out, FINGERPRINT).commit(0, RESULT)
    Committer(out, "fedcba9876543210").commit(1, RESULT)
    (tmp_path / "out" / "parts" / "part-00002.csv").write_text("image_id\n")  # an older worker's name
    (tmp_path / "out" / "parts" / ".part-00003.csv.x.tmp").write_text("half")  # an unfinished write

    committed, foreign = Committer(out, FINGERPRINT).scan()

    assert committed == {0}
    assert [p.rsplit("/", 1)[1] for p in foreign] == ["part-00001-fedcba9876543210.csv", "part-00002.csv"]


def test_a_second_write_of_the_same_bytes_is_a_retry_and_other_bytes_another_writer(tmp_path, caplog):
    out = str(tmp_path / "out")
    committer = Committer(out, FINGERPRINT)
    assert committer.commit(4, RESULT)
    with caplog.at_level(logging.INFO, logger="worker.commit"):
        assert committer.commit(4, RESULT)
        assert "retried write" in caplog.text and "another writer" not in caplog.text
        caplog.clear()
        assert not committer.commit(4, ShardResult(rows=[("a", "dog", 5, 0.9, "gs://in/a.jpg")]))
    assert "another writer" in caplog.text
    assert b"cat" in (tmp_path / "out" / "parts" / part_name(4, FINGERPRINT)).read_bytes(), (
        "the first part stays"
    )


def test_gcs_create_only_write_whose_response_was_lost_is_logged_as_a_retry(gcs, caplog):
    """The part's upload reaches the emulator, its response is lost, the client retries and
    gets 412: the commit must see its own bytes and say so, not blame another writer.
    """
    bucket = gcs.new_bucket("lost")
    out = f"gs://{bucket}/out"
    name = part_name(7, FINGERPRINT)
    proxy = LossyProxy(gcs.url, lambda method, path: method == "POST" and "ifGenerationMatch=0" in path)
    try:
        committer = Committer(out, FINGERPRINT)
        with pytest.MonkeyPatch.context() as env:
            env.setenv("STORAGE_EMULATOR_HOST", proxy.url)
            committer.storage = GCSStorage(retry_deadline=30)  # its client is made through the proxy
            with caplog.at_level(logging.INFO, logger="worker.commit"):
                assert committer.commit(7, RESULT)
    finally:
        proxy.stop()

    assert len(proxy.lost) == 1, "the first upload's response must have been lost"
    assert "retried write" in caplog.text and "another writer" not in caplog.text
    assert gcs.object_names(bucket, "out/parts/") == [f"out/parts/{name}"]
    assert gcs.client.bucket(bucket).blob(f"out/parts/{name}").download_as_bytes().count(b"\n") == 2


class _Recording(Committer):
    """Records the order of commits; blocks each one until the test lets it go."""

    def __init__(self, out: str, *, fail_on: int | None = None):
        super().__init__(out, FINGERPRINT)
        self.order: list[int] = []
        self.fail_on = fail_on
        self.go = threading.Semaphore(0)

    def commit(self, shard_index: int, result: ShardResult) -> bool:
        self.go.acquire()
        if shard_index == self.fail_on:
            raise OSError(f"shard {shard_index}: the store refused the write")
        self.order.append(shard_index)
        return super().commit(shard_index, result)


def test_commit_queue_commits_in_order_off_the_callers_thread_with_sorted_rows(tmp_path):
    committer = _Recording(str(tmp_path / "out"))
    rows = [("b", "cat", 3, 0.5, "gs://in/b.jpg"), ("a", "dog", 5, 0.9, "gs://in/a.jpg")]
    with CommitQueue(committer, uri_column=4, backlog=4) as commits:
        for shard in (2, 0, 1):
            commits.submit(
                shard, ShardResult(rows=list(rows), errors=[("gs://in/z", "x"), ("gs://in/c", "y")])
            )
        assert committer.order == [], "submit must return before the commit is done"
        for _ in range(3):
            committer.go.release()
        assert commits.close() == 3
    assert committer.order == [2, 0, 1]
    part = (tmp_path / "out" / "parts" / part_name(0, FINGERPRINT)).read_text().splitlines()
    assert [line.rsplit(",", 1)[1] for line in part[1:]] == ["gs://in/a.jpg", "gs://in/b.jpg"]


def test_commit_queue_holds_at_most_its_backlog(tmp_path):
    committer = _Recording(str(tmp_path / "out"))
    commits = CommitQueue(committer, uri_column=4, backlog=1)
    commits.submit(0, RESULT)
    submitted = threading.Event()
    second = threading.Thread(target=lambda: (commits.submit(1, RESULT), submitted.set()))
    second.start()
    assert not submitted.wait(0.2), "a second shard must wait while the first is uncommitted"
    committer.go.release()
    assert submitted.wait(30)
    second.join()
    committer.go.release()
    assert commits.close() == 2


def test_a_failed_commit_is_raised_to_the_loop(tmp_path):
    committer = _Recording(str(tmp_path / "out"), fail_on=1)
    commits = CommitQueue(committer, uri_column=4, backlog=1)
    for _ in range(3):
        committer.go.release()
    commits.submit(0, RESULT)
    commits.submit(1, RESULT)
    with pytest.raises(OSError, match="shard 1: the store refused"):
        commits.submit(2, RESULT)
        commits.close()
    assert committer.order == [0]
