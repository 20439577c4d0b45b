"""GPU KV path from Python (run on a GPU machine): the store's device tier exported to torch
through DLPack without copies, and the fused kernels against the CPU reference positioner
(kv_agent.rope): bit-exact for plain copies and values, tolerance for rotated keys."""

import numpy as np
import pytest

import kv_agent as ka
from kv_agent import cuda
from kv_agent import rope as rope_ref
from kv_agent.store import Segment, Store

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.gpu

MODEL = ka.Hash128.of_str("cuda-gpu-test")


def _spec(layers, kv_heads, head_dim, dtype, theta=10000.0):
    r = ka.RopeSpec()
    r.theta = theta
    return ka.uniform_model_spec("t", layers, kv_heads * 2, kv_heads, head_dim, dtype, r, MODEL), r


def _canonical(layers, heads, tokens, dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(layers, 2, heads, tokens, dim, generator=g, dtype=torch.float32).to(dtype)


def test_store_get_device_exports_cuda_tensors_without_copy():
    assert cuda.is_available()
    kv = _canonical(2, 2, 37, 64, torch.bfloat16)
    seg = Segment(kv, tokens=list(range(37)), model=MODEL, ns="n", session="s", turn=1)
    with Store.open(device_capacity_bytes=64 << 20) as store:
        store.put(seg)
        d = store.get_device(seg.key, MODEL)
        assert isinstance(d, cuda.DeviceSegment)
        t = d.kv()
        assert t.is_cuda and t.dtype == torch.bfloat16 and tuple(t.shape) == (2, 2, 2, 37, 64)
        assert t.data_ptr() == d.data_ptr
        assert torch.equal(t.cpu(), kv)
        assert torch.equal(d.k(1).cpu(), kv[1, 0]) and torch.equal(d.v().cpu(), kv[:, 1])
        via_dlpack = torch.from_dlpack(d)
        assert via_dlpack.data_ptr() == d.data_ptr and via_dlpack.device.type == "cuda"
        assert d.__dlpack_device__() == (2, 0)
        assert list(d.tokens) == list(range(37))
        again = store.get_device(seg.key, MODEL)
        assert again.data_ptr == d.data_ptr
        st = store.stats()
        assert st["has_device"] and st["device"]["hits"] == 1 and st["device"]["misses"] == 1
        with pytest.raises(ka.FailedPreconditionError):
            store.get_device(seg.key, ka.Hash128.of_str("other"))
        with pytest.raises(ka.NotFoundError):
            store.get_device(ka.Hash128.of_str("absent"), MODEL)
    # The tensor keeps the device bytes alive after the store is closed.
    del d, again
    assert torch.equal(t.cpu(), kv)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("layout", ["token_major", "head_major"])
def test_plain_copy_is_bit_exact(dtype, layout):
    L, H, T, D, cap = 3, 2, 19, 80, 64
    src = _canonical(L, H, T, D, dtype, seed=1).cuda()
    shape = (cap, H, D) if layout == "token_major" else (H, cap, D)
    ks = [torch.zeros(shape, dtype=dtype, device="cuda") for _ in range(L)]
    vs = [torch.zeros(shape, dtype=dtype, device="cuda") for _ in range(L)]
    cuda.load(src, ks, vs, layout=layout, slots=7)
    torch.cuda.synchronize()
    for layer in range(L):
        for kv, cache in ((0, ks), (1, vs)):
            got = cache[layer][7 : 7 + T] if layout == "token_major" else cache[layer][:, 7 : 7 + T]
            want = src[layer, kv].transpose(0, 1) if layout == "token_major" else src[layer, kv]
            assert torch.equal(got, want), (layer, kv)
        untouched = cache[layer][:7] if layout == "token_major" else cache[layer][:, :7]
        assert torch.count_nonzero(untouched) == 0


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("fused", [False, True])
def test_paged_slots_rotation_against_cpu_reference(block_size, fused):
    L, H, T, D, blocks = 2, 4, 45, 128, 8
    spec, rspec = _spec(L, H, D, ka.DType.f32, theta=500000.0)
    src = _canonical(L, H, T, D, torch.float32, seed=2)
    g = torch.Generator().manual_seed(3)
    slots = torch.randperm(blocks * block_size, generator=g)[:T].to(torch.int64)
    positions = torch.arange(T, dtype=torch.int64) + 1000
    if fused:
        caches = [torch.zeros(2, blocks, block_size, H, D, device="cuda") for _ in range(L)]
        cuda.load(
            src.cuda(),
            caches,
            None,
            layout="paged_fused",
            spec=spec,
            rotation="apply",
            slots=slots.cuda(),
            new_positions=positions.cuda(),
        )
        ks, vs = [c[0] for c in caches], [c[1] for c in caches]
    else:
        ks = [torch.zeros(blocks, block_size, H, D, device="cuda") for _ in range(L)]
        vs = [torch.zeros(blocks, block_size, H, D, device="cuda") for _ in range(L)]
        cuda.load(
            src.cuda(),
            ks,
            vs,
            layout="paged",
            spec=spec,
            rotation="apply",
            slots=slots.cuda(),
            new_positions=1000,
        )
    torch.cuda.synchronize()
    for layer in range(L):
        k_flat = ks[layer].reshape(-1, H, D).cpu()[slots]  # [T, H, D]
        v_flat = vs[layer].reshape(-1, H, D).cpu()[slots]
        want_k = rope_ref.apply(src[layer, 0].contiguous(), positions.numpy(), rspec, D)  # [H, T, D]
        assert torch.allclose(k_flat.transpose(0, 1), want_k, rtol=1e-5, atol=1e-5)
        assert torch.equal(v_flat.transpose(0, 1), src[layer, 1])


def test_device_segment_load_head_major_with_rotation_and_save_roundtrip():
    L, H, T, D = 2, 2, 33, 64
    spec, rspec = _spec(L, H, D, ka.DType.bf16)
    kv = _canonical(L, H, T, D, torch.bfloat16, seed=4)
    seg = Segment(kv, tokens=list(range(T)), model=spec, ns="n", session="s", turn=2)
    stream = torch.cuda.Stream()
    with Store.open(device_capacity_bytes=8 << 20) as store:
        store.put(seg)
        d = store.get_device(seg.key, MODEL)
        ks = [torch.zeros(H, 64, D, dtype=torch.bfloat16, device="cuda") for _ in range(L)]
        vs = [torch.zeros(H, 64, D, dtype=torch.bfloat16, device="cuda") for _ in range(L)]
        with torch.cuda.stream(stream):
            cuda.load(d, ks, vs, layout="head_major", spec=spec, rotation="apply", new_positions=500)
            del d  # the recorded stream use keeps the bytes until the kernel ran
            back = torch.zeros(L, 2, H, T, D, dtype=torch.bfloat16, device="cuda")
            cuda.save(back, ks, vs, layout="head_major", spec=spec, rotation="inverse", old_positions=500)
        stream.synchronize()
    positions = np.arange(T, dtype=np.int64) + 500
    for layer in range(L):
        want = rope_ref.apply(kv[layer, 0].float(), positions, rspec, D).to(torch.bfloat16)
        got = ks[layer][:, :T].cpu()
        # bf16 rounding of the rotated result: at most one bf16 ulp apart
        assert torch.allclose(got.float(), want.float(), rtol=2**-7, atol=1e-2)
        assert torch.equal(vs[layer][:, :T].cpu(), kv[layer, 1])
        assert torch.equal(back[layer, 1].cpu(), kv[layer, 1])
        assert torch.allclose(back[layer, 0].cpu().float(), kv[layer, 0].float(), rtol=2**-6, atol=5e-2)


def _zeros(shape, dtype=torch.bfloat16, device="cuda"):
    return [torch.zeros(shape, dtype=dtype, device=device)]


def test_wrong_dtype_shape_device_raise_invalid_argument():
    src = _canonical(1, 2, 5, 64, torch.bfloat16).cuda()
    good = _zeros((8, 2, 64))
    with pytest.raises(ka.InvalidArgumentError, match="dtype|canonical"):
        cuda.load(src, _zeros((8, 2, 64), torch.float16), _zeros((8, 2, 64), torch.float16))
    with pytest.raises(ka.InvalidArgumentError, match="CUDA"):
        cuda.load(src, _zeros((8, 2, 64), device="cpu"), _zeros((8, 2, 64), device="cpu"))
    with pytest.raises(ka.InvalidArgumentError, match="dimensions"):
        cuda.load(src, _zeros((8, 64)), good)
    with pytest.raises(ka.InvalidArgumentError, match="kv_heads"):
        cuda.load(src, _zeros((8, 4, 64)), _zeros((8, 4, 64)))
    with pytest.raises(ka.InvalidArgumentError, match="src"):
        cuda.load(src.cpu(), good, good)
    with pytest.raises(ka.InvalidArgumentError, match="rope"):
        cuda.load(src, good, good, rotation="apply")
    with pytest.raises(ka.InvalidArgumentError, match="layout"):
        cuda.load(src, good, good, layout="nope")
