"""The shared Redis tier from Python: Store.open(remote=...) and AgentMemory(remote=...), against a
real redis-server started here (loopback, a free port, no persistence)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import kv_agent as ka
from kv_agent.errors import PermissionDeniedError
from kv_agent.store import Segment, Store

MODEL = ka.Hash128.of_str("remote-test-model")
HERE = Path(__file__).parent

if shutil.which("redis-server") is None:  # installed by the Makefile (Debian redis-server)
    pytest.fail("redis-server is not installed (make deps-apt installs it)", pytrace=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(port: int, *args: str) -> str:
    return subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.fixture()
def redis(tmp_path):
    port = _free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path), "--protected-mode", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        try:
            if _cli(port, "PING") == "PONG":
                break
        except subprocess.CalledProcessError:
            pass
        time.sleep(0.01)
    yield port
    proc.kill()
    proc.wait()


def _segment(turn: int, agent: str = "a") -> Segment:
    kv = np.random.default_rng(turn).standard_normal((2, 2, 2, 5, 8)).astype(np.float32)
    return Segment(kv, tokens=list(range(turn, turn + 5)), model=MODEL, ns="team", agent=agent, session="s",
                   turn=turn, text=f"turn {turn}", summary=b"ck")


def test_another_process_reads_what_one_wrote(redis):
    url = f"redis://127.0.0.1:{redis}"
    segs = [_segment(t) for t in range(3)]
    with Store.open(None, remote=url, remote_namespace="team") as store:
        for s in segs:
            store.put(s)
        store.flush_remote(10000)
        st = store.stats()
        assert st["has_remote"] and st["remote"]["puts"] == 3 and st["remote"]["queue_depth"] == 0
        expected = [s.kv().copy() for s in segs]
        keys = [s.key.hex() for s in segs]
    code = textwrap.dedent(f"""
        import numpy as np, kv_agent as ka
        from kv_agent.store import Store
        model = ka.Hash128.of_str("remote-test-model")
        with Store.open(None, remote={url!r}, remote_namespace="team") as store:
            rows = store.list(model=model)
            assert sorted(r.key.hex() for r in rows) == sorted({keys!r}), rows
            assert all(r.summary == b"ck" and r.meta.agent == "a" for r in rows)
            for k in {keys!r}:
                np.save(__import__("sys").stdout.buffer, store.get(k, model).kv())
            assert store.stats()["remote"]["hits"] == 3
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr.decode()
    import io

    buf = io.BytesIO(out.stdout)
    for e in expected:
        np.testing.assert_array_equal(np.load(buf), e)


def test_server_down_at_open_serves_locally(tmp_path):
    url = f"redis://127.0.0.1:{_free_port()}"
    with Store.open(str(tmp_path / "s"), remote=url, remote_namespace="team", remote_timeout_ms=200) as store:
        s = _segment(1)
        store.put(s)
        np.testing.assert_array_equal(store.get(s.key, MODEL).kv(), s.kv())
        assert store.stats()["remote"]["connected"] is False
        with pytest.raises(ka.errors.NotFoundError):
            store.get(_segment(2).key, MODEL)


def test_wrong_credentials_and_other_tenants_namespace_fail_at_open(redis):
    for user in ("alice", "bob"):
        _cli(redis, "ACL", "SETUSER", user, "on", f">pw-{user}", "resetkeys", f"~kva:v1:{user}:*", "+@all")
    with pytest.raises(PermissionDeniedError, match="credentials") as e:
        Store.open(None, remote=f"redis://alice:wrong-secret@127.0.0.1:{redis}", remote_namespace="alice")
    assert "wrong-secret" not in str(e.value)
    with pytest.raises(PermissionDeniedError, match="namespace"):
        Store.open(None, remote=f"redis://bob:pw-bob@127.0.0.1:{redis}", remote_namespace="alice")
    Store.open(None, remote=f"redis://alice:pw-alice@127.0.0.1:{redis}", remote_namespace="alice").close()


def test_late_joiner_agent_bootstraps_from_redis(redis, tmp_path):
    """Agent A (its own disk path) stores a fact; agent B, another process with no local path,
    retrieves it and answers from A's KV."""
    pytest.importorskip("transformers")
    import torch

    from kv_agent.api import AgentMemory, CacheManager

    sys.path.insert(0, str(HERE))
    from tiny_models import ByteTokenizer, tiny_llama

    torch.set_grad_enabled(False)
    url = f"redis://127.0.0.1:{redis}"
    mem = AgentMemory(tmp_path / "a", backend="cpu", namespace="crew", agent="planner", remote=url)
    cm = CacheManager(model=(tiny_llama(seed=3), ByteTokenizer()), memory=mem, session="plan")
    cm.store_kv("The launch is on Friday.", "Noted.")
    mem.store.flush_remote(10000)
    mem.close()
    code = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(HERE)!r})
        from tiny_models import ByteTokenizer, tiny_llama
        from kv_agent.api import AgentMemory, CacheManager
        torch.set_grad_enabled(False)
        mem = AgentMemory(":memory:", backend="cpu", namespace="crew", agent="executor", remote={url!r})
        cm = CacheManager(model=(tiny_llama(seed=3), ByteTokenizer()), memory=mem, session="run")
        hits = mem.retrieve("When is the launch?", top_k=1, agent="planner")
        assert len(hits) == 1 and hits[0].session == "plan" and "Friday" in hits[0].text, hits
        ans = cm.generate("When is the launch?", top_k=1, max_new_tokens=2)
        assert ans.reused_tokens > ans.prefill_tokens
        assert mem.stats()["remote"]["hits"] >= 1
        print("OK", len(mem.index))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "OK 1" in out.stdout
