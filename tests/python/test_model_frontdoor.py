"""The README quick start and `kvagent chat`, as written, on the default model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.model
pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]


def _env(tmp_path):
    env = dict(os.environ)
    env["KVAGENT_HOME"] = str(tmp_path / "home")
    env["PYTHONPATH"] = str(ROOT / "python") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_quick_start_seed(tmp_path):
    code = """
import warnings
from kv_agent import CacheManager, AgentMemory
prompt, response = "My sister Olivia moved to Reykjavik.", "Got it."
new_query = "Where does my sister Olivia live?"
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    memory = AgentMemory(backend="gpu")
import torch
if not torch.cuda.is_available():
    assert any("falling back" in str(x.message) for x in w)
cache_manager = CacheManager(engine="hf")
cache_manager.store_kv(prompt, response)
relevant_kv = memory.retrieve(new_query, top_k=5)
assert relevant_kv and "Reykjavik" in relevant_kv[0].text, relevant_kv
assert relevant_kv[0].kv().shape[3] == relevant_kv[0].num_tokens
ans = cache_manager.generate(new_query)
print("ANSWER", ans.text, ans.prefill_tokens, ans.reused_tokens)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900,
                         env=_env(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ANSWER" in out.stdout and "reykjavik" in out.stdout.lower(), out.stdout


def test_chat_cli_remembers_across_sessions(tmp_path):
    store = tmp_path / "chat"
    env = _env(tmp_path)
    cmd = [sys.executable, "-m", "kv_agent.cli", "chat", "--store", str(store), "--max-new-tokens", "12"]
    first = subprocess.run(cmd + ["--session", "monday"], input="The wifi password at our cabin is bluefalcon42.\n/quit\n",
                           capture_output=True, text=True, timeout=900, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "prefilled" in first.stdout and "reused" in first.stdout
    second = subprocess.run(cmd + ["--session", "tuesday"], input="What is the wifi password at our cabin?\n/quit\n",
                            capture_output=True, text=True, timeout=900, env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "memory monday#1" in second.stdout, second.stdout  # the remembered turn, with its score
    assert "bluefalcon" in second.stdout.lower(), second.stdout
