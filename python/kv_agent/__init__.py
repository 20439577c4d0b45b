"""kv-agent: KV-cache memory for LLM agents.

The C++ core lives in :mod:`kv_agent._core`; this package re-exports its types and adds the
Python front door (AgentMemory, CacheManager) and the engine adapters.
"""

from __future__ import annotations

from kv_agent import (  # noqa: F401,E402
    _core,  # noqa: F401
    cuda,
    index,
    rope,
    store,
)
from kv_agent._core import (  # noqa: F401
    DType,
    Hash128,
    KvAgentError,
    LayerSpec,
    ModelSpec,
    RopeScaling,
    RopeSpec,
    RopeStyle,
    SegmentMeta,
    content_hash,
    memory_key,
    prefix_key,
    uniform_model_spec,
)
from kv_agent.api import AgentMemory, Answer, CacheManager, MemoryHit  # noqa: F401,E402
from kv_agent.errors import *  # noqa: F401,F403
from kv_agent.store import Segment, SegmentInfo, SegmentLayout, Store  # noqa: F401,E402

__version__ = "0.1.0"
