"""Architectures nobody here wrote, at toy size: Hugging Face models built from random-init configs
(no hub access) and a few hand-written torch.nn models, for the model coverage test.

Each entry builds ``(model, example_inputs, dynamic_axes)``. Text models take ``input_ids`` (and an
``attention_mask``), vision models ``pixel_values``, audio models ``input_values`` or
``input_features``. Decoders are given ``use_cache=False`` as an example input: a constant baked
into the graph (decoders with their cache are captured by the generation work, not here).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

VOCAB, HIDDEN, HEADS, LAYERS, FFN, POSITIONS = 100, 32, 4, 2, 64, 64
TEXT = {0: "batch", 1: "sequence"}


@dataclasses.dataclass(frozen=True)
class Arch:
    name: str
    family: str  # encoder | decoder | encoder-decoder | vision | audio | torch.nn
    build: Callable[[], tuple[nn.Module, dict[str, Any], dict[str, dict[int, str]]]]


def _text(model: nn.Module, *, mask: bool = True, seq: int = 8, **constants: Any):
    ids = torch.randint(3, VOCAB, (1, seq))
    inputs: dict[str, Any] = {"input_ids": ids}
    axes = {"input_ids": TEXT}
    if mask:
        inputs["attention_mask"] = torch.ones_like(ids)
        axes["attention_mask"] = TEXT
    return model.eval(), inputs | constants, axes


def _hf(cls_name: str, config_name: str, **config: Any) -> nn.Module:
    import transformers

    torch.manual_seed(0)
    cfg = getattr(transformers, config_name)(**config)
    return getattr(transformers, cls_name)(cfg)


_SPECIAL_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
_BERTISH = dict(
    vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
    intermediate_size=FFN, max_position_embeddings=POSITIONS,
)  # fmt: skip
_LLAMAISH = dict(
    vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
    num_key_value_heads=2, intermediate_size=FFN, max_position_embeddings=POSITIONS,
)  # fmt: skip


def _encoder(cls: str, cfg: str, **extra: Any):
    return lambda: _text(_hf(cls, cfg, **(_BERTISH | extra)))


def _decoder(cls: str, cfg: str, config: dict[str, Any], mask: bool = True):
    return lambda: _text(_hf(cls, cfg, **config), mask=mask, use_cache=False)


def _gpt2(cls: str):
    config = dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=POSITIONS)
    return _decoder(cls, "GPT2Config", config | _SPECIAL_IDS)


def _bart():
    model = _hf(
        "BartModel", "BartConfig", vocab_size=VOCAB, d_model=HIDDEN, encoder_layers=LAYERS, decoder_layers=LAYERS,
        encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=FFN, decoder_ffn_dim=FFN,
        max_position_embeddings=POSITIONS,
    )  # fmt: skip
    model, inputs, axes = _text(model, use_cache=False)
    inputs["decoder_input_ids"] = torch.randint(3, VOCAB, (1, 5))
    axes["decoder_input_ids"] = {0: "batch", 1: "target"}
    return model, inputs, axes


_T5 = dict(vocab_size=VOCAB, d_model=HIDDEN, d_kv=8, d_ff=FFN, num_layers=LAYERS, num_heads=HEADS)


def _t5():
    model, inputs, axes = _text(_hf("T5Model", "T5Config", **_T5), use_cache=False)
    inputs["decoder_input_ids"] = torch.randint(3, VOCAB, (1, 5))
    axes["decoder_input_ids"] = {0: "batch", 1: "target"}
    return model, inputs, axes


def _vision(cls: str, cfg: str, size: int = 32, **config: Any):
    def build():
        model = _hf(cls, cfg, **config)
        pixels = torch.randn(1, 3, size, size)
        return model.eval(), {"pixel_values": pixels}, {"pixel_values": {0: "batch"}}

    return build


_VIT = dict(
    hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=FFN,
    image_size=32, patch_size=8,
)  # fmt: skip


def _wav2vec2(cls: str, cfg: str):
    def build():
        model = _hf(
            cls, cfg, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=FFN,
            conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=4, do_stable_layer_norm=False,
        )  # fmt: skip
        audio = torch.randn(1, 800)
        return model.eval(), {"input_values": audio}, {"input_values": {0: "batch", 1: "samples"}}

    return build


def _whisper_encoder():
    model = _hf(
        "WhisperModel", "WhisperConfig", vocab_size=VOCAB, d_model=HIDDEN, encoder_layers=LAYERS, decoder_layers=LAYERS,
        encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=FFN, decoder_ffn_dim=FFN,
        num_mel_bins=16, max_source_positions=20, max_target_positions=POSITIONS, decoder_start_token_id=1,
        **_SPECIAL_IDS,
    ).get_encoder()  # fmt: skip
    features = torch.randn(1, 16, 40)  # the encoder wants exactly 2 x max_source_positions frames
    return model.eval(), {"input_features": features}, {"input_features": {0: "batch"}}


class LstmGru(nn.Module):
    """An LSTM feeding a GRU, then a linear head: recurrent layers stay in float."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(16, 24, batch_first=True)
        self.gru = nn.GRU(24, 24, batch_first=True)
        self.head = nn.Linear(24, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.gru(self.lstm(x)[0])[0])


class ConvAudio(nn.Module):
    """1-D convolutions over a waveform, then a pooled linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(1, 16, 9, stride=4), nn.ReLU(), nn.Conv1d(16, 32, 5, stride=2), nn.ReLU()
        )
        self.head = nn.Linear(32, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.unsqueeze(1)).mean(-1))


class Attention(nn.Module):
    """``nn.MultiheadAttention`` (self-attention) between two projections."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(16, HIDDEN)
        self.attention = nn.MultiheadAttention(HIDDEN, HEADS, batch_first=True)
        self.head = nn.Linear(HIDDEN, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        return self.head(self.attention(h, h, h, need_weights=False)[0])


def _torch_transformer():
    layer = nn.TransformerEncoderLayer(HIDDEN, HEADS, FFN, dropout=0.0, batch_first=True)
    model = nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Linear(HIDDEN, 4))
    return model.eval(), {"input": torch.randn(1, 8, HIDDEN)}, {"input": {0: "batch", 1: "sequence"}}


def _plain(cls: type[nn.Module], *shape: int, axes: dict[int, str]):
    def build():
        torch.manual_seed(0)
        return cls().eval(), {"x": torch.randn(*shape)}, {"x": axes}

    return build


ARCHITECTURES = [
    Arch("bert", "encoder", _encoder("BertModel", "BertConfig")),
    Arch("roberta", "encoder", _encoder("RobertaModel", "RobertaConfig", pad_token_id=1)),
    Arch("distilbert", "encoder", lambda: _text(_hf(
        "DistilBertModel", "DistilBertConfig", vocab_size=VOCAB, dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS,
        hidden_dim=FFN, max_position_embeddings=POSITIONS))),  # fmt: skip
    Arch("albert", "encoder", _encoder("AlbertModel", "AlbertConfig", embedding_size=16)),
    Arch("electra", "encoder", _encoder("ElectraModel", "ElectraConfig", embedding_size=16)),
    Arch("deberta-v2", "encoder", _encoder("DebertaV2Model", "DebertaV2Config")),
    Arch("mpnet", "encoder", _encoder("MPNetModel", "MPNetConfig")),
    Arch("modernbert", "encoder", _encoder(  # rotary positions computed in the graph (batch 1)
        "ModernBertModel", "ModernBertConfig", pad_token_id=0, cls_token_id=1, sep_token_id=2, bos_token_id=None,
        eos_token_id=None, global_attn_every_n_layers=2, local_attention=8)),  # fmt: skip
    Arch("gpt2", "decoder", _gpt2("GPT2Model")),
    Arch("gpt2-lm", "decoder", _gpt2("GPT2LMHeadModel")),
    Arch("gpt-neo", "decoder", _decoder("GPTNeoModel", "GPTNeoConfig", dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=LAYERS, num_heads=HEADS, max_position_embeddings=POSITIONS,
        attention_types=[[["global", "local"], 1]], window_size=4))),  # fmt: skip
    Arch("llama", "decoder", _decoder("LlamaModel", "LlamaConfig", _LLAMAISH)),
    Arch("llama-lm", "decoder", _decoder("LlamaForCausalLM", "LlamaConfig", _LLAMAISH)),
    Arch("mistral", "decoder", _decoder("MistralModel", "MistralConfig", _LLAMAISH | {"sliding_window": 4})),
    Arch("qwen2", "decoder", _decoder("Qwen2Model", "Qwen2Config", _LLAMAISH)),
    Arch("opt", "decoder", _decoder("OPTModel", "OPTConfig", dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, ffn_dim=FFN,
        max_position_embeddings=POSITIONS, word_embed_proj_dim=HIDDEN))),  # fmt: skip
    Arch("phi", "decoder", _decoder("PhiModel", "PhiConfig", _LLAMAISH | {"num_key_value_heads": HEADS})),
    Arch("mixtral", "decoder", _decoder(  # its experts' grouped matmuls stay in float (counted)
        "MixtralModel", "MixtralConfig", _LLAMAISH | {"num_local_experts": 4, "num_experts_per_tok": 2})),
    Arch("bart", "encoder-decoder", _bart),
    Arch("t5", "encoder-decoder", _t5),
    Arch("t5-encoder", "encoder-decoder", lambda: _text(_hf("T5EncoderModel", "T5Config", **_T5))),
    Arch("vit", "vision", _vision("ViTModel", "ViTConfig", **_VIT)),
    Arch("clip-vision", "vision", _vision("CLIPVisionModel", "CLIPVisionConfig", **_VIT)),
    Arch("convnext", "vision", _vision(
        "ConvNextModel", "ConvNextConfig", num_channels=3, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2)),
    Arch("wav2vec2", "audio", _wav2vec2("Wav2Vec2Model", "Wav2Vec2Config")),
    Arch("whisper-encoder", "audio", _whisper_encoder),
    Arch("lstm-gru", "torch.nn", _plain(LstmGru, 1, 10, 16, axes={0: "batch", 1: "sequence"})),
    Arch("conv-audio", "torch.nn", _plain(ConvAudio, 1, 400, axes={0: "batch", 1: "samples"})),
    Arch("multihead-attention", "torch.nn", _plain(Attention, 1, 8, 16, axes={0: "batch", 1: "sequence"})),
    Arch("transformer-encoder", "torch.nn", _torch_transformer),
]


# Sizes the dynamic axes take in the coverage test's second run: unlike the example's and the
# checks' (compile verifies the example and the example widened along every axis).
OTHER_SIZES = {"batch": 3, "sequence": 11, "target": 4, "samples": 1200}


def _like(name: str, value: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    if value.is_floating_point():
        return torch.randn(shape, dtype=value.dtype)
    if "mask" in name:
        mask = torch.ones(shape, dtype=value.dtype)
        if len(shape) == 2 and shape[1] > 4:
            mask[0, -2:] = 0  # a padded row: attention masks are read, not just passed along
        return mask
    return torch.randint(3, VOCAB, shape, dtype=value.dtype)


def resized(inputs: dict[str, Any], axes: dict[str, dict[int, str]], seed: int = 1) -> dict[str, Any]:
    """The example inputs with every dynamic axis at ``OTHER_SIZES`` and fresh contents; constants kept."""
    torch.manual_seed(seed)
    out = {}
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor):
            shape = list(value.shape)
            for axis, axis_name in axes.get(name, {}).items():
                shape[axis] = OTHER_SIZES[axis_name]
            value = _like(name, value, tuple(shape))
        out[name] = value
    return out


def calibration_batches(inputs: dict[str, Any], axes: dict[str, dict[int, str]], n: int) -> list[dict[str, Any]]:
    """``n`` batches at the example's shapes with fresh contents (what calibration data looks like)."""
    torch.manual_seed(2)
    return [
        {k: _like(k, v, tuple(v.shape)) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        for _ in range(n)
    ]


# ----------------------------------------------------------------------- decoders that generate


@dataclasses.dataclass(frozen=True)
class Generator:
    """A causal LM compiled with its KV cache for the generation coverage test."""

    name: str
    family: str  # how it places positions or attends: what the case exercises
    build: Callable[[], nn.Module]
    ci: bool = False  # one per family runs in CI (Falcon for rotary), the rest are ``slow``


def _lm(cls: str, cfg: str, **extra: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        config = {k: v for k, v in (_LLAMAISH | _SPECIAL_IDS | extra).items() if v is not None}
        return _hf(cls, cfg, **config).eval()

    return build


_NOT_LLAMA = dict(num_key_value_heads=None, intermediate_size=None, max_position_embeddings=None)
_MOE = dict(num_experts=4, num_experts_per_tok=2)
_STATE_SPACE = dict(  # initializer_range 1.0: a flatter random init repeats one token forever
    _NOT_LLAMA, num_attention_heads=None, state_size=8, expand=2, conv_kernel=4, initializer_range=1.0
)  # fmt: skip

GENERATORS = [
    Generator("llama", "rotary, grouped KV", _lm("LlamaForCausalLM", "LlamaConfig")),  # CI: test_causal_lm
    Generator("qwen2", "rotary, grouped KV", _lm("Qwen2ForCausalLM", "Qwen2Config")),
    Generator("qwen3", "rotary, q/k norm", _lm("Qwen3ForCausalLM", "Qwen3Config", head_dim=8)),
    Generator("phi3", "rotary", _lm("Phi3ForCausalLM", "Phi3Config")),
    Generator("gemma", "rotary", _lm("GemmaForCausalLM", "GemmaConfig", head_dim=8)),
    Generator("gemma2", "rotary, sliding window", _lm(
        "Gemma2ForCausalLM", "Gemma2Config", head_dim=8, sliding_window=4)),  # fmt: skip
    Generator("gemma3", "rotary, sliding window", _lm(
        "Gemma3ForCausalLM", "Gemma3TextConfig", head_dim=8, sliding_window=4)),  # fmt: skip
    Generator("gpt-neox", "partial rotary", _lm("GPTNeoXForCausalLM", "GPTNeoXConfig", num_key_value_heads=None)),
    Generator("stablelm", "partial rotary", _lm("StableLmForCausalLM", "StableLmConfig")),
    Generator("starcoder2", "rotary, sliding window", _lm("Starcoder2ForCausalLM", "Starcoder2Config")),
    Generator("falcon", "rotary, multi-query (1 KV head)", _lm(
        "FalconForCausalLM", "FalconConfig", **_NOT_LLAMA, multi_query=True, new_decoder_architecture=False), ci=True),
    Generator("bloom", "ALiBi", _lm(
        "BloomForCausalLM", "BloomConfig", **_NOT_LLAMA, num_hidden_layers=None, num_attention_heads=None,
        n_layer=LAYERS, n_head=HEADS), ci=True),  # fmt: skip
    Generator("mixtral", "mixture of experts", _lm(  # CI: test_causal_lm (weight-only and float experts)
        "MixtralForCausalLM", "MixtralConfig", num_local_experts=4, num_experts_per_tok=2)),  # fmt: skip
    Generator("qwen2-moe", "mixture of experts, shared expert", _lm(
        "Qwen2MoeForCausalLM", "Qwen2MoeConfig", **_MOE, moe_intermediate_size=32, shared_expert_intermediate_size=32)),
    Generator("olmoe", "mixture of experts", _lm("OlmoeForCausalLM", "OlmoeConfig", **_MOE)),
    Generator("mamba", "state space (conv + SSM state)", _lm(
        "MambaForCausalLM", "MambaConfig", **_STATE_SPACE), ci=True),  # fmt: skip
    Generator("mamba2", "state space (conv + SSM state)", _lm(
        "Mamba2ForCausalLM", "Mamba2Config", **_STATE_SPACE, num_heads=8, head_dim=8, n_groups=1)),
]  # fmt: skip
