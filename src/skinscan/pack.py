"""A small copy of the datasets for a machine that cannot read them (a lent GPU receives only the repository,
64 MiB in all): every image replaced, under the same name, by what training reads of it, the model's input
square (`preprocess.load_pixels`), saved as WebP; every other file (labels, manifests, README) copied as it
is. Readers, splits, groups and sources work on the pack unchanged (`--data-root PACK`); Pillow reads an
image by its content, not its name. The four photos `stamp_augment` cuts its marks from (crop boxes in their own
pixels, `stamps.SOURCE_PHOTOS`) are copied as they are (120 kB), so a run on the pack pastes the same marks.

What a run on the pack sees differs from the originals only by WebP's loss (`quality`); the shorter side the
quality gate reads is the square's, so gate fits belong on the originals. Written with `skinscan pack`.
"""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from .data import IMAGE_SUFFIXES
from .errors import InvalidImage, SkinscanError
from .preprocess import PreprocessSpec, load_pixels
from .stamps import SOURCE_PHOTOS

PACK_INFO = "PACK.json"


def pack_image(path: Path, spec: PreprocessSpec, quality: int) -> bytes:
    """The WebP bytes of the square training reads of `path`."""
    buf = io.BytesIO()
    Image.fromarray(load_pixels(path, spec)).save(buf, "WEBP", quality=quality, method=4)
    return buf.getvalue()


def pack_datasets(
    data_root: Path,
    datasets: Sequence[str],
    out: Path,
    *,
    spec: PreprocessSpec | None = None,
    quality: int = 50,
    max_mb: float | None = None,
    threads: int = 2,
    progress: bool = True,
) -> dict:
    """Write the pack of `datasets` (folders under `data_root`) into `out`; returns what PACK.json records.
    Raises `SkinscanError` if `out` already holds files, or (after writing) if the pack exceeds `max_mb`."""
    from tqdm.auto import tqdm

    spec = spec or PreprocessSpec()
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise SkinscanError(f"{out} is not empty: choose a new folder for the pack")
    files: list[tuple[Path, Path]] = []
    for name in datasets:
        root = Path(data_root) / name
        if not root.is_dir():
            raise SkinscanError(f"dataset {name!r} not found under {data_root} (set --data-root)")
        files += [(p, out / name / p.relative_to(root)) for p in sorted(root.rglob("*")) if p.is_file()]
    if (Path(data_root) / "README.md").is_file():  # what the datasets are and their licences
        files.append((Path(data_root) / "README.md", out / "README.md"))
    kept = {str(Path(data_root) / rel) for rel in SOURCE_PHOTOS}
    images = [(src, dst) for src, dst in files if src.suffix.lower() in IMAGE_SUFFIXES and str(src) not in kept]
    others = [(src, dst) for src, dst in files if src.suffix.lower() not in IMAGE_SUFFIXES or str(src) in kept]
    for src, dst in others:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    unreadable: list[str] = []

    def one(pair: tuple[Path, Path]) -> int:
        src, dst = pair
        try:
            data = pack_image(src, spec, quality)
        except InvalidImage:
            unreadable.append(str(src.relative_to(data_root)))
            return 0
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(data)
        return len(data)

    with ThreadPoolExecutor(max(1, threads)) as pool:
        sizes = list(tqdm(pool.map(one, images), total=len(images), desc="pack", unit="img", disable=not progress))
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    info = {
        "datasets": list(datasets),
        "images": len(images) - len(unreadable),
        "kept_as_is": sorted(str(src.relative_to(data_root)) for src, _ in others if str(src) in kept),
        "unreadable": sorted(unreadable),
        "image_bytes": sum(sizes),
        "bytes": total,
        "size": spec.size,
        "resize": spec.resize,
        "interpolation": spec.interpolation,
        "format": "WEBP",
        "quality": quality,
    }
    (out / PACK_INFO).write_text(json.dumps(info, indent=1) + "\n")
    if max_mb is not None and total > max_mb * 1e6:
        raise SkinscanError(
            f"the pack in {out} holds {total / 1e6:.1f} MB, more than --max-mb {max_mb:g}: lower --quality "
            "or pack fewer datasets"
        )
    return info
