"""Engine adapters: engine KV layout <-> kv_agent's canonical layout."""
