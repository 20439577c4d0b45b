"""vLLM's OpenAI server with the kv-agent connector (the command in docs/engine-vllm.md): the
prompt's KV is persisted into a kv-agent store directory, reused by the same server, and reused
by a new server process after a restart (greedy output unchanged, vLLM's cached-token count)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytestmark = pytest.mark.engine

pytest.importorskip("vllm")

from kv_agent.engines.vllm import default_model_dir, server_kv_transfer_config  # noqa: E402

PROMPT = ("Notes from earlier conversations with the user. " * 6 +
          "User: My sister Olivia moved to Reykjavik last spring. Assistant: Got it, I will remember that. " * 12 +
          "\nQuestion: Where does my sister Olivia live?\nAnswer:")  # 315 tokens: two full 128-token chunks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_cmd(model: str, port: int, store: str) -> list[str]:
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
            "--port", str(port), "--enforce-eager", "--no-enable-prefix-caching", "--max-model-len", "2048",
            "--enable-prompt-tokens-details", "--kv-transfer-config", server_kv_transfer_config(store)]


class _Server:
    def __init__(self, model, store, workdir):
        self.port = _free_port()
        env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1",
                   VLLM_RPC_BASE_PATH=str(workdir), TMPDIR=str(workdir))
        self.log = open(workdir / f"server-{self.port}.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(_server_cmd(model, self.port, store), env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.time() + 900
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited with {self.proc.returncode}: {self.log.name}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(2)
        self.stop()
        raise RuntimeError("vLLM server did not become ready in 900 s")

    def complete(self, model: str) -> tuple[str, int, int]:
        body = json.dumps({"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            out = json.loads(r.read())
        details = out["usage"].get("prompt_tokens_details") or {}
        return out["choices"][0]["text"], int(details.get("cached_tokens") or 0), int(out["usage"]["prompt_tokens"])

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def test_server_persists_prompt_kv_across_restart(tmp_path):
    model = str(default_model_dir())
    store = str(tmp_path / "store")
    srv = _Server(model, store, tmp_path)
    try:
        text1, cached1, n_prompt = srv.complete(model)
        text2, cached2, _ = srv.complete(model)
    finally:
        srv.stop()
    expected = (n_prompt - 1) // 128 * 128
    assert expected >= 256
    assert cached1 == 0 and cached2 == expected
    assert text1 == text2
    from kv_agent.store import Store

    with Store.open(store) as s:  # the chunks are on disk, one segment per 128 tokens
        assert len(s.list()) == expected // 128
    srv = _Server(model, store, tmp_path)  # a new process: memory from the store directory
    try:
        text3, cached3, _ = srv.complete(model)
    finally:
        srv.stop()
    assert cached3 == expected and text3 == text1
