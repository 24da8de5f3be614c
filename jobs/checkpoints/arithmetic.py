"""Which arithmetic a checkpoint is scored with — pure, decided before any engine is built.

An NVFP4 checkpoint whose config quantizes activations (llm-compressor ``NVFP4``, ModelOpt ``NVFP4``
with ``input_scale``) declares W4A4: FP4 activations in groups of 16 as well as FP4 weights. That is
what Blackwell computes natively. Hopper and the CPU have no FP4 arithmetic, so there the declared
result is emulated (vLLM's ``emulation`` linear backend, compressed-tensors' quantized forward in
transformers) rather than replaced by the weight-only W4A16 that vLLM's Marlin kernel computes:
weight-only is a separate, labelled mode (``--nvfp4-compute weight-only``) for users who deploy it.
"""
from __future__ import annotations

from dataclasses import dataclass

from jobs.checkpoints.checkpoint import Quantization
from jobs.core.settings import Nvfp4Compute

NATIVE_FP4_CAPABILITY = 10.0  # sm_100 (B200) and later have FP4 tensor cores

W4A4_NATIVE = "W4A4 (native)"
W4A4_EMULATED = "W4A4 (emulated)"
W4A16 = "W4A16 (weight-only)"


@dataclass(frozen=True)
class Arithmetic:
    """Resolved once per job, before any engine is built, and handed to the engine that computes it."""

    label: str  # what the report prints beside the model
    mode: Nvfp4Compute | None  # the --nvfp4-compute asked for; None when the checkpoint is not NVFP4
    quantize_activations: bool  # does the forward quantize activations as the config declares?
    vllm_linear_backend: str = "auto"  # vLLM's KernelConfig.linear_backend that computes it
    # the dtype activations are computed in before they are quantized, where qscore chooses it (the
    # transformers backend); None where the engine does (vLLM: the checkpoint's, bfloat16)
    activation_dtype: str | None = None

    @property
    def recorded_mode(self) -> str:
        """The mode as the archive's metadata records it."""
        return self.mode.value if self.mode else "n/a"

    def fingerprint_fields(self) -> dict:
        """What of the arithmetic, beyond the settings, decides an archive's numbers: the activations' dtype
        where qscore chose it (absent elsewhere, so that archives of every other path keep their fingerprint)."""
        return {"activation_dtype": self.activation_dtype} if self.activation_dtype else {}


def resolve(quant: Quantization, mode: Nvfp4Compute | str, *, backend: str,
            capability: float | None = None) -> Arithmetic:
    """The arithmetic of ``quant`` under ``mode`` on ``backend`` (vLLM: on a GPU of ``capability``)."""
    mode = Nvfp4Compute(mode)
    if not quant.is_nvfp4:
        return Arithmetic(quant.scheme, None, bool(quant.activation_bits))
    declares_w4a4 = quant.scheme == "NVFP4"  # NVFP4A16 declares weight-only itself
    if mode is Nvfp4Compute.WEIGHT_ONLY or not declares_w4a4:
        # Marlin is vLLM's weight-only FP4 kernel on every GPU from Ampere on; on Hopper it is also "auto".
        return Arithmetic(W4A16, mode, False, "marlin" if backend == "vllm" else "auto")
    if backend != "vllm":
        return Arithmetic(W4A4_EMULATED, mode, True)
    if capability is not None and capability >= NATIVE_FP4_CAPABILITY:
        return Arithmetic(W4A4_NATIVE, mode, True, "auto")
    return Arithmetic(W4A4_EMULATED, mode, True, "emulation")


def serving_mode(capability: float | None) -> Nvfp4Compute:
    """The NVFP4 mode a deployment on a GPU of ``capability`` serves (the bench stage's ``auto``): W4A4 where FP4
    is native (Blackwell), weight-only W4A16 (Marlin) elsewhere, since emulated W4A4 is no one's deployment;
    without a GPU, what the checkpoint declares."""
    if capability is None or capability >= NATIVE_FP4_CAPABILITY:
        return Nvfp4Compute.DECLARED
    return Nvfp4Compute.WEIGHT_ONLY


def kernel_problem(arith: Arithmetic, kernels: dict[str, int]) -> str | None:
    """Why the kernels vLLM loaded do not compute ``arith`` (None when they do). vLLM picks kernels by
    itself; this refuses a silent fallback (e.g. to weight-only Marlin when W4A4 was asked for)."""
    if arith.mode is None or not kernels:
        return None
    names = " ".join(kernels)
    fp4 = [n for n in kernels if "Fp4" in n or "FP4" in n]
    if not fp4:
        return f"no FP4 kernel was loaded for {arith.label} (got {names})"
    wrong = {W4A16: not all("Marlin" in n for n in fp4), W4A4_EMULATED: not all("Emulation" in n for n in fp4),
             W4A4_NATIVE: any("Marlin" in n or "Emulation" in n for n in fp4)}
    return f"{arith.label} asked for, but the FP4 layers run {fp4}" if wrong.get(arith.label) else None
