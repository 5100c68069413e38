"""The rows of the coverage matrix (test_zoo.py): one tiny config per architecture and
checkpoint layout, 2 layers, hidden 32, the bundled tokenizer's vocabulary. Adding a row
adds it to the tests and to the supported-architectures table (zoo_models --markdown)."""

from __future__ import annotations

import sys
from pathlib import Path

import transformers

sys.path.insert(0, str(Path(__file__).parent))
from zoo_models import _ENC, _MOE, VOCAB, Arch, _drop, _lm, fused_experts, gamma_beta, strip_prefix

T = transformers
ARCHS: list[Arch] = [
    # -- encoders (embeddings) ---------------------------------------------------------
    Arch("bert", "embedding", lambda: T.BertConfig(**_ENC)),
    Arch("bert", "embedding", lambda: T.BertConfig(**_ENC), "LayerNorm gamma/beta", gamma_beta),
    Arch(
        "roberta",
        "embedding",
        lambda: T.RobertaConfig(**_ENC | {"max_position_embeddings": 130, "pad_token_id": 1}),
    ),
    Arch(
        "xlm-roberta",
        "embedding",
        lambda: T.XLMRobertaConfig(**_ENC | {"max_position_embeddings": 130, "pad_token_id": 1}),
    ),
    Arch(
        "distilbert",
        "embedding",
        lambda: T.DistilBertConfig(
            vocab_size=VOCAB,
            dim=32,
            n_layers=2,
            n_heads=4,
            hidden_dim=64,
            max_position_embeddings=128,
        ),
    ),
    Arch(
        "mpnet",
        "embedding",
        lambda: T.MPNetConfig(**_ENC | {"max_position_embeddings": 130, "pad_token_id": 1}),
    ),
    Arch(
        "deberta-v2",
        "embedding",
        lambda: T.DebertaV2Config(
            **_ENC, relative_attention=True, position_buckets=16, pos_att_type=["p2c", "c2p"]
        ),
    ),
    Arch("electra", "embedding", lambda: T.ElectraConfig(**_ENC, embedding_size=16)),
    Arch("albert", "embedding", lambda: T.AlbertConfig(**_ENC, embedding_size=16)),
    Arch(
        "modernbert",
        "embedding",
        lambda: T.ModernBertConfig(
            **_ENC,
            pad_token_id=0,
            bos_token_id=101,
            eos_token_id=102,
            cls_token_id=101,
            sep_token_id=102,
            local_attention=16,
        ),
    ),
    Arch(
        "nomic_bert", "embedding", lambda: T.NomicBertConfig(**_ENC), "Wqkv fused (save_pretrained)"
    ),
    Arch("qwen2", "embedding", lambda: T.Qwen2Config(**_lm()), pooling="last"),
    Arch("qwen3", "embedding", lambda: T.Qwen3Config(**_lm(head_dim=8)), pooling="last"),
    Arch("mistral", "embedding", lambda: T.MistralConfig(**_lm()), pooling="last"),
    Arch(
        "gemma3_text", "embedding", lambda: T.Gemma3TextConfig(**_lm(head_dim=8, sliding_window=16))
    ),
    # -- decoders (log-probs) ------------------------------------------------------------
    Arch(
        "gpt2",
        "causal-lm",
        lambda: T.GPT2Config(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=128,
            bos_token_id=101,
            eos_token_id=102,
        ),
    ),
    Arch(
        "gpt2",
        "causal-lm",
        lambda: T.GPT2Config(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=128,
            bos_token_id=101,
            eos_token_id=102,
        ),
        "no transformer. prefix",
        strip_prefix("transformer."),
    ),
    Arch(
        "gpt_neo",
        "causal-lm",
        lambda: T.GPTNeoConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_layers=2,
            num_heads=4,
            attention_types=[[["global", "local"], 1]],
            window_size=16,
            max_position_embeddings=128,
            intermediate_size=64,
        ),
    ),
    Arch(
        "gpt_neox",
        "causal-lm",
        lambda: T.GPTNeoXConfig(
            **_drop(_lm(rotary_pct=0.25, tie_word_embeddings=False), "num_key_value_heads")
        ),
        "embed_out (save_pretrained)",
    ),
    Arch(
        "gptj",
        "causal-lm",
        lambda: T.GPTJConfig(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=2,
            n_head=4,
            rotary_dim=4,
            n_positions=128,
            bos_token_id=101,
            eos_token_id=102,
        ),
    ),
    Arch(
        "opt",
        "causal-lm",
        lambda: T.OPTConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            ffn_dim=64,
            num_attention_heads=4,
            max_position_embeddings=128,
            word_embed_proj_dim=32,
            pad_token_id=1,
            bos_token_id=101,
            eos_token_id=102,
        ),
    ),
    Arch(
        "bloom",
        "causal-lm",
        lambda: T.BloomConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            n_layer=2,
            n_head=4,
            bos_token_id=101,
            eos_token_id=102,
        ),
    ),
    Arch(
        "falcon",
        "causal-lm",
        lambda: T.FalconConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=128,
            bos_token_id=101,
            eos_token_id=102,
        ),
    ),
    Arch("llama", "causal-lm", lambda: T.LlamaConfig(**_lm(tie_word_embeddings=False))),
    Arch("mistral", "causal-lm", lambda: T.MistralConfig(**_lm())),
    Arch("qwen2", "causal-lm", lambda: T.Qwen2Config(**_lm())),
    Arch("qwen3", "causal-lm", lambda: T.Qwen3Config(**_lm(head_dim=8))),
    Arch("gemma", "causal-lm", lambda: T.GemmaConfig(**_lm(head_dim=8))),
    Arch("gemma2", "causal-lm", lambda: T.Gemma2Config(**_lm(head_dim=8, sliding_window=16))),
    Arch(
        "gemma3_text", "causal-lm", lambda: T.Gemma3TextConfig(**_lm(head_dim=8, sliding_window=16))
    ),
    Arch("phi", "causal-lm", lambda: T.PhiConfig(**_lm())),
    Arch("phi3", "causal-lm", lambda: T.Phi3Config(**_lm(sliding_window=None))),
    Arch("stablelm", "causal-lm", lambda: T.StableLmConfig(**_lm())),
    Arch("starcoder2", "causal-lm", lambda: T.Starcoder2Config(**_lm())),
    Arch("olmo2", "causal-lm", lambda: T.Olmo2Config(**_lm())),
    Arch("cohere", "causal-lm", lambda: T.CohereConfig(**_lm())),
    Arch("granite", "causal-lm", lambda: T.GraniteConfig(**_lm())),
    # -- mixture of experts: save_pretrained writes per-expert keys; also the fused layout
    Arch(
        "mixtral",
        "causal-lm",
        lambda: T.MixtralConfig(**_lm(num_local_experts=4, num_experts_per_tok=2)),
        "per-expert w1/w2/w3 (save_pretrained)",
    ),
    Arch(
        "mixtral",
        "causal-lm",
        lambda: T.MixtralConfig(**_lm(num_local_experts=4, num_experts_per_tok=2)),
        "fused experts",
        fused_experts,
    ),
    Arch(
        "qwen2_moe",
        "causal-lm",
        lambda: T.Qwen2MoeConfig(**_MOE, shared_expert_intermediate_size=32),
        "per-expert (save_pretrained)",
    ),
    Arch(
        "qwen3_moe",
        "causal-lm",
        lambda: T.Qwen3MoeConfig(**_MOE, head_dim=8),
        "per-expert (save_pretrained)",
    ),
    Arch(
        "olmoe",
        "causal-lm",
        lambda: T.OlmoeConfig(**_drop(_MOE, "moe_intermediate_size")),
        "per-expert (save_pretrained)",
    ),
    Arch(
        "deepseek_v3",
        "causal-lm",
        lambda: T.DeepseekV3Config(
            **_drop(_MOE, "num_experts", "num_key_value_heads"),
            n_routed_experts=4,
            n_shared_experts=1,
            first_k_dense_replace=1,
            q_lora_rank=16,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            n_group=1,
            topk_group=1,
        ),
        "per-expert (save_pretrained)",
    ),
    Arch(
        "gpt_oss",
        "causal-lm",
        lambda: T.GptOssConfig(
            **_lm(num_local_experts=4, num_experts_per_tok=2, head_dim=8, sliding_window=16)
        ),
        dtype="bfloat16",
        notes="bf16; the MXFP4 hub release declares quantization_config: refused",
    ),
]
