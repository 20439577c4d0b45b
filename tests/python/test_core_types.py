import pytest

import kv_agent as ka


def test_hash_roundtrip_and_keys():
    h = ka.memory_key("ns", "session", 3, 1)
    assert ka.Hash128.from_hex(h.hex()) == h
    assert ka.memory_key("ab", "c", 1) != ka.memory_key("a", "bc", 1)
    m = ka.Hash128.of_str("model")
    assert ka.prefix_key(m, ka.Hash128(), [1, 2, 3]) != ka.prefix_key(m, ka.Hash128(), [1, 2, 4])


def test_errors_map_to_classes():
    with pytest.raises(ka.InvalidArgumentError):
        ka.Hash128.from_hex("zz")
    with pytest.raises(ValueError):
        ka.Hash128.from_hex("zz")
    assert issubclass(ka.NotFoundError, KeyError)
    assert issubclass(ka.DataLossError, ka.KvAgentError)


def test_model_spec_serialize_and_validate():
    rope = ka.RopeSpec()
    rope.theta = 500000.0
    spec = ka.uniform_model_spec("tiny", 2, 8, 2, 16, ka.DType.bf16, rope, ka.Hash128.of_str("w"))
    spec.validate()
    assert spec.kv_bytes_per_token() == 2 * 2 * 2 * 16 * 2
    assert ka.ModelSpec.deserialize(spec.serialize()) == spec
    spec.num_q_heads = 3
    with pytest.raises(ka.InvalidArgumentError, match="multiple of num_kv_heads"):
        spec.validate()
