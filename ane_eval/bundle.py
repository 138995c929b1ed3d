"""Model directory discovery: which files are the embeddings, the FFN chunks and the LM head, and what meta.yaml says.

Model directories are untrusted input: only files inside the directory are read, YAML is parsed safely, and
every problem found is reported in one readable error.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from .meta import Layout, MetaError, parse

CHUNK = re.compile(r"^(?P<stem>.+)_chunk_(?P<i>\d{2})of(?P<n>\d{2})\.(?P<ext>mlpackage|mlmodelc)$")
# the first extension a backend finds wins: the portable runtime prefers the package (the compiler's source; a
# compiled copy beside it may be stale), CoreML the compiled copy (no compilation at load)
EXTENSIONS = {"mil": ("mlpackage", "mlmodelc"), "coreml": ("mlmodelc", "mlpackage")}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _visible(paths) -> list[Path]:
    """Without AppleDouble files: macOS writes `._<name>` beside every file it copies to exFAT/FAT/SMB volumes
    (resource forks and extended attributes); they match the part patterns but are not models."""
    return [p for p in paths if not p.name.startswith("._")]


class BundleError(ValueError):
    """The directory is not a usable ANEMLL model; the message lists every problem found."""


@dataclass
class Bundle:
    root: Path
    embeddings: Path | None  # None for a monolithic model
    chunks: list[Path]
    lm_head: Path | None
    tokenizer_dir: Path
    meta: dict = field(default_factory=dict)  # meta.yaml's model_info.parameters ({} without meta.yaml)
    name: str = ""
    architecture: str = "llama"
    layout: Layout = field(default_factory=Layout)  # the parsed 0.3.4/0.3.5 keys (meta.py)
    monolithic: Path | None = None  # the one file of a monolithic model (embeddings + layers + LM head)
    rotate_chunks: list = field(default_factory=list)  # split-rotate companions `..._chunk_NNofMM_rot` (0.3.5)

    @property
    def files(self) -> list[Path]:
        """The model's program files in pipeline order (a chunk's split-rotate companion right after it)."""
        if self.monolithic is not None:
            return [self.monolithic]
        rot = self.rotate_chunks or [None] * len(self.chunks)
        return [self.embeddings, *(p for pair in zip(self.chunks, rot) for p in pair if p is not None), self.lm_head]

    @property
    def split_lm_head(self) -> int | None:
        """meta.yaml's split; files older than the key used 8; None without meta.yaml (trust the program)."""
        return self.meta_int("split_lm_head") or (8 if self.meta else None)

    def meta_int(self, key: str) -> int | None:
        v = self.meta.get(key)
        try:
            return int(v) if v is not None else None
        except (TypeError, ValueError):
            return None


def _read_meta(root: Path) -> tuple[dict, dict]:
    import yaml

    path = root / "meta.yaml"
    if not path.is_file():
        return {}, {}
    try:
        doc = yaml.safe_load(path.read_bytes().decode("utf-8")) or {}
    except UnicodeDecodeError as e:
        raise BundleError(f"{path}: not UTF-8 text (byte {e.start}); fix or re-create meta.yaml") from None
    except (yaml.YAMLError, RecursionError) as e:
        raise BundleError(f"{path}: not valid YAML ({(str(e).splitlines() or [type(e).__name__])[0]})") from None
    info = doc.get("model_info", {}) if isinstance(doc, dict) else {}
    params = info.get("parameters", {}) if isinstance(info, dict) else {}
    if not isinstance(params, dict) or not isinstance(info, dict):
        raise BundleError(f"{path}: model_info and model_info.parameters must be mappings")
    for key in ("embeddings", "lm_head", "ffn", "tokenizer_path", "model_prefix"):
        if params.get(key) is not None and (not isinstance(params[key], str) or "\0" in params[key]):
            raise BundleError(f"{path}: model_info.parameters.{key} must be a file name, found {params[key]!r:.60}")
    for key in ("context_length", "batch_size", "num_chunks", "split_lm_head"):
        v = params.get(key)
        whole = isinstance(v, int) and not isinstance(v, bool) or isinstance(v, str) and v.isdigit()
        if v is not None and not whole:
            raise BundleError(f"{path}: model_info.parameters.{key} must be a whole number, found {v!r:.60}")
    return info, params


def _stem(name: str | None) -> str | None:
    return re.sub(r"\.(mlmodelc|mlpackage)$", "", Path(name).name) if name else None


def _inside(root: Path, name: str) -> Path | None:
    p = (root / name).resolve()
    return p if root.resolve() in p.parents else None


def _find_part(root: Path, declared: str | None, pattern: str, exts: tuple, what: str, problems: list) -> Path | None:
    """A part by its meta.yaml name (any extension: names say .mlmodelc where only .mlpackage exists), else by
    file pattern; the first extension in `exts` wins."""
    candidates = []
    if declared:
        stem = _stem(declared)
        candidates = [root / f"{stem}.{ext}" for ext in exts if (root / f"{stem}.{ext}").exists()]
    if not candidates:
        for ext in exts:
            found = sorted(p for p in _visible(root.glob(f"{pattern}.{ext}")) if "_chunk_" not in p.name)
            if len(found) > 1:
                problems.append(f"several {what} files ({', '.join(p.name for p in found)}); keep one")
                return None
            if found:
                candidates = found
                break
    if not candidates:
        others = [p.name for p in _visible(root.glob(f"{pattern}.*"))]
        hint = f" (found {', '.join(others)}, which this backend cannot load)" if others else ""
        problems.append(f"no {what} part ({pattern}.{' or .'.join(exts)}){hint}")
        return None
    return candidates[0]


def _find_chunks(root: Path, ffn: str | None, exts: tuple, problems: list) -> list[Path]:
    """The chunks in order; each chunk in the first of `exts` it exists in (a directory may mix the forms)."""
    stem = _stem(ffn)
    if stem and (m := CHUNK.match(f"{stem}.mlpackage")):
        stem = m["stem"]  # 0.3.5 names the first chunk (`..._chunk_01of02`); 0.3.4 leaves the suffix off
    found = [(m, p) for p in _visible(root.iterdir()) if (m := CHUNK.match(p.name)) and m["ext"] in exts]
    if stem and any(m["stem"] == stem for m, _ in found):
        found = [(m, p) for m, p in found if m["stem"] == stem]
    if not found:
        problems.append(f"no FFN chunks (*_FFN_PF*_chunk_NNofMM.{' or .'.join(exts)})")
        return []
    totals = {int(m["n"]) for m, _ in found}
    if len(totals) > 1:
        problems.append(f"FFN chunks disagree on the chunk count: {', '.join(sorted(p.name for _, p in found))}")
        return []
    n = totals.pop()
    by_index: dict[int, list[Path]] = {}
    for ext in exts:  # the preferred form of a chunk hides its other forms
        for m, p in found:
            if m["ext"] == ext and by_index.get(int(m["i"]), [p])[0].suffix == p.suffix:
                by_index.setdefault(int(m["i"]), []).append(p)
    dupes = {i: ps for i, ps in by_index.items() if len(ps) > 1}
    missing = [i for i in range(1, n + 1) if i not in by_index]
    extra = [i for i in by_index if not 1 <= i <= n]
    if dupes:
        problems.append("duplicate FFN chunk(s): " + "; ".join(
            f"{i:02d} is {' and '.join(sorted(p.name for p in ps))}" for i, ps in sorted(dupes.items())))
    if missing:
        problems.append(f"missing FFN chunk(s) {', '.join(f'{i:02d}of{n:02d}' for i in missing)}")
    if extra:
        problems.append(f"FFN chunk number(s) {extra} outside 1..{n}")
    if dupes or missing or extra:
        return []
    return [by_index[i][0] for i in range(1, n + 1)]


def _find_rotate_chunks(chunks: list[Path], split_rotate: bool, problems: list) -> list[Path]:
    """With split_rotate (0.3.5 combine_chunks_split_rotate) each chunk `X_chunk_NNofMM` has a companion
    `X_chunk_NNofMM_rot` holding infer_rotate / prefill_rotate; all or none must be present."""
    companions = [p.with_name(f"{p.name[:-len(p.suffix)]}_rot{p.suffix}") for p in chunks]
    present = [p for p in companions if p.exists()]
    if not present and not split_rotate:
        return []
    missing = [p.name for p in companions if not p.exists()]
    if missing:
        problems.append(f"split-rotate chunk file(s) {', '.join(missing)} missing (meta.yaml split_rotate or other "
                        "_rot files say each chunk has one)")
        return []
    return companions


def discover(model_dir, backend: str = "mil") -> Bundle:
    """Find the parts of an ANEMLL model directory for `backend` (both read .mlpackage and .mlmodelc parts, in a
    mixed directory too; "mil" prefers .mlpackage, "coreml" .mlmodelc)."""
    root = Path(model_dir)
    if not root.exists():
        raise BundleError(f"{root}: no such directory; pass the directory that holds meta.yaml and the .mlpackage "
                          "or .mlmodelc parts")
    if not root.is_dir():
        raise BundleError(f"{root}: is a file, not a model directory; pass the directory that holds meta.yaml and "
                          "the model parts")
    exts = EXTENSIONS[backend]
    info, meta = _read_meta(root)
    try:
        layout = parse(root / "meta.yaml", info, meta)
    except MetaError as e:
        raise BundleError(str(e)) from None
    if not any(root.iterdir()):
        raise BundleError(f"{root}: the directory is empty; expected meta.yaml, *_embeddings, *_FFN_PF*_chunk_*, "
                          "*_lm_head parts and tokenizer files")
    problems: list[str] = []
    embeddings = lm_head = monolithic = None
    chunks: list[Path] = []
    rotate_chunks: list[Path] = []
    # without meta.yaml, a lone `*_monolithic_full*` file is a monolithic model (combine_models.combine_monolithic)
    guessed = not meta and any(root.glob("*_monolithic_full*")) and not any(root.glob("*_FFN_PF*"))
    if layout.monolithic or guessed:
        monolithic = _find_part(root, layout.monolithic_model, "*_monolithic_full*", exts, "monolithic", problems)
    else:
        embeddings = _find_part(root, meta.get("embeddings"), "*_embeddings*", exts, "embeddings", problems)
        lm_head = _find_part(root, meta.get("lm_head"), "*_lm_head*", exts, "lm_head", problems)
        chunks = _find_chunks(root, meta.get("ffn"), exts, problems)
        rotate_chunks = _find_rotate_chunks(chunks, layout.split_rotate, problems)
    if meta.get("num_chunks") is not None and chunks and int(meta["num_chunks"]) != len(chunks):
        problems.append(f"meta.yaml num_chunks is {meta['num_chunks']} but the directory has {len(chunks)} chunks")
    tokenizer_dir = root
    if meta.get("tokenizer_path"):
        inside = _inside(root, str(meta["tokenizer_path"]))
        if inside is None or not inside.is_dir():
            problems.append(f"meta.yaml tokenizer_path {meta['tokenizer_path']!r} is not a directory inside the model "
                            "directory; copy the tokenizer files into the model directory")
        else:
            tokenizer_dir = inside
    if not any((tokenizer_dir / f).is_file() for f in TOKENIZER_FILES):
        problems.append(f"no tokenizer in {tokenizer_dir} (expected tokenizer.json or tokenizer.model with "
                        "tokenizer_config.json); copy the original model's tokenizer files here — ane-eval never "
                        "downloads a substitute")
    if problems:
        raise BundleError(f"{root}: not a usable ANEMLL model directory: " + "; ".join(problems))
    return Bundle(root=root, embeddings=embeddings, chunks=chunks, lm_head=lm_head, tokenizer_dir=tokenizer_dir,
                  meta=meta, name=str(info.get("name") or root.name),
                  architecture=str(info.get("architecture") or meta.get("model_prefix") or "llama"),
                  layout=layout, monolithic=monolithic, rotate_chunks=rotate_chunks)


def load_tokenizer(bundle: Bundle):
    """The model's own tokenizer: local files only, no remote code, no hub fallback."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(bundle.tokenizer_dir), local_files_only=True,
                                             trust_remote_code=False, use_fast=True)
    except Exception as e:  # transformers raises OSError/ValueError/KeyError variants
        raise BundleError(f"{bundle.tokenizer_dir}: cannot load the tokenizer ({e.__class__.__name__}: "
                          f"{str(e).splitlines()[0]})") from None


def _weight_files(part: Path) -> list[tuple[str, Path]]:
    """(name inside the weights folder, file) of a part: `Data/com.apple.CoreML/weights/` in a package, `weights/`
    in a compiled model; the same blob files either way."""
    files = sorted(f for f in _visible(part.rglob("*")) if f.is_file() and f.parent.name == "weights")
    return [(f.name, f) for f in files]


def fingerprint(bundle: Bundle) -> str:
    """The model's identity, not its container's: the weight blobs each part computes with, by role, so the
    `.mlpackage` a conversion wrote and its compiled `.mlmodelc` copy fingerprint the same (a baseline made on
    Linux gates the Mac). Files by size and sampled content (first, middle and last MiB): multi-GB models
    fingerprint in well under a second. Parts without weight files (none known) count by their whole content."""
    import hashlib

    h = hashlib.sha256()
    sample = 1 << 20
    rot = [(f"chunk{i:02d}_rot", p) for i, p in enumerate(bundle.rotate_chunks, 1)]
    roles = [("monolithic", bundle.monolithic)] if bundle.monolithic is not None else [
        ("embeddings", bundle.embeddings), *((f"chunk{i:02d}", p) for i, p in enumerate(bundle.chunks, 1)),
        *rot, ("lm_head", bundle.lm_head)]
    for role, part in roles:
        files = _weight_files(part) if part.is_dir() else []
        if not files:
            files = [(str(f.relative_to(part)), f) for f in sorted(_visible(part.rglob("*"))) if f.is_file()] \
                if part.is_dir() else [(part.name, part)]
        for name, f in files:
            size = f.stat().st_size
            h.update(f"{role}/{name}:{size}".encode())
            with open(f, "rb") as fh:
                if size <= 3 * sample:
                    h.update(fh.read())
                else:
                    for offset in (0, size // 2, size - sample):
                        fh.seek(offset)
                        h.update(fh.read(sample))
    return h.hexdigest()


def file_set(bundle: Bundle) -> str:
    """Which files ran: "mlpackage", "mlmodelc" or "mixed" (CoreML prefers a compiled copy beside a package)."""
    kinds = {p.suffix.lstrip(".") for p in bundle.files}
    return kinds.pop() if len(kinds) == 1 else "mixed"


def model_info(bundle: Bundle) -> dict:
    return {"name": bundle.name, "path": str(bundle.root), "fingerprint": fingerprint(bundle),
            "files": file_set(bundle)}
