"""Compare the demo run in the containers with the local one (`make test-images`, tests/images/test-images.sh).

    python tests/images/compare.py --local DIR --docker DIR [--results results/demo]

DIR is a project copy in which `make demo` ran (locally, or with DEMO_RUNNER=docker). Every file under
models/ and under the results directory must be in both runs and hold the same thing:

- checkpoints (*.safetensors), tokenizers, configs, summary.csv, the plots: the same bytes;
- Parquet files: the same schema and rows (pyarrow ``Table.equals``) and the same ``qscore`` metadata;
- JSON (summary.json, the checkpoints' provenance, validate's report) and report.md: equal once paths
  are read relative to their run: the containers' mount points as the directories they are
  (``/models/x`` is ``models/x``, ``/data/x`` is ``data/x``, ``/results`` is the results directory), and
  an absolute path inside a run's
  directory (``<DIR>/models/x``, as the local ModelOpt fixture records its source) as ``models/x``,
  and a checkpoint's content hash (jobs.checkpoints.checkpoint, full or cut to 12 digits) as the checkpoint it names
  in its own run: the hash covers the checkpoint's qscore.json, whose provenance (times, host) differs
  between runs while the checkpoints' files are compared one by one; leaving out only the fields listed
  in EXCLUDED.

EXCLUDED names, per kind of file, the fields that differ between two honest runs, and why. A difference
in any other field fails the comparison; an excluded field that differs is still printed, so nothing
is hidden (e.g. Debian's python 3.11.2 in the stand-in image against the venv's 3.11.x).

    python tests/images/compare.py --local DIR --docker DIR --labels bf16,llmc-nvfp4 --vllm-image

compares only what the scoring of those labels wrote (every file under <results>/logprobs/model=<label>/),
as above; --vllm-image: the docker side was scored in the vLLM image, whose torch, transformers and
compressed-tensors are the releases vLLM pins, not the venv's: those versions (EXCLUDED_VLLM_IMAGE) are
left out and printed. The rows must still be the same.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# A path as a container names it: make mounts models/ at /models and data/ at /data (Makefile ctr_path).
CONTAINER_PATH = re.compile(r"(?<![\w./-])/(models|data)(?=/)")
RESULTS_PATH = re.compile(r"(?<![\w./-])/results(?![\w.-])")  # RESULTS_DIR is mounted at /results
HEX = re.compile(r"\b[0-9a-f]{12,64}\b")

FINGERPRINT = ("a hash of the job's inputs as the stage saw them, which include the evaluation set's path (/data/x "
               "in a container) and the checkpoint's content hash (it covers qscore.json); each input is "
               "compared on its own: model.content_hash, tokenizer.hash, dataset.sha256, sampling, runtime, and "
               "the token stream (the rows)")

# kind of file -> fields (dotted paths; "x.*": every field under x) left out of the comparison
EXCLUDED: dict[str, dict[str, str]] = {
    "parquet": {
        "created": "when the part was written",
        "phases.*": "how long each phase of the job took",
        "fingerprint": FINGERPRINT,
        "set_fingerprint": FINGERPRINT,
    },
    "qscore.json": {  # the quantize stage's provenance beside the checkpoint
        "created": "when the checkpoint was written",
        "wall_time_s": "how long quantizing took",
        "phases_s.*": "how long each phase of quantizing took",
        "peak_rss_gib": "memory of the process (the interpreter and libraries differ in size)",
        "host.hostname": "the container's hostname is its id",
        "host.python": "Debian's python3 (3.11.2) in the stand-in base image, the venv's own elsewhere",
    },
    "qscore-tiny.json": {  # build-tiny's manifest
        "build_seconds": "how long training took",
    },
    "qscore_export.json": {  # the ModelOpt fixture's provenance (made by the venv in both runs)
        "created_utc": "when the fixture was written",
        "seconds_quantize": "how long ModelOpt's calibration took",
        "seconds_export": "how long the export took",
    },
}


# the scoring stage's `runtime` provenance (jobs.backends.base.runtime_info, score's package versions)
EXCLUDED_VLLM_IMAGE: dict[str, str] = {
    f"runtime.{key}": f"{what}: vLLM's own pin in the vLLM image, requirements/dev.txt's in the venv"
    for key, what in (("vllm", "the vLLM release (not installed in the venv)"), ("torch", "torch's release"),
                      ("torch_version", "torch's release and build (CUDA in the vLLM image)"),
                      ("transformers", "transformers' release"), ("backend_version", "transformers' release"),
                      ("compressed-tensors", "compressed-tensors' release"))
}


@dataclass
class Result:
    path: str
    status: str  # identical | equal | differs | missing
    detail: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status in ("identical", "equal")


def host_paths(value, root: Path | None = None, hashes: dict[str, str] | None = None, results: str = ""):
    """``value`` with container paths (``/results``: ``results``), and absolute paths under the run's
    directory ``root``, read as relative paths, and content hashes (``hashes``: full hash -> checkpoint)
    as the checkpoint they name, recursively."""
    if isinstance(value, str):
        if root is not None:
            value = value.replace(f"{root.resolve()}/", "")
        if hashes:
            value = HEX.sub(lambda m: next((f"<content hash of {ckpt}>" for h, ckpt in hashes.items()
                                            if h.startswith(m.group(0))), m.group(0)), value)
        if results:
            value = RESULTS_PATH.sub(results, value)
        return CONTAINER_PATH.sub(r"\1", value)
    if isinstance(value, list):
        return [host_paths(v, root, hashes, results) for v in value]
    if isinstance(value, dict):
        return {k: host_paths(v, root, hashes, results) for k, v in value.items()}
    return value


@dataclass
class Run:
    """One run's directory and the content hash of each of its checkpoints."""
    root: Path
    hashes: dict[str, str] = field(default_factory=dict)
    results: str = ""

    @classmethod
    def of(cls, root: Path, results: str = "") -> "Run":
        sys.path.insert(0, str(ROOT))
        from jobs.checkpoints import checkpoint

        hashes = {}
        for config in sorted((root / "models").glob("*/config.json")):
            if not config.parent.name.startswith("."):
                hashes[checkpoint.inspect(config.parent).content_hash] = str(config.parent.relative_to(root))
        return cls(root, hashes, results)

    def norm(self, value):
        return host_paths(value, self.root, self.hashes, self.results)


def flatten(value, prefix: str = "") -> dict[str, object]:
    """{dotted path: leaf value} of nested dicts (lists are leaves)."""
    if isinstance(value, dict) and value:
        out = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: value}


def compare_json(a, b, excluded: dict[str, str], runs=None) -> tuple[list[str], list[str]]:
    """(differences, notes): fields that differ, and excluded fields that differ (reported, not failed)."""
    na, nb = (runs[0].norm, runs[1].norm) if runs else (host_paths, host_paths)
    fa, fb = flatten(na(a)), flatten(nb(b))
    diffs, notes = [], []
    for key in sorted(set(fa) | set(fb)):
        va, vb = fa.get(key, "<absent>"), fb.get(key, "<absent>")
        if same_value(va, vb):
            continue
        if excluded_as(key, excluded):
            notes.append(f"excluded {key}: {_short(va)} (local) vs {_short(vb)} (docker)")
        else:
            diffs.append(f"{key}: {va!r} (local) vs {vb!r} (docker)")
    return diffs, notes


def same_value(a, b) -> bool:
    """Equal, NaN included (a statistic without data is NaN in both runs)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    return a == b


def excluded_as(key: str, excluded: dict[str, str]) -> str | None:
    """The pattern of ``excluded`` that names ``key`` (itself, or ``prefix.*``), else None."""
    if key in excluded:
        return key
    return next((p for p in excluded if p.endswith(".*") and key.startswith(p[:-1])), None)


def _short(value, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 5] + "...'"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def compare_bytes(rel: str, a: Path, b: Path) -> Result:
    ha, hb = sha256(a), sha256(b)
    if ha == hb:
        return Result(rel, "identical", f"sha256 {ha[:16]}")
    return Result(rel, "differs", f"sha256 {ha[:16]} (local) vs {hb[:16]} (docker)")


def compare_json_file(rel: str, a: Path, b: Path, excluded: dict[str, str], runs) -> Result:
    diffs, notes = compare_json(json.loads(a.read_text()), json.loads(b.read_text()), excluded, runs)
    if diffs:
        return Result(rel, "differs", "; ".join(diffs), notes)
    same = a.read_bytes() == b.read_bytes()
    detail = "" if same else "same content once paths and content hashes are read in their run"
    return Result(rel, "identical" if same else "equal", detail + (", but for:" if notes else ""), notes)


def compare_text(rel: str, a: Path, b: Path, runs) -> Result:
    ta, tb = runs[0].norm(a.read_text()), runs[1].norm(b.read_text())
    if a.read_bytes() == b.read_bytes():
        return Result(rel, "identical")
    if ta == tb:
        return Result(rel, "equal", "same text once paths and content hashes are read in their run")
    la, lb = ta.splitlines(), tb.splitlines()
    first = next((i for i, (x, y) in enumerate(zip(la, lb)) if x != y), min(len(la), len(lb)))
    return Result(rel, "differs", f"line {first + 1}: {la[first] if first < len(la) else '<end>'!r} (local) vs "
                                  f"{lb[first] if first < len(lb) else '<end>'!r} (docker)")


W4A4_PATH_NOISE = 0.08


def _w4a4_close(ta, tb, meta_a: dict, meta_b: dict, bound: float) -> str:
    """For rows both runs computed as W4A4: '' unless the actual tokens' logprobs agree within ``bound`` nats per
    token on average (the project's W4A4 path-noise bound) with the same top-1 at 90 % of positions or more."""
    import numpy as np

    arith = {str((m.get("runtime") or {}).get("arithmetic", "")) for m in (meta_a, meta_b)}
    if len(arith) != 1 or not arith.pop().startswith("W4A4") or "logprob" not in ta.column_names:
        return ""
    la, lb = (np.asarray(t["logprob"].to_numpy(zero_copy_only=False), dtype=float) for t in (ta, tb))
    ok = ~(np.isnan(la) | np.isnan(lb))
    mean = float(np.abs(la[ok] - lb[ok]).mean()) if ok.any() else 0.0
    same = float(np.mean(ta["top1_id"].to_numpy(zero_copy_only=False)[ok] == tb["top1_id"].to_numpy(zero_copy_only=False)[ok])) \
        if "top1_id" in ta.column_names and ok.any() else 1.0
    return f"mean |Δ logprob| {mean:.4f}, same top-1 {same:.3f}" if mean <= bound and same >= 0.9 else ""


def compare_parquet(rel: str, a: Path, b: Path, runs, excluded: dict[str, str] | None = None,
                    w4a4_bound: float | None = None) -> Result:
    import pyarrow.parquet as pq

    ta, tb = pq.read_table(a), pq.read_table(b)
    meta_a = json.loads((ta.schema.metadata or {}).get(b"qscore", b"{}"))
    meta_b = json.loads((tb.schema.metadata or {}).get(b"qscore", b"{}"))
    other_a = {k: v for k, v in (ta.schema.metadata or {}).items() if k != b"qscore"}
    other_b = {k: v for k, v in (tb.schema.metadata or {}).items() if k != b"qscore"}
    ta, tb = ta.replace_schema_metadata(None), tb.replace_schema_metadata(None)
    problems, row_notes = [], []
    if not ta.schema.equals(tb.schema, check_metadata=True):
        problems.append(f"schema {ta.schema} (local) vs {tb.schema} (docker)")
    elif ta.num_rows != tb.num_rows:
        problems.append(f"{ta.num_rows} rows (local) vs {tb.num_rows} (docker)")
    elif not ta.equals(tb):  # Arrow's equality has NaN != NaN: look again, NaN equal to NaN
        bad = [c for c in ta.column_names
               if not ta[c].equals(tb[c]) and not same_value(ta[c].to_pylist(), tb[c].to_pylist())]
        close = w4a4_bound is not None and _w4a4_close(ta, tb, meta_a, meta_b, w4a4_bound)
        if bad and close:
            row_notes = [f"rows: W4A4 within its path noise ({close}): FP4 activation rounding moves with the "
                         "stack's torch and compressed-tensors"]
        elif bad:
            problems.append(f"rows differ in {', '.join(bad)}")
    if other_a != other_b:
        problems.append("other schema metadata differs")
    diffs, notes = compare_json(meta_a, meta_b, excluded or EXCLUDED["parquet"], runs)
    notes = row_notes + notes
    problems += [f"metadata {d}" for d in diffs]
    if problems:
        return Result(rel, "differs", "; ".join(problems), notes)
    return Result(rel, "equal", f"{ta.num_rows} rows equal, metadata equal" + (" but for:" if notes else ""), notes)


def _kind(rel: str) -> str:
    name = Path(rel).name
    return "parquet" if name.endswith(".parquet") else name


def compare_file(rel: str, a: Path, b: Path, runs, parquet_excluded: dict[str, str] | None = None,
                 w4a4_bound: float | None = None) -> Result:
    name = a.name
    if name.endswith(".parquet"):
        return compare_parquet(rel, a, b, runs, parquet_excluded, w4a4_bound)
    if name in EXCLUDED:
        return compare_json_file(rel, a, b, EXCLUDED[name], runs)
    if name.endswith(".json") or (name.endswith(".log") and "validate" in name):  # validate's report is JSON
        return compare_json_file(rel, a, b, {}, runs)
    if name.endswith((".md", ".yaml", ".jinja", ".txt")):
        return compare_text(rel, a, b, runs)
    return compare_bytes(rel, a, b)


def files(root: Path, sub: str) -> dict[str, Path]:
    """Relative path -> file, for every file under root/sub, except make's .ok stamps (empty files), the
    stages' lock files (they name the process that held them: another pid and time in every run) and the
    token cache under .cache/ (named by the tokenizers release of the image that filled it; the ids it
    holds are compared as the Parquet parts' token_id column)."""
    base = root / sub
    if not base.is_dir():
        return {}
    return {str(p.relative_to(root)): p for p in sorted(base.rglob("*"))
            if p.is_file() and not p.name.endswith((".ok", ".lock")) and ".cache" not in p.relative_to(base).parts}


def compare_runs(local: Path, docker: Path, results: str, runs: tuple[Run, Run] | None = None,
                 labels: list[str] | None = None, parquet_excluded: dict[str, str] | None = None,
                 w4a4_bound: float | None = None) -> list[Result]:
    """Every file of models/ and the results directory, or with ``labels`` only what scoring them wrote."""
    runs = runs or (Run.of(local, results), Run.of(docker, results))
    subs = [f"{results}/logprobs/model={label}" for label in labels] if labels else ["models", results]
    out = []
    for sub in subs:
        fa, fb = files(local, sub), files(docker, sub)
        for rel in sorted(set(fa) | set(fb)):
            if rel not in fb:
                out.append(Result(rel, "missing", "only in the local run"))
            elif rel not in fa:
                out.append(Result(rel, "missing", "only in the docker run"))
            else:
                out.append(compare_file(rel, fa[rel], fb[rel], runs, parquet_excluded, w4a4_bound))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--local", type=Path, required=True, help="project copy where `make demo` ran locally")
    ap.add_argument("--docker", type=Path, required=True, help="project copy where it ran with DEMO_RUNNER=docker")
    ap.add_argument("--results", default="results/demo", help="the demo's results directory (DEMO_RESULTS_DIR)")
    ap.add_argument("--labels", help="comma-separated labels: compare only what scoring them wrote (their logprobs)")
    ap.add_argument("--vllm-image", action="store_true",
                    help="the docker side was scored in the vLLM image: its package versions are left out (printed)")
    args = ap.parse_args(argv)
    labels = [x for x in (args.labels or "").split(",") if x]
    parquet_excluded = {**EXCLUDED["parquet"], **EXCLUDED_VLLM_IMAGE} if args.vllm_image else EXCLUDED["parquet"]
    runs = (Run.of(args.local, args.results), Run.of(args.docker, args.results))
    for ckpt in sorted(set(runs[0].hashes.values()) | set(runs[1].hashes.values())):
        ha = [h[:12] for h, c in runs[0].hashes.items() if c == ckpt]
        hb = [h[:12] for h, c in runs[1].hashes.items() if c == ckpt]
        print(f"content hash of {ckpt}: {ha[0] if ha else '-'} (local), {hb[0] if hb else '-'} (docker)"
              + ("" if ha == hb else "; it covers qscore.json, whose provenance differs (below)"))
    # the vLLM image computes W4A4 with its own torch and compressed-tensors: another path, whose noise the GPU
    # tests bound at 0.08 nats per token (tests/test_gpu.py); every other arithmetic must be equal row for row
    results = compare_runs(args.local, args.docker, args.results, runs, labels, parquet_excluded,
                           W4A4_PATH_NOISE if args.vllm_image else None)
    if labels:
        empty = [x for x in labels if not any(r.path.startswith(f"{args.results}/logprobs/model={x}/")
                                              and r.path.endswith(".parquet") for r in results)]
        if empty:
            print(f"error: no Parquet file of {', '.join(empty)} under {args.local} and {args.docker}", file=sys.stderr)
            return 1
    elif not any(r.path.endswith(".parquet") for r in results) or not any(r.path.endswith(".safetensors") for r in results):
        print(f"error: no checkpoint or no Parquet file under {args.local} and {args.docker}", file=sys.stderr)
        return 1
    for r in results:
        print(f"{r.status:9s}  {r.path}" + (f"  ({r.detail})" if r.detail else ""))
        for n in r.notes:
            print(f"{'':11s}{n}")
    why = {**EXCLUDED, "parquet": parquet_excluded}
    seen = sorted({(kind, excluded_as(n.split()[1].rstrip(":"), why[kind])) for r in results
                   for n in r.notes if not n.startswith("rows:") for kind in why if _kind(r.path) == kind})
    if seen:
        print("excluded fields that differ, and why two honest runs differ there:")
        for kind, key in seen:
            print(f"  {kind}: {key}: {why[kind][key]}")
    counts = {s: sum(r.status == s for r in results) for s in ("identical", "equal", "differs", "missing")}
    print(f"{len(results)} files: {counts['identical']} identical bytes, {counts['equal']} equal "
          f"(Parquet rows and metadata, or content once paths and content hashes are read in their run), "
          f"{counts['differs']} differ, {counts['missing']} missing")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
