"""How tests/python/data/legacy_fingerprint_store was written: run from the repository root at commit
e6d6898 (the fingerprint over config.to_json_string), PYTHONPATH=python. Kept for provenance; with
later code it would write the new fingerprint."""

import json
import shutil
import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, "tests/python")
from kv_agent.api import AgentMemory, CacheManager  # noqa: E402
from tiny_models import ByteTokenizer, tiny_llama  # noqa: E402

torch.set_grad_enabled(False)
out = Path("tests/python/data/legacy_fingerprint_store")
shutil.rmtree(out / "store", ignore_errors=True)
mem = AgentMemory(out / "store", backend="cpu", namespace="golden", write_behind=False)
cm = CacheManager(model=(tiny_llama(seed=5), ByteTokenizer()), memory=mem, session="s1",
                  system_prompt="You remember things.")
k1 = cm.store_kv("My dog is called Biscuit.", "Nice name!")
k2 = cm.store_kv("I live in Lisbon.", "Lovely city.")
mem.flush()
info = {"written_by": "kv-agent main e6d6898 (CacheManager, weights_fingerprint over config.to_json_string)",
        "transformers_version": transformers.__version__, "model": "tiny_llama(seed=5), ByteTokenizer",
        "fingerprint": cm.spec.fingerprint.hex(), "prefix_key": cm.prefix_key.hex(),
        "keys": [k.hex() for k in k1 + k2], "system_prompt": "You remember things.", "namespace": "golden",
        "session": "s1"}
mem.close()
(out / "written_by.json").write_text(json.dumps(info, indent=1) + "\n")
print(info)
