"""Byte-level BPE tokenizer training shared by the fixtures and the demo model.

Every tokenizer built here uses the same special tokens (ids 0..6, so ``<s>`` is 1
and ``</s>`` is 2) and a Phi-3 style chat template, and is saved through
``transformers.PreTrainedTokenizerFast`` so that the folder gets ``tokenizer.json``,
``tokenizer_config.json`` and ``chat_template.jinja``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS: tuple[str, ...] = (
    "<unk>",
    "<s>",
    "</s>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
)
UNK_ID, BOS_ID, EOS_ID, END_ID = 0, 1, 2, 6
PAD_ID = 0

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# Small multilingual text: English, German umlauts, Japanese and emoji, so that
# multi-byte UTF-8 characters end up split across several byte-level tokens.
MULTILINGUAL_TEXT: tuple[str, ...] = (
    "The edge agent runs small language models on Raspberry Pi class boxes.",
    "It answers questions, summarises logs and reports the temperature of the device.",
    "Hello world! How are you today? The quick brown fox jumps over the lazy dog.",
    "Please restart the sensor service and check the disk usage of /var/log.",
    "Der Rasenmäher läuft über die Straße, während Jürgen Brötchen für Öl tauscht.",
    "Schöne Grüße aus München! Die Größe der Dateien ist überraschend gering.",
    "Fußgänger überqueren die Brücke; Käse, Äpfel und Übungen sind gemütlich.",
    "こんにちは、世界。今日はいい天気ですね。",
    "エッジデバイスで小さな言語モデルを動かします。温度は二十五度です。",
    "東京の駅で電車を待っています。ありがとうございます！",  # noqa: RUF001
    "Emoji test: 🙂 😀 🚀 🔥 👍 🎉 ❤️ 🌍 🤖 ✅ ⚠️ 📦",
    "Status: ok ✅, warning ⚠️, robot 🤖 says hi 👋 from the edge 🌍.",
    "Numbers 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14 -7 1e-3",
    'JSON: {"name": "edge-agent", "version": 1, "enabled": true}',
    "def main() -> None:\n    print('hello')\n",
)


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 1) -> Tokenizer:
    """Train a byte-level BPE ``tokenizers.Tokenizer`` on ``texts``.

    Special tokens get ids 0..6 in the order of :data:`SPECIAL_TOKENS`; the full
    256-symbol byte alphabet is always included so any UTF-8 input is encodable.
    """
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    for i, name in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(name) != i:
            raise RuntimeError(f"special token {name} got id {tok.token_to_id(name)}, expected {i}")
    return tok


def to_hf(tok: Tokenizer, model_max_length: int) -> PreTrainedTokenizerFast:
    """Wrap a trained tokenizer as a ``PreTrainedTokenizerFast`` with chat template."""
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<unk>",
        additional_special_tokens=list(SPECIAL_TOKENS[3:]),
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def vocab_size_padded(tok: Tokenizer, multiple: int = 64) -> int:
    """Return the tokenizer's vocab size rounded up to a multiple of ``multiple``."""
    n = tok.get_vocab_size(with_added_tokens=True)
    return -(-n // multiple) * multiple


def save(tok: Tokenizer, out_dir: Path, model_max_length: int) -> PreTrainedTokenizerFast:
    """Save ``tok`` with its chat template into ``out_dir`` and return the HF wrapper."""
    hf = to_hf(tok, model_max_length)
    hf.save_pretrained(str(out_dir))
    return hf
