"""Fixtures of the project's own tests: the demo model, its HF reference, tiny random checkpoints."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ane_eval import demo


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    return demo.model_dir()


@pytest.fixture(scope="session")
def hf_demo():
    """The demo checkpoint in HF transformers, fp32: the reference every numeric test compares against."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(demo.checkpoint_dir(), dtype=torch.float32)
    model.eval()
    return model


def hf_logits(model, ids) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits[0].float().numpy()


def psnr(ref: np.ndarray, got: np.ndarray) -> float:
    rmse = float(np.sqrt(np.mean((ref.astype(np.float64) - got.astype(np.float64)) ** 2)))
    return float("inf") if rmse == 0 else 20 * np.log10(float(np.abs(ref).max()) / rmse)


def write_checkpoint(path: Path, *, model_type="llama", layers=2, hidden=64, heads=4, kv_heads=2, inter=96,
                     vocab=1024, tie=False, seed=0, bias=False, qk_norm=False, scale=0.08) -> Path:
    """A random HF checkpoint written with numpy only; weights are exactly representable in fp16."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    d = hidden // heads

    def w(*shape, scale=scale):  # held as fp16: a 1B-parameter checkpoint is written in half the memory
        return (rng.standard_normal(shape) * scale).astype(np.float16)

    t = {"model.embed_tokens.weight": w(vocab, hidden, scale=0.5), "model.norm.weight": 1 + w(hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t.update({
            p + "self_attn.q_proj.weight": w(heads * d, hidden), p + "self_attn.k_proj.weight": w(kv_heads * d, hidden),
            p + "self_attn.v_proj.weight": w(kv_heads * d, hidden), p + "self_attn.o_proj.weight": w(hidden, heads * d),
            p + "mlp.gate_proj.weight": w(inter, hidden), p + "mlp.up_proj.weight": w(inter, hidden),
            p + "mlp.down_proj.weight": w(hidden, inter), p + "input_layernorm.weight": 1 + w(hidden),
            p + "post_attention_layernorm.weight": 1 + w(hidden),
        })
        if bias:
            for n, size in (("q", heads * d), ("k", kv_heads * d), ("v", kv_heads * d)):
                t[p + f"self_attn.{n}_proj.bias"] = w(size)
        if qk_norm:
            t[p + "self_attn.q_norm.weight"] = 1 + w(d)
            t[p + "self_attn.k_norm.weight"] = 1 + w(d)
    if not tie:
        t["lm_head.weight"] = w(vocab, hidden, scale=0.3)
    path.mkdir(parents=True, exist_ok=True)
    save_file(t, str(path / "model.safetensors"))
    config = {"model_type": model_type, "architectures": [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                                                            "qwen3": "Qwen3ForCausalLM"}[model_type]],
              "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
              "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": d, "vocab_size": vocab,
              "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 256,
              "tie_word_embeddings": tie, "attention_bias": bias, "torch_dtype": "float16"}
    (path / "config.json").write_text(json.dumps(config))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(demo.checkpoint_dir() / f, path / f)
    return path


GEMMA3_LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"]


def write_gemma3_checkpoint(path: Path, *, sliding_window=16, vocab=1024, seed=0, **config) -> Path:
    """A random HF Gemma3ForCausalLM (4 layers: sliding, full, sliding, sliding; tied embeddings), weights exactly
    representable in fp16 — and so are the (1 + w) gains of its norms, which the builder folds into constants."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(**{
        "vocab_size": vocab, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "sliding_window": sliding_window,
        "layer_types": GEMMA3_LAYER_TYPES, "max_position_embeddings": 512, "query_pre_attn_scalar": 16,
        "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
        # distinct local and global RoPE bases, so swapping them would show
        "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10000.0},
                            "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}}, **config})
    model = Gemma3ForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_((1 + 0.1 * torch.randn(p.shape, generator=g)).half().float() - 1)
            else:
                p.copy_((torch.randn(p.shape, generator=g) * (0.5 if "embed" in name else 0.1)).half().float())
    model.save_pretrained(path)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(demo.checkpoint_dir() / f, path / f)
    return path


# --- converter-built models of every ANEMLL 0.3.5 layout, shared by the tests of the session ----------------------
QWEN_VOCAB = 1030  # Qwen's 16-way split of 1030 ids is uneven (65 x 6, 64 x 10): argmax offsets must be cumulative
LAYOUTS_035 = {"reference": {}, "argmax": {"argmax": True}, "monolithic": {"monolithic": True},
               "monolithic_argmax": {"monolithic": True, "argmax": True}}
GEMMA_SW, GEMMA_C, GEMMA_B = 16, 64, 8  # sliding window < context, so the rotate functions run; B divides the window
GEMMA_VARIANTS = {
    "split": {"num_chunks": 2},  # chunk 2 has no full-attention layer: it only touches the global cache
    "unified": {"single_cache": True},
    "split_rotate": {"split_rotate": True, "update_mask_prefill": True},
}


@pytest.fixture(scope="session")
def blas_row_blocks_invariant() -> bool:
    """Whether numpy's BLAS sums a block of a product's rows as it sums them in the whole product, bit for bit
    (what makes fp16-resident weights multiplied a block at a time equal float32-resident ones). OpenBLAS's
    SkylakeX kernels do; its Haswell kernels, which it runs on a Zen 5 EPYC, change ~11 % of the sums."""
    gen = np.random.default_rng(0)
    w, x = gen.standard_normal((3000, 2048)).astype(np.float32), gen.standard_normal((2048, 64)).astype(np.float32)
    return np.array_equal(np.concatenate([w[i:i + 100] @ x for i in range(0, 3000, 100)]), w @ x)


@pytest.fixture(scope="session")
def layouts_035(tmp_path_factory):
    """(checkpoint, {layout: model dir}): a random Qwen2 checkpoint converted as 0.3.4 (reference) and as the 0.3.5
    argmax / monolithic layouts."""
    from ane_eval.convert import BuildOptions, build

    root = tmp_path_factory.mktemp("layouts")
    ckpt = write_checkpoint(root / "ckpt", model_type="qwen2", vocab=QWEN_VOCAB, bias=True, seed=3)
    dirs = {name: build(ckpt, root / name, BuildOptions(context_length=64, batch_size=16, num_chunks=2, **kw))
            for name, kw in LAYOUTS_035.items()}
    return ckpt, dirs


@pytest.fixture(scope="session")
def gemma_ckpt(tmp_path_factory):
    return write_gemma3_checkpoint(tmp_path_factory.mktemp("gemma3") / "ckpt", sliding_window=GEMMA_SW)


@pytest.fixture(scope="session")
def gemma_builds(gemma_ckpt, tmp_path_factory):
    from ane_eval.convert import BuildOptions, build

    root = tmp_path_factory.mktemp("gemma3_builds")
    return {name: build(gemma_ckpt, root / name, BuildOptions(context_length=GEMMA_C, batch_size=GEMMA_B,
                                                              allow_small_context=True, **opts))
            for name, opts in GEMMA_VARIANTS.items()}
