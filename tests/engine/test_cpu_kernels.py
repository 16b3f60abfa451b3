"""The C++ CPU kernels against their plain-torch references (``ops`` and the torch attention backend).

Every kernel test runs once per kernel variant this CPU can execute (``avx512``, ``avx2``, ``scalar``):
each variant is built (forced, for the lower ones) and loaded side by side, so the fallbacks are
proven on any machine that runs them.

The elementwise kernels round where torch rounds, so RoPE + KV store and the residual sum must be
bit-identical; RMSNorm and SiLU may differ in the last bit (summation order, exp). Decode attention
is checked against the torch backend over shuffled block tables, ragged lengths, GQA and
uninitialised (NaN) cache slots.
"""

from __future__ import annotations

import random
import subprocess

import pytest
import torch
from kubeinfer.engine import cpu_features
from kubeinfer.engine.attention_metadata import AttentionMetadata
from kubeinfer.engine.csrc import build
from kubeinfer.engine.layers import attention, cpu_attention, cpu_kernels, ops
from kubeinfer.engine.layers.rotary import RotaryEmbedding

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="the CPU kernels did not build (no C++ compiler?)")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (activations, KV cache): the model's own dtype, and the caches --kv-cache-dtype gives another dtype
CACHE_DTYPES = [*((d, d) for d in DTYPES), (torch.float32, torch.bfloat16), (torch.float32, torch.float16),
                (torch.bfloat16, torch.float32)]
CACHE_IDS = [f"{str(a).removeprefix('torch.')}-cache-{str(c).removeprefix('torch.')}" for a, c in CACHE_DTYPES]


@pytest.fixture(params=cpu_features.supported_kernel_variants(cpu_features.detected_flags()))
def variant(request, monkeypatch) -> str:
    """The kernels of one variant, in place of the default library for the test."""
    lib = build.load(variant=request.param)
    assert lib is not None, f"the {request.param} variant did not build"
    cpu_kernels.configure(lib)
    monkeypatch.setattr(cpu_kernels, "_lib", lambda: lib)
    assert cpu_kernels.variant() == request.param
    return request.param


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("rows", [37, 200])  # 200: a prefill chunk, rows split across the threads
def test_rms_norm_matches_reference(dtype: torch.dtype, with_residual: bool, rows: int, variant: str) -> None:
    torch.manual_seed(0)
    wide = torch.randn(rows, 2 * 576, dtype=dtype)
    x = wide[:, 100:676]  # a strided view, like a slice of a fused output
    weight = (1 + 0.1 * torch.randn(576)).to(dtype)
    residual = torch.randn(rows, 576, dtype=dtype) if with_residual else None
    got = cpu_kernels.rms_norm(x, weight, 1e-5, residual)
    expected = ops.rms_norm_reference(x, weight, 1e-5, residual)
    if with_residual:
        torch.testing.assert_close(got[1], expected[1], atol=0, rtol=0)
        got, expected = got[0], expected[0]
    # float16: the sum of squares in another order can move a rounding by one ulp (2^-11 relative)
    tolerance = {"atol": 1e-3, "rtol": 2e-3} if dtype == torch.float16 else {}
    torch.testing.assert_close(got, expected, **tolerance)


def test_rms_norm_of_heads_keeps_shape(variant: str) -> None:
    """Qwen3's q/k norm: ``[T, heads, head_dim]`` normalised per head."""
    x, weight = torch.randn(5, 4, 32), torch.randn(32)
    got = cpu_kernels.rms_norm(x, weight, 1e-6)
    assert got.shape == x.shape
    torch.testing.assert_close(got, ops.rms_norm_reference(x, weight, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [19, 130])
def test_silu_and_mul_matches_reference(dtype: torch.dtype, rows: int, variant: str) -> None:
    torch.manual_seed(1)
    x = (4 * torch.randn(rows, 2 * 1536)).to(dtype)
    torch.testing.assert_close(cpu_kernels.silu_and_mul(x), ops.silu_and_mul_reference(x))


@pytest.mark.parametrize(("dtype", "cache_dtype"), CACHE_DTYPES, ids=CACHE_IDS)
@pytest.mark.parametrize("tokens", [11, 90])
def test_rotary_and_store_is_bit_identical(dtype: torch.dtype, cache_dtype: torch.dtype, tokens: int,
                                           variant: str) -> None:
    """k is rotated in the activations' dtype, then stored in the cache's, as ``rope(k).to(cache dtype)``."""
    torch.manual_seed(2)
    heads, kv_heads, dim, block = 9, 3, 64, 16
    rope = RotaryEmbedding(dim, 4096, 1e5, None)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, dtype=dtype)
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    positions = torch.randint(0, 4096, (tokens,))
    slots = torch.randperm(6 * block)[:tokens]
    slots[[3, 7]] = -1  # not stored
    k_cache = torch.zeros(6, block, kv_heads, dim, dtype=cache_dtype)
    v_cache = torch.zeros(6, block, kv_heads, dim, dtype=cache_dtype)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()

    got_q = cpu_kernels.rotary_and_store(positions, q, k, v, rope.cos_sin_cache, k_cache, v_cache, slots, heads,
                                         kv_heads, dim)
    want_q, want_k = rope(positions, q, k)
    attention.store_kv_cache(want_k.reshape(tokens, kv_heads, dim), v.reshape(tokens, kv_heads, dim), ref_k, ref_v,
                             slots)
    assert torch.equal(got_q, want_q.reshape(tokens, heads, dim))
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)


def _decode_metadata(seq_lens: list[int], block: int, num_blocks: int, rng: random.Random) -> AttentionMetadata:
    free = list(range(num_blocks))
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(-(-n // block))] for n in seq_lens]
    width = max(map(len, tables))
    slots = [t[(n - 1) // block] * block + (n - 1) % block for t, n in zip(tables, seq_lens, strict=True)]
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots), query_start_loc=torch.arange(len(seq_lens) + 1, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        max_query_len=1, max_seq_len=max(seq_lens), block_size=block, query_lens_cpu=[1] * len(seq_lens),
        seq_lens_cpu=seq_lens)


def test_decode_attention_threads_cover_its_work_items(monkeypatch: pytest.MonkeyPatch) -> None:
    """One thread per sequence; a batch smaller than the threads splits by KV head (batch 1 used to run on one
    thread); never more threads than work items."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    assert cpu_kernels.attention_threads(1, 3) == 3
    assert cpu_kernels.attention_threads(1, 8) == 4
    assert cpu_kernels.attention_threads(2, 1) == 2
    assert cpu_kernels.attention_threads(32, 3) == 4


@pytest.mark.parametrize(("dtype", "cache_dtype"), CACHE_DTYPES, ids=CACHE_IDS)
@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(9, 3, 64), (4, 4, 32), (8, 1, 128)])
@pytest.mark.parametrize("seq_lens", [[1, 5, 16, 17, 40, 130, 3, 64], [130], [700], [1, 512, 513, 1100, 17, 256]],
                         ids=["batch8", "batch1", "batch1-long", "split-contexts"])
def test_decode_attention_matches_torch_backend(dtype: torch.dtype, cache_dtype: torch.dtype, heads: int,
                                                kv_heads: int, dim: int, seq_lens: list[int], variant: str) -> None:
    """batch1: fewer sequences than threads, so the work items are (sequence, KV head) pairs. Contexts longer
    than a chunk (512 positions) are attended chunk by chunk and combined (one long context on all threads)."""
    rng, block = random.Random(3), 16
    num_blocks = max(64, sum((n + block - 1) // block for n in seq_lens) + 8)
    torch.manual_seed(3)
    md = _decode_metadata(seq_lens, block, num_blocks, rng)
    # Unwritten slots hold NaN: nothing past a sequence's end may leak into its output.
    k_cache = torch.full((num_blocks, block, kv_heads, dim), float("nan"), dtype=cache_dtype)
    v_cache = torch.full((num_blocks, block, kv_heads, dim), float("nan"), dtype=cache_dtype)
    for table, n in zip(md.block_tables.tolist(), seq_lens, strict=True):
        for p in range(n):
            k_cache[table[p // block], p % block] = torch.randn(kv_heads, dim, dtype=cache_dtype)
            v_cache[table[p // block], p % block] = torch.randn(kv_heads, dim, dtype=cache_dtype)
    query = torch.randn(len(seq_lens), heads, dim, dtype=dtype)

    got = cpu_attention.paged_attention(query, k_cache, v_cache, md, dim**-0.5)
    expected = attention.paged_attention(query.float(), k_cache.float(), v_cache.float(), md, dim**-0.5)
    assert got.dtype == dtype and not got.isnan().any()
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(got.float(), expected, atol=tolerance, rtol=tolerance)


def test_mixed_prefill_and_decode_batch_matches_torch_backend(variant: str) -> None:
    """Decodes and short prefill chunks go through the kernel (one causal row per token), a long chunk
    through SDPA, each into its own rows."""
    torch.manual_seed(4)
    block, kv_heads, heads, dim = 8, 2, 4, 32
    long = cpu_attention.KERNEL_PREFILL_MAX_TOKENS + 6
    # the 9-token chunk continues a 16-token prefix, the long one a 10-token prefix
    q_lens, seq_lens = [1, 6, 1, 9, 1, long], [20, 6, 3, 25, 9, long + 10]
    num_blocks = sum(-(-n // block) for n in seq_lens) + 4
    free = list(range(num_blocks))
    random.Random(4).shuffle(free)
    tables = [[free.pop() for _ in range(-(-n // block))] for n in seq_lens]
    width = max(map(len, tables))
    md = AttentionMetadata(
        slot_mapping=torch.zeros(sum(q_lens), dtype=torch.int64),
        query_start_loc=torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        max_query_len=max(q_lens), max_seq_len=max(seq_lens), block_size=block, query_lens_cpu=q_lens,
        seq_lens_cpu=seq_lens)
    k_cache, v_cache = torch.randn(num_blocks, block, kv_heads, dim), torch.randn(num_blocks, block, kv_heads, dim)
    query = torch.randn(sum(q_lens), heads, dim)
    got = cpu_attention.paged_attention(query, k_cache, v_cache, md, 0.2)
    torch.testing.assert_close(got, attention.paged_attention(query, k_cache, v_cache, md, 0.2))


def test_refilled_metadata_is_replanned(variant: str) -> None:
    rng = random.Random(5)
    md = _decode_metadata([4, 9], 4, 16, rng)
    k_cache, v_cache = torch.randn(16, 4, 1, 8), torch.randn(16, 4, 1, 8)
    query = torch.randn(2, 2, 8)
    cpu_attention.paged_attention(query, k_cache, v_cache, md, 0.3)
    md.seq_lens_cpu, md.seq_lens = [3, 9], torch.tensor([3, 9], dtype=torch.int32)
    torch.testing.assert_close(cpu_attention.paged_attention(query, k_cache, v_cache, md, 0.3),
                               attention.paged_attention(query, k_cache, v_cache, md, 0.3))


def test_torch_override_disables_fused_ops(monkeypatch) -> None:
    monkeypatch.setenv(ops.KERNELS_ENV, "torch")
    ops._fused_module.cache_clear()
    try:
        assert ops._fused(torch.zeros(1)) is None
    finally:
        monkeypatch.delenv(ops.KERNELS_ENV)
        ops._fused_module.cache_clear()
    assert ops._fused(torch.zeros(1)) is cpu_kernels


def test_build_is_cached_and_a_broken_compiler_falls_back(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("KUBEINFER_CACHE", str(tmp_path))
    monkeypatch.delenv("CXX", raising=False)
    compiler = build._compiler()
    first = build.build(compiler)
    assert first.parent == tmp_path / "cpu-kernels" and build.build(compiler) == first
    with pytest.raises(subprocess.CalledProcessError):
        build.build("false")  # a "compiler" that always fails
    assert list(tmp_path.rglob("*.so")) == [first], "a failed build must leave nothing behind"
    monkeypatch.setenv("CXX", "false")
    assert build.load.__wrapped__() is None


def test_every_variant_gives_the_same_bits_for_silu_rope_and_the_residual_sum(monkeypatch) -> None:
    """The vector layer does the scalar code's operations in its order: only reductions may differ."""
    variants = cpu_features.supported_kernel_variants(cpu_features.detected_flags())
    torch.manual_seed(6)
    rope = RotaryEmbedding(64, 512, 1e4, None)
    results = {}
    for name in variants:
        lib = cpu_kernels.configure(build.load(variant=name))
        monkeypatch.setattr(cpu_kernels, "_lib", lambda lib=lib: lib)
        torch.manual_seed(6)
        out = []
        for dtype in DTYPES:
            x = (4 * torch.randn(5, 2 * 100)).to(dtype)  # 100: vector body and scalar tail
            out.append(cpu_kernels.silu_and_mul(x))
            out.append(cpu_kernels.rms_norm(x[:, :100], x[0, 100:], 1e-5, x[:, 100:])[1])
            q, k = torch.randn(3, 2 * 64, dtype=dtype), torch.randn(3, 64, dtype=dtype)
            k_cache = torch.zeros(1, 4, 1, 64, dtype=dtype)
            out.append(cpu_kernels.rotary_and_store(torch.tensor([0, 7, 300]), q, k, k, rope.cos_sin_cache, k_cache,
                                                    k_cache.clone(), torch.tensor([0, 1, 2]), 2, 1, 64))
            out.append(k_cache)
        results[name] = out
    for name, out in results.items():
        assert all(torch.equal(a, b) for a, b in zip(out, results["scalar"], strict=True)), name


def test_each_variant_has_its_own_cached_library(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("KUBEINFER_CACHE", str(tmp_path))
    compiler = build._compiler()
    paths = {v: build.build(compiler, variant=v) for v in cpu_features.supported_kernel_variants(
        cpu_features.detected_flags())}
    assert len(set(paths.values())) == len(paths)
    assert all(f"_{v}_" in p.name for v, p in paths.items())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 9])
def test_small_batch_linear_matches_f_linear(dtype: torch.dtype, rows: int, variant: str) -> None:
    torch.manual_seed(7)
    weight, bias = torch.randn(4 * 37 + 3, 200, dtype=dtype), torch.randn(151, dtype=dtype)  # ragged row block, K tail
    x = torch.randn(2, rows, 200, dtype=dtype)[1]  # a row view
    got = cpu_kernels.linear(x, weight, bias)
    expected = torch.nn.functional.linear(x.double(), weight.double(), bias.double())
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]  # one rounding of ~14
    torch.testing.assert_close(got.double(), expected, atol=tolerance * 14, rtol=tolerance)
    assert got.dtype == dtype and got.shape == (rows, 151)
    torch.testing.assert_close(cpu_kernels.linear(x.unsqueeze(0), weight), cpu_kernels.linear(x, weight).unsqueeze(0))


def test_linear_work_pool_is_exact_and_safe_across_threads() -> None:
    """Any number of pool threads gives the one-thread bits; callers on several threads do not mix jobs."""
    import threading

    torch.manual_seed(9)
    weight = torch.randn(4096, 64)
    inputs = [torch.randn(r, 64) for r in (1, 2, 5)]
    expected = [cpu_kernels.linear(x, weight, num_threads=1) for x in inputs]
    failures = []

    def hammer() -> None:
        for _ in range(50):
            for x, want in zip(inputs, expected, strict=True):
                if not torch.equal(cpu_kernels.linear(x, weight, num_threads=3), want):
                    failures.append(x.shape)

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


@pytest.mark.parametrize("vocab", [1, 257, 1000, 49152])
def test_argmax_rows_is_torchs_argmax(vocab: int, variant: str) -> None:
    """Greedy sampling's argmax: the first maximal index (ties), the first NaN of a row that has one, index 0
    of an all -inf row, on rows that are views of a wider buffer."""
    torch.manual_seed(5)
    wide = torch.randn(9, vocab + 7)
    logits = wide[:, 3:3 + vocab]  # stride(0) > vocab
    if vocab > 1:
        logits[1, -1] = logits[1, vocab // 2] = logits[1].max() + 1  # a tie: the first one wins
        logits[2, vocab // 3] = float("nan")
        logits[2, -1] = float("nan")
        logits[3, :-1] = float("-inf")  # one finite value, last
        logits[5] = logits[5].round()  # many ties
        logits[6, 0] = float("inf")
        logits[7, :] = 0.0
    logits[4, :] = float("-inf")
    got = cpu_kernels.argmax_rows(logits)
    assert got.dtype == torch.int64 and torch.equal(got, logits.argmax(dim=-1)), (got, logits.argmax(dim=-1))


def test_greedy_sampling_uses_the_kernel_and_agrees() -> None:
    from kubeinfer.engine.sample.filters import greedy_ids

    logits = torch.randn(32, 49152)
    assert torch.equal(greedy_ids(logits), logits.argmax(dim=-1))
    assert torch.equal(greedy_ids(logits.to(torch.bfloat16)), logits.to(torch.bfloat16).argmax(dim=-1))  # (torch)
