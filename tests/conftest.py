"""Tiny random targets built from configs: fast, and exact in float64."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from redrafter.drafter import DrafterConfig, RecurrentDrafter
from redrafter.ngrams import build_table

VOCAB = 96
HIDDEN = 32

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=0,
)

FAMILIES = {
    "llama": lambda: LlamaConfig(**COMMON),
    "qwen2": lambda: Qwen2Config(**COMMON),
    "mistral": lambda: MistralConfig(**COMMON, sliding_window=None),
    "gemma3": lambda: Gemma3TextConfig(**COMMON, head_dim=8, sliding_window=512),
    "gemma2": lambda: Gemma2Config(**COMMON, head_dim=8, sliding_window=512, attn_implementation="eager"),
}


def random_linear(in_features: int, out_features: int, seed: int) -> tuple[torch.nn.Linear, torch.Generator]:
    """A bfloat16 linear layer with random weights and bias, and the generator that made them (seeded
    ``seed``), for the test's inputs."""
    generator = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(in_features, out_features, dtype=torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=generator))
        linear.bias.copy_(torch.randn(out_features, generator=generator))
    return linear, generator


def tiny_target(family: str, seed: int = 0, dtype: torch.dtype = torch.float64, config=None):
    """A random ``family`` causal LM in eval mode (``config``: another than :data:`FAMILIES`' one).
    Weights are scaled up so logits are peaked (a random model with tiny logits would make every
    greedy step a near-tie)."""
    torch.manual_seed(seed)
    config = config or FAMILIES[family]()
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


@pytest.fixture(params=sorted(FAMILIES))
def family(request) -> str:
    return request.param


CHAT_TEMPLATE = (
    "{% for m in messages %}w2 {{ m['content'] }} w3 {% endfor %}{% if add_generation_prompt %}w4{% endif %}"
)


def word_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "<eos>": 1} | {f"w{i}": i for i in range(2, VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_target("llama", seed=3)
    model.config.max_position_embeddings = 64
    model.save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def drafter_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("drafter")
    torch.manual_seed(0)
    drafter = RecurrentDrafter(DrafterConfig(hidden_size=HIDDEN, vocab_size=VOCAB))
    # An n-gram table of random text, so the CLI and bench tests run with the n-gram beam too.
    drafter.ngrams = build_table([torch.randint(2, VOCAB, (300,)).tolist()], min_n=1, max_n=3, min_count=1)
    drafter.save_pretrained(folder)
    return folder
