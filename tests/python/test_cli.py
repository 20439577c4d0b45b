"""`kvagent store ...` on a real store, run as a subprocess (python -m kv_agent.cli)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import kv_agent as ka
from kv_agent.store import Segment, Store

MODEL = ka.Hash128.of_str("cli-test-model")
PYTHONPATH = str(Path(ka.__file__).resolve().parent.parent)
TURNS = 5


def kvagent(*args, check=True):
    env = dict(os.environ, PYTHONPATH=PYTHONPATH)
    r = subprocess.run(
        [sys.executable, "-m", "kv_agent.cli", *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if check:
        assert r.returncode == 0, f"rc={r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    return r


def payload(turn: int) -> np.ndarray:
    # Distinct, recognisable bytes per turn (so a test can find them in the segment files).
    rng = np.random.default_rng(1000 + turn)
    return rng.standard_normal((2, 2, 2, 16, 32)).astype(np.float32)


@pytest.fixture()
def store_dir(tmp_path):
    with Store.open(str(tmp_path), write_behind=False, sync=False) as store:
        for t in range(TURNS):
            store.put(
                Segment(
                    payload(t),
                    tokens=list(range(t, t + 16)),
                    positions=list(range(100, 116)),
                    model=MODEL,
                    ns="app",
                    agent="bot",
                    session="s1" if t < 3 else "s2",
                    turn=t,
                    role="user" if t % 2 == 0 else "assistant",
                    text=f"turn number {t}: " + "lorem ipsum " * 10,
                    time_us=1_764_300_000_000_000 + t,
                )
            )
    return tmp_path


def test_help_lists_store_group():
    r = kvagent("--help")
    assert "store" in r.stdout
    r = kvagent("store", "--help")
    for action in ("stats", "ls", "show", "verify", "gc"):
        assert action in r.stdout


def test_stats(store_dir):
    st = json.loads(kvagent("store", "stats", store_dir, "--json").stdout)
    assert st["has_disk"] and st["disk"]["segments"] == TURNS
    assert st["disk"]["bytes"] >= TURNS * payload(0).nbytes
    text = kvagent("store", "stats", store_dir).stdout
    assert "TIER" in text and "disk" in text and "host" in text
    disk_row = next(line for line in text.splitlines() if line.startswith("disk "))
    assert disk_row.split()[1] == str(TURNS)


def test_ls_with_filters(store_dir):
    rows = json.loads(kvagent("store", "ls", store_dir, "--json").stdout)
    assert sorted(r["meta"]["turn"] for r in rows) == list(range(TURNS))
    assert all(r["layout"]["num_tokens"] == 16 and r["payload_bytes"] == payload(0).nbytes for r in rows)
    rows = json.loads(kvagent("store", "ls", store_dir, "--session", "s2", "--json").stdout)
    assert sorted(r["meta"]["turn"] for r in rows) == [3, 4]
    rows = json.loads(kvagent("store", "ls", store_dir, "--ns", "nope", "--json").stdout)
    assert rows == []
    text = kvagent("store", "ls", store_dir, "--limit", "2").stdout
    lines = text.strip().splitlines()
    assert lines[0].split()[:4] == ["KEY", "NS", "AGENT", "SESSION"]
    assert len(lines) == 1 + 2 + 1 and lines[-1] == "2 segment(s)"
    assert "turn number 0:" in lines[1] and "s1" in lines[1] and "user" in lines[1]
    assert "2025-11-28" in lines[1]  # time column (UTC)
    # --since is inclusive, at microsecond resolution.
    rows = json.loads(
        kvagent("store", "ls", store_dir, "--since", "2025-11-28T03:20:00.000003", "--json").stdout
    )
    assert sorted(r["meta"]["turn"] for r in rows) == [3, 4]


def test_show_by_prefix(store_dir):
    key = ka.memory_key("app", "s1", 2)
    text = kvagent("store", "show", store_dir, key.hex()[:10]).stdout
    assert key.hex() in text
    assert (
        "checksums: ok" in text
        and "positions: 100..115" in text
        and f"codec:     raw ({payload(0).nbytes} encoded" in text
    )
    assert "[layers=2][k|v][kv_heads=2][tokens=16][head_dim=32]" in text and "dtype:     f32" in text
    d = json.loads(kvagent("store", "show", store_dir, key.hex(), "--json").stdout)
    assert d["meta"]["turn"] == 2 and d["checksums"] == "ok" and d["positions_range"] == [100, 115]
    assert d["codec"].startswith("raw")
    r = kvagent("store", "show", store_dir, "ffffffffffff", check=False)
    assert r.returncode == 1 and "NotFoundError" in r.stderr


def test_show_int8_codec(tmp_path):
    kv = payload(0)
    with Store.open(str(tmp_path), codec="int8", write_behind=False) as store:
        store.put(Segment(kv, tokens=list(range(16)), model=MODEL, ns="q", session="z", turn=0))
    text = kvagent("store", "show", tmp_path, ka.memory_key("q", "z", 0).hex()).stdout
    encoded = ka._core.codec_encoded_size(Segment(kv, tokens=list(range(16)), model=MODEL).layout, "int8")
    assert f"codec:     int8 ({encoded} encoded payload bytes)" in text and "checksums: ok" in text


def corrupt_payload(store_dir: Path, turn: int) -> None:
    needle = payload(turn).tobytes()[256:320]
    for f in store_dir.rglob("*.kvs"):
        data = bytearray(f.read_bytes())
        at = data.find(needle)
        if at >= 0:
            data[at + 7] ^= 0x40
            f.write_bytes(bytes(data))
            return
    pytest.fail("payload bytes not found in any segment file")


def test_verify_detects_corruption(store_dir):
    r = kvagent("store", "verify", store_dir, "--progress", "on")
    assert f"{TURNS} records, {TURNS} ok, 0 corrupt" in r.stdout
    assert "verify" in r.stderr  # the progress bar
    corrupt_payload(store_dir, 3)
    r = kvagent("store", "verify", store_dir, check=False)
    assert r.returncode == 1
    assert f"{TURNS - 1} ok, 1 corrupt" in r.stdout and "CORRUPT" in r.stdout
    # The corrupt record was reported and quarantined; the rest verifies clean.
    assert f"{TURNS - 1} records, {TURNS - 1} ok, 0 corrupt" in kvagent("store", "verify", store_dir).stdout
    assert (
        "NotFoundError"
        in kvagent("store", "show", store_dir, ka.memory_key("app", "s2", 3).hex(), check=False).stderr
    )
    # show reads (and checks) the record itself.
    corrupt_payload(store_dir, 4)
    r = kvagent("store", "show", store_dir, ka.memory_key("app", "s2", 4).hex(), check=False)
    assert r.returncode == 1 and "checksums: CORRUPT" in r.stdout
    corrupt_payload(store_dir, 1)
    report = json.loads(kvagent("store", "verify", store_dir, "--json", check=False).stdout)
    assert report["corrupt"] == 1 and len(report["problems"]) == 1
    assert ka.memory_key("app", "s1", 1).hex() in report["problems"][0]
    # The other records stay readable.
    with Store.open(str(store_dir)) as store:
        for t in (0, 2):
            np.testing.assert_array_equal(store.get(ka.memory_key("app", "s1", t), MODEL).kv(), payload(t))


def test_gc_reclaims_deleted_space(store_dir):
    with Store.open(str(store_dir)) as store:
        for t in range(3):
            store.delete(ka.memory_key("app", "s1", t))
    before = json.loads(kvagent("store", "stats", store_dir, "--json").stdout)["disk"]
    r = kvagent("store", "gc", store_dir, "--progress", "on")
    assert "records moved" in r.stdout
    after = json.loads(kvagent("store", "stats", store_dir, "--json").stdout)["disk"]
    assert after["segments"] == 2 and after["file_bytes"] < before["file_bytes"]
    assert "2 ok, 0 corrupt" in kvagent("store", "verify", store_dir).stdout


def test_missing_store_is_an_error(tmp_path):
    r = kvagent("store", "stats", tmp_path / "nope", check=False)
    assert r.returncode == 1 and "no store at" in r.stderr
    assert not (tmp_path / "nope").exists()
    r = kvagent("store", "frobnicate", tmp_path, check=False)
    assert r.returncode == 2  # argparse usage error
