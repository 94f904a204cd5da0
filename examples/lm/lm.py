"""A small Llama-style causal LM built from a config (no download): the model a recipe compiles.
Replace ``model`` with your own factory, or point ``[model] source`` at a save_pretrained directory."""

import torch
import transformers


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return transformers.LlamaForCausalLM(config).eval()


def prompts():
    """Calibration prompts: token ids [1, 16] (your tokenizer's output for real text)."""
    generator = torch.Generator().manual_seed(1)
    for _ in range(8):
        yield {"input_ids": torch.randint(3, 512, (1, 16), generator=generator)}
