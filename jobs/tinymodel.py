"""The tiny Qwen3 model and locally trained tokenizer used by the demo and the tests.

Everything is built offline from the bundled text in ``data/`` (see ``data/README.md``):

* ``train_tokenizer`` trains a byte-level BPE (the ``tokenizers`` library) with Qwen-style special
  tokens and chat template;
* ``build_tiny_model`` trains a 2-layer ``Qwen3ForCausalLM`` (hidden 64, every Linear dimension a
  multiple of 16 so that NVFP4 with group size 16 applies) for a few hundred AdamW steps on the CPU,
  and saves it in bfloat16 safetensors with its tokenizer.

The training texts are ``data/train_mini.txt`` plus the calibration chats ``data/calib_mini.jsonl``
(rendered both as ``role: content`` lines, the way the ``ultrachat`` set is scored, and with the chat
template, the way calibration sees them). The evaluation files ``wiki_mini.txt`` and
``chat_mini.jsonl`` are never trained on; their losses are reported.

Builds are cached: ``qscore-tiny.json`` in the output directory records a hash of the recipe and of
the training data, and a matching directory is reused as is. A build is written to a temporary
directory and renamed into place, so a partial model never appears under the output name.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Callable, Sequence

from jobs.core import atomic

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
TRAIN_FILES = ("train_mini.txt", "calib_mini.jsonl")
EVAL_FILES = ("wiki_mini.txt", "chat_mini.jsonl")
MANIFEST = "qscore-tiny.json"

EOS = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (EOS, IM_START, IM_END)
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# The pre-tokenizer split of Qwen2/Qwen3 (GPT-4 style: words, single digits, punctuation runs).
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

DEFAULT_STEPS = 400
RECIPE_VERSION = 2
MAX_MODEL_LEN = 2048


# The GPU tests' variant: vLLM's FlashAttention and FlashInfer paths want head_dim 64 or more, and
# Marlin's FP4 tiles are 64 x 128, so the CPU recipe's 16-wide heads would test padding, not the kernels
# real checkpoints take.
GPU_SHAPE = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2,
             "head_dim": 64}


def recipe(vocab_size: int = 1024, steps: int = DEFAULT_STEPS, seed: int = 0, shape: dict | None = None) -> dict:
    """Every parameter that shapes the model; its hash (with the data's) names a build.
    ``shape`` overrides model dimensions (e.g. ``GPU_SHAPE``)."""
    spec = {
        "version": RECIPE_VERSION,
        "tokenizer": {"type": "byte-level BPE", "vocab_size": vocab_size, "special_tokens": list(SPECIAL_TOKENS)},
        "model": {
            "architecture": "Qwen3ForCausalLM",
            "hidden_size": 64,
            "intermediate_size": 192,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "max_position_embeddings": MAX_MODEL_LEN,
            "tie_word_embeddings": False,
            "vocab_multiple": 16,
        },
        "train": {
            "steps": steps,
            "batch_size": 16,
            "seq_len": 256,
            "lr": 6e-3,
            "min_lr_ratio": 0.1,
            "warmup_steps": max(1, steps // 20),
            "betas": [0.9, 0.95],
            "weight_decay": 0.01,
            "grad_clip": 1.0,
            "seed": seed,
            "threads": 1,
        },
        "save_dtype": "bfloat16",
    }
    spec["model"].update(shape or {})
    return spec


# ------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------
def render_chat(messages: Sequence[dict]) -> str:
    """SPEC §2 rendering, the same one the ``ultrachat`` set is scored with."""
    from jobs.texts.evalsets import render_messages

    return render_messages(list(messages or []))


def read_lines(path: Path) -> list[str]:
    """Stripped non-empty lines of a text file."""
    return [s for s in (l.strip() for l in path.read_text(encoding="utf-8").splitlines()) if s]


def read_chats(path: Path) -> list[list[dict]]:
    rows = [json.loads(l) for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]
    return [r["messages"] for r in rows if render_chat(r["messages"])]


def default_train_texts(data_dir: Path = DATA_DIR) -> tuple[list[str], list[list[dict]]]:
    """Plain training texts and the chats to also train on through the chat template."""
    chats = read_chats(data_dir / "calib_mini.jsonl")
    return read_lines(data_dir / "train_mini.txt") + [render_chat(c) for c in chats], chats


def eval_texts(data_dir: Path = DATA_DIR) -> dict[str, list[str]]:
    return {
        "wiki_mini": read_lines(data_dir / "wiki_mini.txt"),
        "chat_mini": [render_chat(c) for c in read_chats(data_dir / "chat_mini.jsonl")],
    }


# ------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------
def train_tokenizer(texts: Sequence[str], vocab_size: int = 1024):
    """Byte-level BPE trained on ``texts``; returns a ``transformers.PreTrainedTokenizerFast``.

    ``<|endoftext|>`` is eos and pad, ``<|im_start|>``/``<|im_end|>`` delimit chat turns, and the
    Qwen-style chat template is set. No BOS is added (like Qwen's tokenizers).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=EOS,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=MAX_MODEL_LEN,
        clean_up_tokenization_spaces=False,
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def portable_tokenizer_config(model_dir, model_max_length: int | None = None) -> bool:
    """Make a saved ``tokenizer_config.json`` loadable by transformers 4.x as well as 5.x.

    transformers 5 writes ``tokenizer_class: TokenizersBackend`` and ``extra_special_tokens`` as a
    list, which 4.x (e.g. the one a vLLM image pins) cannot load; the generic
    ``PreTrainedTokenizerFast`` and ``additional_special_tokens`` mean the same to both. The chat
    template of ``chat_template.jinja`` is embedded too (older versions only read it from the
    config). Any tokenizer saved by transformers 5 can go through this, e.g. the one a quantization
    run re-saves. Returns whether the file changed.
    """
    out = Path(model_dir)
    path = out / "tokenizer_config.json"
    if not path.is_file():
        return False
    text = path.read_text(encoding="utf-8")
    cfg = json.loads(text)
    if cfg.get("tokenizer_class") in (None, "TokenizersBackend"):
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = cfg.get("extra_special_tokens")
    if isinstance(extra, list):
        del cfg["extra_special_tokens"]
        cfg.setdefault("additional_special_tokens", extra)
    for key in ("is_local", "local_files_only"):  # load-time flags some versions write back
        cfg.pop(key, None)
    if model_max_length is not None:
        cfg["model_max_length"] = model_max_length
    jinja = out / "chat_template.jinja"
    if "chat_template" not in cfg and jinja.is_file():
        cfg["chat_template"] = jinja.read_text(encoding="utf-8")
    new = json.dumps(cfg, indent=2, ensure_ascii=False) + "\n"
    if new != text:
        path.write_text(new, encoding="utf-8")
    return new != text


def _portable_model_config(out: Path) -> None:
    """Add the transformers-4.x spellings (``torch_dtype``, ``rope_theta``) next to the 5.x ones."""
    path = out / "config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg.setdefault("torch_dtype", cfg.get("dtype", "bfloat16"))
    rope = cfg.get("rope_parameters") or {}
    if "rope_theta" in rope:
        cfg.setdefault("rope_theta", rope["rope_theta"])
    cfg.setdefault("rope_scaling", None)
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------
def make_config(vocab_size: int, eos_id: int, spec: dict | None = None):
    from transformers import Qwen3Config

    m = (spec or recipe())["model"]
    mult = m["vocab_multiple"]
    return Qwen3Config(
        vocab_size=-(-vocab_size // mult) * mult,
        hidden_size=m["hidden_size"],
        intermediate_size=m["intermediate_size"],
        num_hidden_layers=m["num_hidden_layers"],
        num_attention_heads=m["num_attention_heads"],
        num_key_value_heads=m["num_key_value_heads"],
        head_dim=m["head_dim"],
        max_position_embeddings=m["max_position_embeddings"],
        tie_word_embeddings=m["tie_word_embeddings"],
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )


def mean_nll(model, tokenizer, texts: Sequence[str], min_tokens: int = 16,
             max_tokens: int = MAX_MODEL_LEN - 8, batch_size: int = 16) -> float:
    """Token-weighted mean NLL (nats) the way the scorer counts it: texts under ``min_tokens``
    dropped, the rest cut to ``max_tokens`` in token space, position 0 unscored."""
    import torch

    seqs = [ids[:max_tokens] for ids in (tokenizer(t)["input_ids"] for t in texts) if len(ids) >= min_tokens]
    if not seqs:
        raise ValueError("no text has enough tokens to score")
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, len(seqs), batch_size):
            ids, mask = _pad(seqs[i:i + batch_size], tokenizer.pad_token_id)
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
            keep = mask[:, 1:].bool()
            total += -logp[keep].double().sum().item()
            count += int(keep.sum())
    model.train(was_training)
    return total / count


def _pad(seqs: Sequence[Sequence[int]], pad_id: int):
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[row, : len(s)] = 1
    return ids, mask


def _training_examples(tokenizer, texts: Sequence[str], chats: Sequence[Sequence[dict]], seq_len: int):
    """Each text (and each chat through the template) ends with eos and is cut into ``seq_len``
    pieces; the first piece of every text starts at its beginning, as scored texts do."""
    streams = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    for c in chats:
        streams.append(list(tokenizer.apply_chat_template(list(c), tokenize=True, return_dict=True)["input_ids"]))
    out = []
    for s in streams:
        for k in range(0, len(s), seq_len):
            piece = s[k:k + seq_len]
            if len(piece) >= 2:
                out.append(piece)
    return out


def _epoch_batches(lengths: Sequence[int], batch_size: int, gen) -> list[list[int]]:
    """One shuffled pass in batches of similar lengths (less padding): shuffle, sort within
    windows of 8 batches by length, cut into batches, shuffle the batches. Popped from the end."""
    import torch

    order = torch.randperm(len(lengths), generator=gen).tolist()
    window = batch_size * 8
    batches = []
    for w in range(0, len(order), window):
        chunk = sorted(order[w:w + window], key=lambda i: lengths[i])
        batches += [chunk[k:k + batch_size] for k in range(0, len(chunk), batch_size)]
    perm = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[i] for i in perm]


def train_model(model, examples: list[list[int]], pad_id: int, spec: dict,
                log: Callable[[str], None] = print) -> list[float]:
    """AdamW with linear warm-up and cosine decay; batches drawn by a seeded local generator."""
    import torch

    t = spec["train"]
    gen = torch.Generator().manual_seed(t["seed"] + 1)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": t["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=t["lr"], betas=tuple(t["betas"]),
    )
    steps, warm, floor = t["steps"], t["warmup_steps"], t["min_lr_ratio"]

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        frac = (step - warm) / max(1, steps - warm)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    losses = []
    batches: list[list[int]] = []
    for step in range(steps):
        if not batches:
            batches = _epoch_batches([len(e) for e in examples], t["batch_size"], gen)
        ids, mask = _pad([examples[i] for i in batches.pop()], pad_id)
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t["grad_clip"])
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if (step + 1) % max(1, steps // 6) == 0 or step + 1 == steps:
            log(f"  step {step + 1:4d}/{steps}  loss {sum(losses[-10:]) / len(losses[-10:]):.3f}")
    model.eval()
    return losses


@contextlib.contextmanager
def torch_threads(n: int):
    """Run with ``n`` intra-op threads, then restore. One thread makes training bit-reproducible
    whatever the core count, and on a small shared CPU it is also much faster than contending
    OpenMP threads (measured 0.13 s/step with 1 thread vs 1.45 s/step with 2 under load)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------
# Build (cached, atomic)
# ------------------------------------------------------------------------------------------
def recipe_hash(spec: dict, texts: Sequence[str] | None = None, data_dir: Path = DATA_DIR) -> str:
    """sha256 of the recipe and of the training data (file contents, or the given texts)."""
    h = hashlib.sha256(json.dumps(spec, sort_keys=True).encode())
    if texts is None:
        for name in TRAIN_FILES:
            h.update(b"\0" + name.encode() + b"\0" + (data_dir / name).read_bytes())
    else:
        for text in texts:
            h.update(b"\0" + text.encode("utf-8"))
    return h.hexdigest()


def cached(output_dir: Path, digest: str) -> bool:
    try:
        manifest = json.loads((output_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (output_dir / "config.json").is_file() and manifest.get("recipe_hash") == digest


def build_tiny_model(output_dir, train_texts: Sequence[str] | None = None, steps: int = DEFAULT_STEPS,
                     seed: int = 0, *, vocab_size: int = 1024, shape: dict | None = None, force: bool = False,
                     log: Callable[[str], None] = print) -> Path:
    """Train (or reuse) the tiny BF16 Qwen3 model + tokenizer in ``output_dir``; return its path.

    ``train_texts`` replaces the bundled training data (``data/train_mini.txt`` and the chats of
    ``data/calib_mini.jsonl``). A directory whose ``qscore-tiny.json`` carries the same recipe hash
    is reused unless ``force``.
    """
    import torch
    import tokenizers
    import transformers
    from transformers import GenerationConfig, Qwen3ForCausalLM

    output_dir = Path(output_dir).resolve()
    spec = recipe(vocab_size=vocab_size, steps=steps, seed=seed, shape=shape)
    digest = recipe_hash(spec, train_texts)
    if not force and cached(output_dir, digest):
        log(f"tiny model: {output_dir} is up to date (recipe {digest[:12]})")
        return output_dir

    start = time.perf_counter()
    if train_texts is None:
        texts, chats = default_train_texts()
    else:
        texts, chats = [t for t in train_texts if t and t.strip()], []
    if not texts:
        raise ValueError("no training text")
    log(f"tiny model: training tokenizer on {len(texts)} texts (vocab {vocab_size})")
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    config = make_config(len(tokenizer), eos_id, spec)

    with torch.random.fork_rng(devices=[]), torch_threads(spec["train"]["threads"]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config).float()
        examples = _training_examples(tokenizer, texts, chats, spec["train"]["seq_len"])
        evals = eval_texts() if (DATA_DIR / EVAL_FILES[0]).is_file() else {}
        initial = {name: mean_nll(model, tokenizer, ts) for name, ts in evals.items()}
        n_tokens = sum(len(e) for e in examples)
        log(f"tiny model: {sum(p.numel() for p in model.parameters()):,} parameters, "
            f"{len(examples)} sequences / {n_tokens:,} tokens, {steps} steps")
        losses = train_model(model, examples, tokenizer.pad_token_id, spec, log=log)
        final = {name: mean_nll(model, tokenizer, ts) for name, ts in evals.items()}

    train_loss = sum(losses[-10:]) / len(losses[-10:]) if losses else float("nan")
    seconds = time.perf_counter() - start
    log(f"tiny model: final train loss {train_loss:.3f}; eval loss "
        + ", ".join(f"{k} {initial[k]:.3f} -> {v:.3f}" for k, v in final.items())
        + f" (uniform {math.log(config.vocab_size):.3f}); {seconds:.1f} s")

    with atomic.atomic_dir(output_dir) as tmp:  # a stale build (other recipe) or a partial one is replaced
        model.to(torch.bfloat16)
        model.config.dtype = torch.bfloat16
        model.generation_config = GenerationConfig(
            bos_token_id=None,
            eos_token_id=[eos_id, tokenizer.convert_tokens_to_ids(IM_END)],
            pad_token_id=eos_id,
            do_sample=False,
        )
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _portable_model_config(tmp)
        portable_tokenizer_config(tmp, model_max_length=MAX_MODEL_LEN)
        manifest = {
            "recipe_hash": digest,
            "recipe": spec,
            "train_data": ({name: hashlib.sha256((DATA_DIR / name).read_bytes()).hexdigest() for name in TRAIN_FILES}
                           if train_texts is None else {"texts": len(texts)}),
            "train_sequences": len(examples),
            "train_tokens": n_tokens,
            "train_loss_final": round(train_loss, 6),
            "eval_loss_initial": {k: round(v, 6) for k, v in initial.items()},
            "eval_loss": {k: round(v, 6) for k, v in final.items()},
            "uniform_loss": round(math.log(config.vocab_size), 6),
            "build_seconds": round(seconds, 2),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "tokenizers": tokenizers.__version__},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    log(f"tiny model: saved to {output_dir}")
    return output_dir
