"""kv_agent.rope against transformers' own rotary implementations.

HF computes angles as fp32 ``position * inv_freq``, which is off by ~0.06 rad at position 1M
(see docs/rope.md). The main reference therefore takes HF's own ``inv_freq`` buffer and
``attention_scaling`` from the model's rotary class and HF's own ``apply_rotary_pos_emb``, but
evaluates cos/sin in float64 ("HF frequencies at exact angles"); a second check runs HF's full
fp32 pipeline at small positions where fp32 angles are still exact enough.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    Gemma3TextConfig,
    GPTJConfig,
    GPTNeoXConfig,
    LlamaConfig,
    PhiConfig,
)
from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding  # noqa: E402
from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXRotaryEmbedding  # noqa: E402
from transformers.models.gptj import modeling_gptj  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb  # noqa: E402
from transformers.models.phi.modeling_phi import PhiRotaryEmbedding  # noqa: E402

import kv_agent as ka  # noqa: E402
from kv_agent import rope  # noqa: E402

HEAD_DIMS = (64, 80, 128, 256)
TOL = 1e-5  # max abs error relative to the key's norm


def _llama(hd: int, rope_parameters: dict, max_pos: int = 131072) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=4 * hd,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hd,
        num_hidden_layers=1,
        intermediate_size=64,
        vocab_size=32,
        max_position_embeddings=max_pos,
        rope_parameters=rope_parameters,
    )


LLAMA_VARIANTS = {
    "default": ({"rope_type": "default", "rope_theta": 10000.0}, 131072),
    "linear": ({"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6}, 131072),
    "llama3": (
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
            "rope_theta": 500000.0,
        },
        131072,
    ),
    "yarn": (
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768, "rope_theta": 1e6},
        131072,
    ),
    "yarn_mscale": (
        {
            "rope_type": "yarn",
            "factor": 40.0,
            "original_max_position_embeddings": 4096,
            "rope_theta": 10000.0,
            "mscale": 1.0,
            "mscale_all_dim": 0.707,
            "beta_fast": 32,
            "beta_slow": 1,
        },
        163840,
    ),
    "yarn_attention_factor": (
        {
            "rope_type": "yarn",
            "factor": 8.0,
            "original_max_position_embeddings": 8192,
            "rope_theta": 1e6,
            "attention_factor": 1.3,
        },
        65536,
    ),
}


def _positions(t: int, max_pos: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    p = rng.integers(0, max_pos, size=t, dtype=np.int64)
    p[0] = 0
    if t > 1:
        p[-1] = max_pos - 1
    return p


def _exact_cos_sin(inv_freq: torch.Tensor, positions: np.ndarray, scaling: float):
    freqs = torch.from_numpy(positions).double()[:, None] * inv_freq.double()[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * scaling, emb.sin() * scaling


def _hf_half_split(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF apply_rotary_pos_emb on the first cos.shape[-1] dims (Phi/NeoX partial rotary split)."""
    rot = cos.shape[-1]
    k_rot, k_pass = k[..., :rot], k[..., rot:]
    _, k_emb = apply_rotary_pos_emb(k_rot, k_rot, cos[None], sin[None])
    return torch.cat((k_emb, k_pass), dim=-1)


def _assert_close(ours: torch.Tensor, ref: torch.Tensor, key: torch.Tensor, tol: float = TOL) -> None:
    err = (ours.double() - ref.double()).abs().amax(dim=-1)
    norm = key.double().norm(dim=-1)
    worst = float((err / norm).max())
    assert worst <= tol, f"max abs error / key norm = {worst:.3g} > {tol}"


def _assert_bf16_rounding(out_bf16: torch.Tensor, ref_f32: torch.Tensor, key: torch.Tensor) -> None:
    """bf16 result equals the reference up to one bf16 rounding (half an ulp <= |x| * 2**-8) plus the fp32 criterion."""
    ref = ref_f32.double()
    diff = (out_bf16.double() - ref).abs()
    allowed = ref.abs() * 2.0**-8 + TOL * key.double().norm(dim=-1, keepdim=True)
    assert bool((diff <= allowed).all()), float((diff - allowed).max())


def _check_variant(
    spec: ka.RopeSpec,
    inv_freq_hf: torch.Tensor,
    scaling: float,
    hd: int,
    max_pos: int,
    seed: int,
    hf_rotate=_hf_half_split,
    tokens: int = 37,
):
    ours_inv = torch.from_numpy(rope.inv_freq(spec, hd))
    assert ours_inv.shape == inv_freq_hf.shape
    # Same float32 frequencies as the model's buffer, up to torch's float pow, which is not always
    # correctly rounded (ours is pow in double rounded once): 1 ulp, 2 after YaRN's blend.
    ulp = torch.abs(ours_inv.view(torch.int32).long() - inv_freq_hf.float().view(torch.int32).long())
    assert int(ulp.max()) <= 2, ulp
    assert rope.attention_factor(spec) == pytest.approx(scaling, rel=1e-12)

    g = torch.Generator().manual_seed(seed)
    pre = torch.randn(2, 3, tokens, hd, generator=g)
    pos = _positions(tokens, max_pos, seed)
    cos, sin = _exact_cos_sin(inv_freq_hf, pos, scaling)
    ref = hf_rotate(pre.double(), cos, sin).float()
    ours = rope.apply(pre, pos, spec, hd)
    _assert_close(ours, ref, pre)

    # Round trip: HF's post-RoPE keys -> pre-RoPE (factor divided out once) -> post again.
    back = rope.apply(ref, torch.from_numpy(pos), spec, hd, inverse=True)
    _assert_close(back, pre, pre)
    again = rope.apply(back, pos, spec, hd)
    _assert_close(again, ref, pre)

    # Re-position: post at pos -> post at new positions == HF rotation at the new positions.
    new_pos = _positions(tokens, max_pos, seed + 1)[::-1].copy()
    moved = rope.reposition(ref, pos, new_pos.tolist(), spec, hd)
    cos2, sin2 = _exact_cos_sin(inv_freq_hf, new_pos, scaling)
    _assert_close(moved, hf_rotate(pre.double(), cos2, sin2).float(), pre)

    # bf16 and f16: within storage rounding of the fp32 result on the same inputs.
    for dt in (torch.bfloat16, torch.float16):
        pre_lp = pre.to(dt)
        out_lp = rope.apply(pre_lp, pos, spec, hd)
        assert out_lp.dtype == dt
        ref32 = rope.apply(pre_lp.float(), pos, spec, hd)
        assert torch.equal(out_lp, ref32.to(dt))  # exactly one round-to-nearest-even
        if dt == torch.bfloat16:
            hf_ref = hf_rotate(pre_lp.double(), cos, sin).float()
            _assert_bf16_rounding(out_lp, hf_ref, pre_lp)


@pytest.mark.parametrize("hd", HEAD_DIMS)
@pytest.mark.parametrize("variant", sorted(LLAMA_VARIANTS))
def test_llama_rotary_variants(variant: str, hd: int):
    params, max_pos = LLAMA_VARIANTS[variant]
    cfg = _llama(hd, dict(params), max_pos)
    hf = LlamaRotaryEmbedding(cfg)
    spec = rope.rope_spec_from_hf(cfg)
    # Positions up to 1M (beyond max_position_embeddings: the rotation itself is well defined).
    _check_variant(spec, hf.inv_freq, hf.attention_scaling, hd, 1_000_000, seed=hd)


@pytest.mark.parametrize("hd", HEAD_DIMS)
def test_dynamic_ntk_at_fixed_length(hd: int):
    cfg = _llama(hd, {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}, max_pos=2048)
    length = 5003  # HF rescales from the current sequence length; we fix it
    hf = LlamaRotaryEmbedding(cfg)
    x = torch.zeros(1, 1, hd)
    hf(x, torch.tensor([[length - 1]]))  # HF updates inv_freq for seq_len = max(position) + 1
    spec = rope.rope_spec_from_hf(cfg, dynamic_max_position=length)
    assert spec.dynamic_max_position == length
    _check_variant(spec, hf.inv_freq, hf.attention_scaling, hd, length, seed=hd + 1)
    # At or below max_position_embeddings HF's dynamic base equals the plain one.
    plain = rope.rope_spec_from_hf(cfg)
    ours = rope.inv_freq(plain, hd).view(np.int32).astype(np.int64)
    theirs = LlamaRotaryEmbedding(cfg).inv_freq.numpy().view(np.int32).astype(np.int64)
    assert np.abs(ours - theirs).max() <= 1


@pytest.mark.parametrize("variant", ["default", "llama3", "yarn"])
def test_full_hf_fp32_pipeline_at_small_positions(variant: str):
    """HF's own cos/sin (fp32 angles) and rotation, where fp32 angles are still accurate."""
    params, max_pos = LLAMA_VARIANTS[variant]
    for hd in HEAD_DIMS:
        cfg = _llama(hd, dict(params), max_pos)
        hf = LlamaRotaryEmbedding(cfg)
        spec = rope.rope_spec_from_hf(cfg)
        pre = torch.randn(1, 2, 41, hd, generator=torch.Generator().manual_seed(hd))
        pos = _positions(41, 128, hd)
        cos, sin = hf(pre, torch.from_numpy(pos)[None])
        _, ref = apply_rotary_pos_emb(pre, pre, cos, sin)
        _assert_close(rope.apply(pre, pos, spec, hd), ref, pre)


@pytest.mark.parametrize("hd", HEAD_DIMS)
def test_partial_rotary_phi_and_neox(hd: int):
    phi = PhiConfig(
        hidden_size=4 * hd,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_hidden_layers=1,
        intermediate_size=64,
        vocab_size=32,
        partial_rotary_factor=0.5,
    )
    spec = rope.rope_spec_from_hf(phi)
    assert spec.rotary_dim == hd // 2 - (hd // 2) % 2 or spec.rotary_dim == int(hd * 0.5)
    hf = PhiRotaryEmbedding(phi)
    _check_variant(spec, hf.inv_freq, hf.attention_scaling, hd, 1_000_000, seed=3 * hd)

    neox = GPTNeoXConfig(
        hidden_size=4 * hd, num_attention_heads=4, num_hidden_layers=1, intermediate_size=64, vocab_size=32
    )
    spec = rope.rope_spec_from_hf(neox)
    assert spec.rotary_dim == int(hd * 0.25)
    hf = GPTNeoXRotaryEmbedding(neox)
    _check_variant(spec, hf.inv_freq, hf.attention_scaling, hd, 1_000_000, seed=5 * hd, tokens=9)


def _gptj_rotate(rotary_dim: int):
    def rotate(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # HF GPT-J: k_rot = k[..., :rotary_dim]; sin/cos per pair, [B, T, H, D] layout.
        half = cos.shape[-1] // 2
        k_bthd = k.permute(0, 2, 1, 3)
        k_rot, k_pass = k_bthd[..., :rotary_dim], k_bthd[..., rotary_dim:]
        k_emb = modeling_gptj.apply_rotary_pos_emb(k_rot, sin[None, :, :half], cos[None, :, :half])
        return torch.cat((k_emb, k_pass), dim=-1).permute(0, 2, 1, 3)

    return rotate


@pytest.mark.parametrize("hd", HEAD_DIMS)
def test_gptj_interleaved(hd: int):
    rotary_dim = hd // 2
    cfg = GPTJConfig(
        n_embd=4 * hd, n_head=4, rotary_dim=rotary_dim, n_layer=1, vocab_size=32, n_positions=512
    )
    spec = rope.rope_spec_from_hf(cfg)
    assert spec.style == ka.RopeStyle.interleaved and spec.rotary_dim == rotary_dim
    # GPT-J's frequencies: recovered exactly by evaluating its table at small positions is not
    # possible (it stores sin/cos), so compare its table itself at small positions in fp32 ...
    table = modeling_gptj.create_sinusoidal_positions(128, rotary_dim)  # [pos, sin | cos]
    pos = _positions(29, 128, hd)
    sin, cos = torch.split(table[torch.from_numpy(pos)], rotary_dim // 2, dim=-1)
    pre = torch.randn(1, 3, 29, hd, generator=torch.Generator().manual_seed(hd))
    k = pre.permute(0, 2, 1, 3)
    k_rot = modeling_gptj.apply_rotary_pos_emb(k[..., :rotary_dim], sin[None], cos[None])
    ref = torch.cat((k_rot, k[..., rotary_dim:]), dim=-1).permute(0, 2, 1, 3)
    _assert_close(rope.apply(pre, pos, spec, hd), ref, pre)
    # ... and at positions up to 1M with its rotation at exact angles of its inv_freq formula.
    inv = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64) / rotary_dim))
    _check_variant(spec, inv, 1.0, hd, 1_000_000, seed=7 * hd, hf_rotate=_gptj_rotate(rotary_dim))


@pytest.mark.parametrize("hd", (128, 256))
def test_gemma3_per_layer_theta(hd: int):
    cfg = Gemma3TextConfig(
        hidden_size=4 * hd,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=hd,
        num_hidden_layers=6,
        intermediate_size=64,
        vocab_size=32,
        sliding_window=512,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        },
    )
    with pytest.raises(ka.InvalidArgumentError):
        rope.rope_spec_from_hf(cfg)  # per-layer parameters need a layer type
    hf = Gemma3RotaryEmbedding(cfg)
    specs = rope.layer_rope_specs(cfg)
    assert len(specs) == 6
    for layer_type in ("sliding_attention", "full_attention"):
        spec = rope.rope_spec_from_hf(cfg, layer_type)
        inv = getattr(hf, f"{layer_type}_inv_freq")
        scaling = getattr(hf, f"{layer_type}_attention_scaling")
        _check_variant(spec, inv, scaling, hd, 1_000_000, seed=hd + len(layer_type))
        for i, lt in enumerate(cfg.layer_types):
            if lt == layer_type:
                assert specs[i] == spec
        # HF's own fp32 pipeline at small positions.
        pre = torch.randn(1, 1, 17, hd, generator=torch.Generator().manual_seed(1))
        pos = _positions(17, 128, 2)
        cos, sin = hf(pre, torch.from_numpy(pos)[None], layer_type)
        _, ref = apply_rotary_pos_emb(pre, pre, cos, sin)
        _assert_close(rope.apply(pre, pos, spec, hd), ref, pre)
    local, glob = (rope.rope_spec_from_hf(cfg, t) for t in ("sliding_attention", "full_attention"))
    assert local.theta == 10000.0 and glob.theta == 1e6 and glob.scaling == ka.RopeScaling.linear


def test_legacy_rope_scaling_and_unsupported_types():
    class Legacy:
        model_type = "llama"
        hidden_size = 512
        num_attention_heads = 4
        max_position_embeddings = 4096
        rope_theta = 500000.0
        rope_scaling = {"type": "linear", "factor": 2.0}

    spec = rope.rope_spec_from_hf(Legacy())
    assert spec.scaling == ka.RopeScaling.linear and spec.factor == 2.0 and spec.theta == 500000.0
    Legacy.rope_scaling = {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}
    with pytest.raises(ka.UnimplementedError, match="default, linear, llama3, yarn, dynamic"):
        rope.rope_spec_from_hf(Legacy())
    assert rope.SUPPORTED_ROPE_TYPES == ("default", "linear", "llama3", "yarn", "dynamic")


def test_layouts_types_and_errors():
    spec = ka.RopeSpec()
    hd = 64
    x = torch.randn(1, 11, 3, hd)  # [B, T, H, D] engine layout
    pos = np.arange(100, 111)
    ref = rope.apply(x.transpose(1, 2).contiguous(), pos, spec, hd)
    # Zero-copy strided view (heads/tokens transposed) and a layout that needs a copy.
    assert torch.equal(rope.apply(x.transpose(1, 2), pos, spec, hd), ref)
    x2 = torch.randn(2, 11, 3, hd)
    ref2 = rope.apply(x2.transpose(1, 2).contiguous(), pos, spec, hd)
    assert torch.equal(rope.apply(x2.transpose(1, 2), pos, spec, hd), ref2)
    # numpy in, numpy out; the input is not modified.
    xn = x.transpose(1, 2).contiguous().numpy()
    before = xn.copy()
    out = rope.apply(xn, list(pos), spec, hd)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    assert np.array_equal(out, ref.numpy()) and np.array_equal(xn, before)
    assert rope.apply(xn.astype(np.float16), pos, spec, hd).dtype == np.float16
    # Two-dimensional input [T, D].
    assert torch.equal(rope.apply(x[0, :, 0], pos, spec, hd), ref[0, 0])

    with pytest.raises(ka.InvalidArgumentError):
        rope.apply(x.double(), pos, spec, hd)
    with pytest.raises(ka.InvalidArgumentError):
        rope.apply(x, pos, spec, 80)  # head_dim mismatch
    with pytest.raises(ka.InvalidArgumentError):
        rope.apply(x.transpose(1, 2), pos[:5], spec, hd)  # positions length
    with pytest.raises(ka.InvalidArgumentError):
        rope.apply(x.transpose(1, 2), pos.astype(np.float32), spec, hd)  # float positions
    with pytest.raises(ka.InvalidArgumentError):
        rope.apply(x.transpose(1, 2).tolist(), pos, spec, hd)
    with pytest.raises(ka.InvalidArgumentError):
        rope.reposition(x.transpose(1, 2), pos, pos[:3], spec, hd)
    bad = ka.RopeSpec()
    bad.rotary_dim = 63
    with pytest.raises(ka.InvalidArgumentError):
        rope.apply(x.transpose(1, 2), pos, bad, hd)


def test_large_input_threads_and_gil_release():
    import threading

    spec = ka.RopeSpec()
    x = torch.randn(8, 4099, 128, dtype=torch.bfloat16)
    pos = np.arange(4099) + 1_000_000
    ref = rope.apply(x, pos, spec, 128)
    outs = [None] * 3

    def work(i):
        outs[i] = rope.apply(x, pos, spec, 128)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert all(torch.equal(o, ref) for o in outs)
    # Inverse of the forward result recovers x within bf16 rounding.
    back = rope.apply(ref, pos, spec, 128, inverse=True).float()
    assert float((back - x.float()).abs().max()) <= 0.05 * float(x.float().abs().max())
