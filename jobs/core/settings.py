"""Typed settings: one frozen dataclass per stage, built once by the CLI and passed by keyword.

A stage never reads the environment or click's context itself; everything it depends on is here, so
what a run did can be read off one object (and its fingerprint computed from it).
"""
from __future__ import annotations

import dataclasses
import enum
import re
from dataclasses import dataclass, field

from jobs.core.errors import SettingsError


class Nvfp4Compute(str, enum.Enum):
    """``--nvfp4-compute``: the arithmetic an NVFP4 checkpoint is computed with. A ``str`` so that it is
    recorded (metadata, fingerprints) as the word the user typed."""

    DECLARED = "declared"  # as the checkpoint declares: W4A4 when its config quantizes activations
    WEIGHT_ONLY = "weight-only"  # FP4 weights times full-precision activations (W4A16)

    def __str__(self) -> str:
        return self.value



@dataclass(frozen=True)
class EngineOptions:
    """How a backend runs a model. Each backend reads the fields it knows; none is silently ignored:
    ``from_mapping`` refuses a name that is not a field."""

    dtype: str = "auto"
    max_model_len: int = 2048
    nvfp4_compute: Nvfp4Compute = Nvfp4Compute.DECLARED  # a string is taken and made one
    # transformers
    device: str = "auto"
    max_batch_tokens: int = 8192
    window: int = 64  # samples sorted by length within a window of this many (little padding, in-order output)
    # vLLM
    gpu_memory_utilization: float = 0.85
    tensor_parallel_size: int = 1
    enforce_eager: bool | None = None  # None: decided by the workload's size (see jobs/engines/vllm.py)
    max_num_batched_tokens: int | None = None
    kv_cache_memory_bytes: int | None = None  # a fixed KV cache (jobs.runs.slots sets it for a shared GPU)
    quantization: str | None = None
    max_logprobs: int | None = None  # the score stage sets it to --topk
    load_format: str | None = None  # "dummy": random weights (bench/ only, never for results)

    def __post_init__(self):
        try:
            object.__setattr__(self, "nvfp4_compute", Nvfp4Compute(self.nvfp4_compute))
        except ValueError:
            raise SettingsError(f"--nvfp4-compute must be one of {', '.join(m.value for m in Nvfp4Compute)}, "
                                f"not {self.nvfp4_compute!r}") from None
        if not 0 < self.gpu_memory_utilization <= 1:
            raise SettingsError(f"--gpu-memory-utilization must be in (0, 1], not {self.gpu_memory_utilization}")
        if self.tensor_parallel_size < 1:
            raise SettingsError("--tensor-parallel-size must be at least 1")
        if self.max_batch_tokens < 1:
            raise SettingsError("--max-batch-tokens must be at least 1")

    @classmethod
    def from_mapping(cls, values: dict) -> "EngineOptions":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SettingsError(f"unknown engine option(s) {unknown}: known are {sorted(known)}")
        return cls(**values)

    def replace(self, **changes) -> "EngineOptions":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Shard:
    """``i/N``: the texts whose index in the set is ``i-1`` modulo ``N`` (1-based ``i``)."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str | None) -> "Shard | None":
        if not text:
            return None
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
            raise SettingsError(f"--shard must be i/N with 1 <= i <= N, not {text!r}")
        shard = cls(int(m.group(1)), int(m.group(2)))
        return None if shard.count == 1 else shard

    @property
    def name(self) -> str:
        return f"{self.index}-of-{self.count}"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


@dataclass(frozen=True)
class QuantizeSettings:
    model_id: str
    output: str
    scheme: str = "NVFP4"
    calibration_dataset: str = "HuggingFaceH4/ultrachat_200k"
    calibration_split: str = "train_sft"
    num_calibration_samples: int = 1024
    max_sequence_length: int = 2048
    no_calibration: bool = False
    spinquant: bool = False
    ignore: tuple[str, ...] = ("lm_head",)
    overwrite: bool = False
    pipeline: str = "auto"  # llm-compressor calibration pipeline: auto | basic | sequential
    calibration_batch_size: int = 16
    calibration_seed: int = 42  # which samples the shuffled calibration set keeps
    offload: str = "auto"  # where the sequential pipeline keeps activations between layers: auto | cpu | cuda


@dataclass(frozen=True)
class ValidateSettings:
    model: str
    backend: str = "auto"
    expect_scheme: str | None = None
    max_new_tokens: int = 16
    baseline_logprobs: str | None = None
    max_nll_increase: float = 0.1
    gate_texts: int = 16
    baseline_tasks: str | None = None  # task quality gate: a baseline's results/tasks/model=L
    recovery_min: float = 0.95
    engine: EngineOptions = field(default_factory=EngineOptions)


@dataclass(frozen=True)
class ScoreSettings:
    model: str
    label: str
    datasets: str = "wikitext2,ultrachat"
    limits: tuple[tuple[str, int], ...] = (("wikitext2", 200), ("ultrachat", 200))
    tokenizer: str | None = None
    topk: int = 20
    results_dir: str = "results"
    part_size: int = 32
    overwrite: bool = False
    shard: Shard | None = None
    doc_stride: int = 0  # document-level sets: tokens newly scored per rolling window (0: disjoint, as lm-eval)
    backend: str = "auto"
    engine: EngineOptions = field(default_factory=EngineOptions)

    def __post_init__(self):
        if self.topk < 1:
            raise SettingsError("--topk must be at least 1")
        if self.part_size < 1:
            raise SettingsError("--part-size must be at least 1")


@dataclass(frozen=True)
class AggregateSettings:
    results_dir: str = "results"
    baseline: str | None = None
    report_dir: str | None = None
    bootstrap: int = 1000
    seed: int = 0
    recovery_min: float = 0.95  # task accuracy: recovery below which a task fails
    report_tokenizer: str | None = None  # decodes the worst tokens' context (default: the baseline's)
    labels: tuple[str, ...] = ()  # the labels reported (with the baseline); empty: every label in the archive



BENCH_NVFP4_MODES = ("auto", *(m.value for m in Nvfp4Compute))


@dataclass(frozen=True)
class BenchSettings:
    """The bench stage's settings; every default is the CLI option's (none here)."""

    model: str
    label: str
    results_dir: str
    nvfp4_compute: str  # auto (what the GPU serves: native W4A4 on Blackwell, Marlin W4A16 elsewhere) or a mode
    input_len: int  # prompt tokens per request (vLLM's random dataset)
    output_len: int  # tokens decoded per request (--ignore-eos: exactly these)
    loaded_concurrency: int  # requests in flight in the loaded and prefill runs
    num_prompts: int  # requests of the loaded and prefill runs
    num_prompts_b1: int  # requests of the batch-1 run
    timeout: float  # seconds: the server's start, and each benchmark run
    overwrite: bool
    engine: EngineOptions

    def __post_init__(self):
        if self.nvfp4_compute not in BENCH_NVFP4_MODES:
            raise SettingsError(f"--nvfp4-compute must be one of {', '.join(BENCH_NVFP4_MODES)}, "
                                f"not {self.nvfp4_compute!r}")
        for name, low in (("input_len", 1), ("output_len", 2), ("loaded_concurrency", 1), ("num_prompts", 1),
                          ("num_prompts_b1", 1)):  # output 2: an inter-token latency needs two tokens
            if getattr(self, name) < low:
                raise SettingsError(f"--{name.replace('_', '-')} must be at least {low}")
        if self.timeout <= 0:
            raise SettingsError("--timeout must be positive")
        if self.input_len + self.output_len > self.engine.max_model_len:
            raise SettingsError(f"--input-len {self.input_len} + --output-len {self.output_len} do not fit in "
                                f"--max-model-len {self.engine.max_model_len}")
