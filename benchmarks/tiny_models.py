"""Make two tiny Llama models on disk for vLLM's CPU build: no model hub, ~0.5 MB each.

    python -m benchmarks.tiny_models DIR

writes `DIR/tiny-llama-a` (stable) and `DIR/tiny-llama-b` (canary): 2 layers, hidden size 64,
head_dim 32 (vLLM's CPU attention rejects 16), random weights from different seeds, and one
byte-level BPE tokenizer trained here on generated text, with a chat template. They answer
nonsense, quickly: enough to exercise every code path of a real engine.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

MODEL_NAMES = ("tiny-llama-a", "tiny-llama-b")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
_SPECIAL = ["<s>", "</s>", "<unk>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
_WORDS = (
    "the canary sings while stable models serve tokens to users who ask about weather "
    "rivers mountains numbers code music and every other thing a small model knows nothing of"
).split()


def _corpus(seed: int, lines: int = 2000) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 16))) for _ in range(lines)]


def _tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=_SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(_corpus(0), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)


def make_model(directory: Path, seed: int) -> Path:
    """Write one tiny Llama (weights from `seed`) with the shared tokenizer to `directory`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    _tokenizer(directory)
    vocab = json.loads((directory / "tokenizer.json").read_text())["model"]["vocab"]
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=4096,
        bos_token_id=vocab["<s>"],
        eos_token_id=vocab["</s>"],
        pad_token_id=vocab["</s>"],
        tie_word_embeddings=True,
        torch_dtype="float32",
    )
    LlamaForCausalLM(config).save_pretrained(directory, safe_serialization=True)
    return directory


def make_models(root: Path) -> list[Path]:
    """Both tiny models under `root`; existing ones are kept (the tests call this every session)."""
    made = []
    for seed, name in enumerate(MODEL_NAMES, start=1):
        path = root / name
        if not (path / "model.safetensors").exists():
            make_model(path, seed)
        made.append(path)
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path, help="where to write tiny-llama-a and tiny-llama-b")
    for path in make_models(parser.parse_args().directory.resolve()):
        size = sum(f.stat().st_size for f in path.iterdir()) / 1e6
        print(f"{path}  ({size:.1f} MB)")


if __name__ == "__main__":
    main()
