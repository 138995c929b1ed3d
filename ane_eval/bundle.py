"""Model directory discovery: which files are the embeddings, the FFN chunks and the LM head, and what meta.yaml says.

Model directories are untrusted input: only files inside the directory are read, YAML is parsed safely, and
every problem found is reported in one readable error.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

CHUNK = re.compile(r"^(?P<stem>.+)_chunk_(?P<i>\d{2})of(?P<n>\d{2})\.(?P<ext>mlpackage|mlmodelc)$")
EXTENSIONS = {"mil": ("mlpackage",), "coreml": ("mlmodelc", "mlpackage")}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class BundleError(ValueError):
    """The directory is not a usable ANEMLL model; the message lists every problem found."""


@dataclass
class Bundle:
    root: Path
    embeddings: Path
    chunks: list[Path]
    lm_head: Path
    tokenizer_dir: Path
    meta: dict = field(default_factory=dict)  # meta.yaml's model_info.parameters ({} without meta.yaml)
    name: str = ""
    architecture: str = "llama"
    rotate_chunks: list = field(default_factory=list)  # split-rotate companions `..._chunk_NNofMM_rot` (0.3.5)

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
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise BundleError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    info = doc.get("model_info", {}) if isinstance(doc, dict) else {}
    params = info.get("parameters", {}) if isinstance(info, dict) else {}
    if not isinstance(params, dict):
        raise BundleError(f"{path}: model_info.parameters must be a mapping")
    return info, params


def _inside(root: Path, name: str) -> Path | None:
    p = (root / name).resolve()
    return p if root.resolve() in p.parents else None


def _find_part(root: Path, declared: str | None, pattern: str, exts: tuple, what: str, problems: list) -> Path | None:
    """A part by its meta.yaml name (any extension: names say .mlmodelc where only .mlpackage exists), else by
    file pattern; the first extension in `exts` wins."""
    candidates = []
    if declared:
        stem = re.sub(r"\.(mlmodelc|mlpackage)$", "", Path(declared).name)
        candidates = [root / f"{stem}.{ext}" for ext in exts if (root / f"{stem}.{ext}").exists()]
    if not candidates:
        for ext in exts:
            found = sorted(p for p in root.glob(f"{pattern}.{ext}") if "_chunk_" not in p.name)
            if len(found) > 1:
                problems.append(f"several {what} files ({', '.join(p.name for p in found)}); keep one")
                return None
            if found:
                candidates = found
                break
    if not candidates:
        others = [p.name for p in root.glob(f"{pattern}.*")]
        hint = f" (found {', '.join(others)}, which this backend cannot load)" if others else ""
        problems.append(f"no {what} part ({pattern}.{'|'.join(exts)}){hint}")
        return None
    return candidates[0]


def _find_chunks(root: Path, ffn: str | None, exts: tuple, problems: list) -> list[Path]:
    stem = re.sub(r"\.(mlmodelc|mlpackage)$", "", Path(ffn).name) if ffn else None
    for ext in exts:
        found = [(m, p) for p in root.iterdir() if (m := CHUNK.match(p.name)) and m["ext"] == ext]
        if stem and any(m["stem"] == stem for m, _ in found):
            found = [(m, p) for m, p in found if m["stem"] == stem]
        if not found:
            continue
        totals = {int(m["n"]) for m, _ in found}
        if len(totals) > 1:
            problems.append(f"FFN chunks disagree on the chunk count: {', '.join(sorted(p.name for _, p in found))}")
            return []
        n = totals.pop()
        by_index: dict[int, list[Path]] = {}
        for m, p in found:
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
    problems.append(f"no FFN chunks (*_FFN_PF*_chunk_NNofMM.{'|'.join(exts)})")
    return []


def _find_rotate_chunks(chunks: list[Path], meta: dict, problems: list) -> list[Path]:
    """With split_rotate (0.3.5 combine_chunks_split_rotate) each chunk `X_chunk_NNofMM` has a companion
    `X_chunk_NNofMM_rot` holding infer_rotate / prefill_rotate; all or none must be present."""
    companions = [p.with_name(f"{p.name[:-len(p.suffix)]}_rot{p.suffix}") for p in chunks]
    present = [p for p in companions if p.exists()]
    if not present and not meta.get("split_rotate"):
        return []
    missing = [p.name for p in companions if not p.exists()]
    if missing:
        problems.append(f"split-rotate chunk file(s) {', '.join(missing)} missing (meta.yaml split_rotate or other "
                        "_rot files say each chunk has one)")
        return []
    return companions


def discover(model_dir, backend: str = "mil") -> Bundle:
    """Find the parts of an ANEMLL model directory for `backend` ("mil" reads .mlpackage, "coreml" prefers
    .mlmodelc)."""
    root = Path(model_dir)
    if not root.exists():
        raise BundleError(f"{root}: no such directory; pass the directory that holds meta.yaml and the .mlpackage "
                          "or .mlmodelc parts")
    if not root.is_dir():
        raise BundleError(f"{root}: is a file, not a model directory; pass the directory that holds meta.yaml and "
                          "the model parts")
    exts = EXTENSIONS[backend]
    info, meta = _read_meta(root)
    if not any(root.iterdir()):
        raise BundleError(f"{root}: the directory is empty; expected meta.yaml, *_embeddings, *_FFN_PF*_chunk_*, "
                          "*_lm_head parts and tokenizer files")
    problems: list[str] = []
    embeddings = _find_part(root, meta.get("embeddings"), "*_embeddings*", exts, "embeddings", problems)
    lm_head = _find_part(root, meta.get("lm_head"), "*_lm_head*", exts, "lm_head", problems)
    chunks = _find_chunks(root, meta.get("ffn"), exts, problems)
    rotate_chunks = _find_rotate_chunks(chunks, meta, problems)
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
                  meta=meta, rotate_chunks=rotate_chunks, name=str(info.get("name") or root.name),
                  architecture=str(info.get("architecture") or meta.get("model_prefix") or "llama"))


def load_tokenizer(bundle: Bundle):
    """The model's own tokenizer: local files only, no remote code, no hub fallback."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(bundle.tokenizer_dir), local_files_only=True,
                                             trust_remote_code=False, use_fast=True)
    except Exception as e:  # transformers raises OSError/ValueError/KeyError variants
        raise BundleError(f"{bundle.tokenizer_dir}: cannot load the tokenizer ({e.__class__.__name__}: "
                          f"{str(e).splitlines()[0]})") from None


def fingerprint(bundle: Bundle) -> str:
    """A stable identity of the model files: program specs and metadata in full, weight files by size and sampled
    content (first, middle and last MiB), so multi-GB models fingerprint in well under a second."""
    import hashlib

    h = hashlib.sha256()
    sample = 1 << 20
    for part in [bundle.embeddings, *bundle.chunks, *bundle.rotate_chunks, bundle.lm_head]:
        files = sorted(f for f in part.rglob("*") if f.is_file()) if part.is_dir() else [part]
        for f in files:
            size = f.stat().st_size
            h.update(f"{f.relative_to(part.parent)}:{size}".encode())
            with open(f, "rb") as fh:
                if size <= 3 * sample:
                    h.update(fh.read())
                else:
                    for offset in (0, size // 2, size - sample):
                        fh.seek(offset)
                        h.update(fh.read(sample))
    return h.hexdigest()


def model_info(bundle: Bundle) -> dict:
    return {"name": bundle.name, "path": str(bundle.root), "fingerprint": fingerprint(bundle)}
