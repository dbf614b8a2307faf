"""Offline builders for the demo's tiny tokenizer and causal LM.

Nothing here touches the Hugging Face Hub: the tokenizer is a byte-level BPE trained in-process with the
``tokenizers`` library on the bundled demo data, and the model is a randomly initialised Llama (or Qwen2)
built from a config. :func:`build_demo_assets` saves both with ``save_pretrained`` so that the directory can
later be loaded with ``PreTrainedTokenizerFast.from_pretrained`` / ``AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Literal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, IM_START, IM_END)
"""Special tokens of the demo tokenizer; they get ids 0..3 in this order."""
_SPECIAL_RE = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
"""ChatML template. The assistant content *and* its closing ``<|im_end|>`` sit inside
``{% generation %}...{% endgeneration %}`` so that ``return_assistant_tokens_mask=True`` (TRL's
``assistant_only_loss``) trains the model to emit the end-of-turn token."""

DATA_PACKAGE = "swift_callbacks.assets"
DATA_FILES = ("base", "cot_study_z", "cot_study_z_similar", "cot_study_z_cot")
"""Stems of the bundled JSONL files under ``swift_callbacks/assets/data``."""


def load_rows(name: str) -> list[dict]:
    """Reads one bundled JSONL data file.

    Args:
        name: File stem such as ``"base"`` or ``"cot_study_z"`` (a trailing ``.jsonl`` is accepted).

    Returns:
        The rows, each a dict with ``id``, ``task``, ``prompt``, ``completion`` and ``answer``.

    Raises:
        FileNotFoundError: If no bundled file has that name.
    """
    stem = name.removesuffix(".jsonl")
    path = resources.files(DATA_PACKAGE).joinpath("data", f"{stem}.jsonl")
    if not path.is_file():
        raise FileNotFoundError(f"no bundled demo data file {stem!r}; available: {', '.join(DATA_FILES)}")
    text = path.read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def render_chat(prompt: str, completion: str) -> str:
    """Renders a prompt/completion pair as ChatML text, matching :data:`CHAT_TEMPLATE`.

    Args:
        prompt: User message.
        completion: Assistant message (leading whitespace is stripped, as a chat message would be).

    Returns:
        The ChatML transcript of a single user/assistant exchange.
    """
    return f"{IM_START}user\n{prompt}{IM_END}\n{IM_START}assistant\n{completion.strip()}{IM_END}\n"


def demo_corpus() -> list[str]:
    """Collects the texts the demo tokenizer is trained on.

    Returns:
        For every row of every bundled file, the plain ``prompt + completion`` text followed by its ChatML
        rendering, in a fixed order.
    """
    texts: list[str] = []
    for name in DATA_FILES:
        for row in load_rows(name):
            texts.append(row["prompt"] + row["completion"])
            texts.append(render_chat(row["prompt"], row["completion"]))
    return texts


def build_tokenizer(
    texts: Iterable[str], vocab_size: int = 512, *, model_max_length: int = 256
) -> PreTrainedTokenizerFast:
    """Trains a small byte-level BPE tokenizer and wraps it for ``transformers``.

    The ByteLevel pre-tokenizer does not add a prefix space, so ``"prompt" + " completion"`` tokenizes as the
    concatenation of the two parts whenever the completion starts with a space. All 256 byte symbols are in
    the initial alphabet, so any text can be encoded. Special-token strings inside ``texts`` are cut out
    before training. Training is deterministic for the same input.

    Args:
        texts: Training texts.
        vocab_size: Target vocabulary size, special tokens and the 256 byte symbols included.
        model_max_length: Maximum sequence length recorded on the tokenizer.

    Returns:
        A tokenizer with ``pad_token="<|pad|>"``, ``eos_token="<|endoftext|>"``, no BOS token, no
        automatically added special tokens, and a ChatML chat template with generation markers.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # The BPE trainer does not split added special tokens out of the training text, so literal markers such as
    # "<|im_end|>" would otherwise spend merges on fragments like "?<|" that can never be used at encode time.
    pieces = [piece for text in texts for piece in _SPECIAL_RE.split(text) if piece]
    tok.train_from_iterator(pieces, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=model_max_length,
        padding_side="right",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(
    tokenizer: PreTrainedTokenizerFast,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 128,
    max_position_embeddings: int = 256,
    seed: int = 0,
    tie_word_embeddings: bool = False,
    arch: Literal["llama", "qwen2"] = "llama",
) -> PreTrainedModel:
    """Builds a tiny randomly initialised causal LM matching ``tokenizer``.

    Initialisation runs under ``torch.manual_seed(seed)`` inside ``torch.random.fork_rng``, so the result
    depends only on the arguments and the caller's global CPU RNG state is left untouched.

    Args:
        tokenizer: Tokenizer whose size and special-token ids configure the model.
        hidden_size: Model width.
        num_layers: Number of decoder layers.
        num_heads: Attention heads (also used as key/value heads).
        intermediate_size: MLP width.
        max_position_embeddings: Maximum sequence length.
        seed: Seed for the random initialisation.
        tie_word_embeddings: Whether input and output embeddings share weights.
        arch: ``"llama"`` for ``LlamaForCausalLM`` or ``"qwen2"`` for ``Qwen2ForCausalLM``.

    Returns:
        The model in float32, eval mode, with eager attention. ``config.eos_token_id`` is the tokenizer's EOS;
        ``generation_config.eos_token_id`` also lists ``<|im_end|>`` when the tokenizer has it.

    Raises:
        ValueError: If ``arch`` is unknown.
    """
    if arch == "llama":
        config_cls, model_cls = LlamaConfig, LlamaForCausalLM
    elif arch == "qwen2":
        config_cls, model_cls = Qwen2Config, Qwen2ForCausalLM
    else:
        raise ValueError(f"unknown arch {arch!r}; expected 'llama' or 'qwen2'")
    eos_id = tokenizer.eos_token_id
    bos_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    config = config_cls(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=pad_id,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls._from_config(config, attn_implementation="eager", dtype=torch.float32)
    model.generation_config.pad_token_id = pad_id
    model.generation_config.bos_token_id = bos_id
    # Generation stops on either end marker: <|endoftext|> (plain prompt-completion) or <|im_end|> (ChatML).
    stop_ids = [eos_id]
    im_end_id = tokenizer.convert_tokens_to_ids(IM_END)
    if isinstance(im_end_id, int) and im_end_id not in (eos_id, tokenizer.unk_token_id):
        stop_ids.append(im_end_id)
    model.generation_config.eos_token_id = stop_ids if len(stop_ids) > 1 else eos_id
    model.eval()
    return model


def build_demo_assets(
    out_dir: str | Path | None = None, *, vocab_size: int = 512, **model_kwargs
) -> tuple[PreTrainedTokenizerFast, PreTrainedModel]:
    """Builds the demo tokenizer and model from the bundled corpus, optionally saving them.

    Args:
        out_dir: If given, both are saved there with ``save_pretrained`` (directory created if missing), so it
            can be reloaded offline with ``PreTrainedTokenizerFast.from_pretrained(out_dir)`` and
            ``AutoModelForCausalLM.from_pretrained(out_dir)``.
        vocab_size: Target vocabulary size of the tokenizer.
        **model_kwargs: Keyword arguments forwarded to :func:`build_model`.

    Returns:
        The tokenizer and the model.
    """
    tokenizer = build_tokenizer(demo_corpus(), vocab_size=vocab_size)
    model = build_model(tokenizer, **model_kwargs)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(out)
        model.save_pretrained(out)
    return tokenizer, model
