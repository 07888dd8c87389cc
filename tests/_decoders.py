"""Tiny decoder LLMs of every supported family, random but non-degenerate weights, built from configs (no hub), and
what their oracles need: batches with left or right padding, positions as generation numbers them, and the stock
model made purely float64 for comparisons at 1e-10 (its RMSNorm, rotary angles and eager softmax round to float32
even in a float64 model)."""

from __future__ import annotations

import contextlib
import zlib

import _models as M
import torch

VOCAB = 61


def _config(kind: str, **kw):
    import transformers

    common = dict(vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  tie_word_embeddings=False)
    if kind == "llama":  # GQA 4:2, Llama-3 rotary scaling, biases
        cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                       num_attention_heads=4, num_key_value_heads=2, attention_bias=True,
                                       rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                         high_freq_factor=4.0, original_max_position_embeddings=16),
                                       **common)
    elif kind == "mistral":  # MQA, a sliding window of 3
        cfg = transformers.MistralConfig(hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=1, sliding_window=3, **common)
    elif kind == "qwen2":  # q/k/v biases, the top layer sliding
        cfg = transformers.Qwen2Config(hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
                                       sliding_window=4, max_window_layers=1, **common)
    elif kind == "qwen3":  # q/k-norm, a head width that is not hidden/heads
        cfg = transformers.Qwen3Config(hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=12, **common)
    elif kind == "gemma3":  # (1 + w) norms, sandwich norms, q/k-norm, embedding scale, local and global layers
        cfg = transformers.Gemma3TextConfig(hidden_size=32, intermediate_size=40, num_hidden_layers=3,
                                            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                            query_pre_attn_scalar=20, sliding_window=4,
                                            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                            final_logit_softcapping=30.0, **common)
    elif kind == "phi3":  # fused qkv and gate/up, partial rotary
        cfg = transformers.Phi3Config(hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, partial_rotary_factor=0.5,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, **common)
    elif kind == "gpt2":  # Conv1D, learned positions, LayerNorm, inverse-layer-index scaling
        cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=VOCAB,
                                      scale_attn_by_inverse_layer_idx=True, pad_token_id=0, bos_token_id=1,
                                      eos_token_id=2)
    else:
        raise ValueError(kind)
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3", "gpt2")


def causal_lm(kind: str, dtype=torch.float64, seed=0, attn="sdpa", **kw):
    import transformers

    cfg = _config(kind, **kw)
    cfg._attn_implementation = attn
    cls = {"gemma3": transformers.Gemma3ForCausalLM, "gpt2": transformers.GPT2LMHeadModel}.get(
        kind, transformers.AutoModelForCausalLM)
    model = cls(cfg) if cls is not transformers.AutoModelForCausalLM else cls.from_config(cfg)
    return _randomize(model, seed).to(dtype)


def classifier(kind: str, dtype=torch.float64, seed=0, num_labels=3, attn="sdpa"):
    import transformers

    cfg = _config(kind, num_labels=num_labels)
    cfg._attn_implementation = attn
    cls = {"gemma3": transformers.Gemma3TextForSequenceClassification}.get(
        kind, transformers.AutoModelForSequenceClassification)
    model = cls(cfg) if cls is not transformers.AutoModelForSequenceClassification else cls.from_config(cfg)
    return _randomize(model, seed).to(dtype)


def _randomize(model, seed):
    M.randomize(model, seed, std=0.3)
    with torch.no_grad():  # Gemma's norms multiply by (1 + w): weights around 0 there
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight") and type(model).__name__.startswith("Gemma"):
                p.sub_(1.0)
    return model.eval()


def batch(lengths=(9, 6, 11), padding="left", seed=0) -> dict:
    """Token ids (no pad id 0 among the real tokens) with left or right padding."""
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    ids = torch.zeros(len(lengths), n, dtype=torch.long)
    mask = torch.zeros(len(lengths), n, dtype=torch.long)
    for i, m in enumerate(lengths):
        span = slice(n - m, n) if padding == "left" else slice(0, m)
        ids[i, span] = torch.randint(1, VOCAB, (m,), generator=g)
        mask[i, span] = 1
    return {"input_ids": ids, "attention_mask": mask}


def sample(inputs: dict, i: int) -> dict:
    """Sample ``i`` alone, its padding removed."""
    keep = inputs["attention_mask"][i].bool()
    return {"input_ids": inputs["input_ids"][i][keep][None], "attention_mask": torch.ones(1, int(keep.sum()),
                                                                                             dtype=torch.long)}


def positions(inputs: dict) -> torch.Tensor:
    real = inputs["attention_mask"].long()
    return (real.cumsum(1) - 1).clamp(min=0) * real


@contextlib.contextmanager
def pure_float64(model):
    """The stock model with its float32 steps removed (its RMSNorms, rotary angles and eager softmax computed in the
    model's dtype): patches on this test-owned model instance and the family's eager attention function, undone on
    exit."""
    import importlib

    patched = []

    def rms_forward(module):
        gemma = type(module).__name__.startswith("Gemma")

        def forward(x):
            h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + module.eps if gemma else
                                x.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)
            return h * (1.0 + module.weight) if gemma else module.weight * h
        return forward

    for m in model.modules():
        if type(m).__name__.endswith("RMSNorm"):
            patched.append((m, "forward", m.__dict__.get("forward")))
            m.forward = rms_forward(m)
        if type(m).__name__.endswith("RotaryEmbedding"):
            patched.append((m, "forward", m.__dict__.get("forward")))
            m.forward = _rotary_forward(m)
    module = importlib.import_module(type(model).__module__)
    eager = getattr(module, "eager_attention_forward", None)
    if eager is not None:
        module.eager_attention_forward = _float64_softmax(eager)
    try:
        yield model
    finally:
        for m, name, old in patched:
            if old is None:
                del m.__dict__[name]
            else:
                m.__dict__[name] = old
        if eager is not None:
            module.eager_attention_forward = eager


def _rotary_forward(module):
    def forward(x, position_ids, layer_type=None):
        prefix = "" if layer_type is None else f"{layer_type}_"
        inv = getattr(module, f"{prefix}original_inv_freq", None)
        inv = getattr(module, f"{prefix}inv_freq") if inv is None else inv
        scaling = getattr(module, f"{prefix}attention_scaling", 1.0)
        freqs = position_ids[..., None].to(torch.float64) * inv.to(x.device, torch.float64)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * scaling).to(x.dtype), (emb.sin() * scaling).to(x.dtype)
    return forward


def _float64_softmax(eager):
    def forward(*args, **kwargs):
        real_softmax = torch.nn.functional.softmax

        def softmax(x, dim=-1, dtype=None, **kw):
            return real_softmax(x, dim=dim)
        torch.nn.functional.softmax = softmax
        try:
            return eager(*args, **kwargs)
        finally:
            torch.nn.functional.softmax = real_softmax
    return forward


class WordTokenizer:
    """Whitespace words hashed onto ids 3…VOCAB-1, with BOS (1) in front as Llama's tokenizers do (``add_bos``), or
    else an end-of-text token (2) in the vocabulary as GPT-2's; pad 0. Enough of a tokenizer for the evaluation."""

    pad_token_id, eos_token_id, bos_token_id = 0, 2, 1
    all_special_ids = [0, 1, 2]

    def __init__(self, add_bos: bool = True):
        self.add_bos = add_bos

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        ids = [3 + zlib.crc32(w.encode()) % (VOCAB - 3) for w in text.split()]
        return {"input_ids": ([1] if add_special_tokens and self.add_bos else []) + ids}

    def get_vocab(self) -> dict:
        return {"<pad>": 0, "<s>": 1} | ({} if self.add_bos else {"<|endoftext|>": 2})
