"""A shard set built on another and on reviewers' labels (`prepare --base --labels`).

    base        the base set's images are copied in part by part, as Ray tasks (the driver
                names parts, never rows), keeping their split; a labelled image replaces
                the base row with the same bytes
    labels      the latest label per image (`detector.data.labels`): one with a URI joins
                the objects to read and decode, under source `review`; one with only a
                sha256 relabels the base image with those bytes, in place
    settings    the new set keeps the base's image size, seed, split fractions and
                near-duplicate distance, so every image keeps its split and the new images
                split the same way

The manifest's `reviewed` entry counts what happened to each label.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from detector.config import PrepareConfig
from detector.data import labels as label_data
from detector.data.labels import REVIEW_SOURCE
from detector.data.shards import SHARD_SCHEMA, SPLITS, write_shard
from detector.io import storage
from detector.io.preprocess import PREPROCESS_VERSION

PARTS_PER_BLOCK = 4  # base parts copied per Ray task call


def on_base(config: PrepareConfig, manifest: dict) -> PrepareConfig:
    """`config` with the base set's settings. Raises when the base cannot be built on
    (older preprocessing, no generator columns, the same URI as --out) or when a flag
    asks for a setting other than the base's."""
    if storage.join(config.base, "") == storage.join(config.out, ""):
        raise ValueError("--out must differ from --base: the base set stays as it is")
    if manifest.get("preprocess_version") != PREPROCESS_VERSION:
        raise ValueError(
            f"--base {config.base} was decoded by preprocess version "
            f"{manifest.get('preprocess_version')}, this version decodes with "
            f"{PREPROCESS_VERSION}: prepare the base again first")
    if manifest.get("format_version", 1) < 2:
        raise ValueError(f"--base {config.base} predates named sources (format 1): prepare "
                         "it again first")
    near = (manifest.get("near_duplicates") or {}).get("distance")
    base = {"image_size": manifest["image_size"], "seed": manifest["seed"],
            "split": tuple(manifest["split_fractions"]),
            "near_duplicates": -1 if near is None else near}
    defaults = {f.name: f.default for f in dataclasses.fields(PrepareConfig)}
    for name, value in base.items():
        given = getattr(config, name)
        if given not in (value, defaults[name]):
            flag = "--" + name.replace("_", "-")
            raise ValueError(
                f"{flag} {given} differs from the base's {value}: a set built on --base "
                "keeps its image size, seed, split and near-duplicate distance, so no "
                "image changes split")
    return dataclasses.replace(config, **base)


@dataclass(frozen=True)
class Labelled:
    """What the labels dataset adds: images to read, and base images to relabel."""

    items: list[dict]  # prepare's listed rows: uri, label, source_name, generator, size_bytes
    relabels: dict[str, tuple[int, str | None]]  # sha256 -> (label, generator)
    stats: dict  # labels, images, conflicting (detector.data.labels.latest)


def labelled_images(labels_uri: str) -> Labelled:
    """The latest label of every image in the labels dataset at `labels_uri`."""
    table, stats = label_data.latest(labels_uri)
    items, relabels = [], {}
    for row in table.to_pylist():
        label = int(row["label"] == "ai-generated")
        generator = row["generator"] if label else None
        if row["uri"]:
            items.append({"uri": row["uri"], "label": label, "source_name": REVIEW_SOURCE,
                          "generator": generator, "size_bytes": None})
        else:
            relabels[row["sha256"]] = (label, generator)
    return Labelled(items, relabels, stats)


def copy_base_parts(base_uri: str, manifest: dict, out_uri: str, run_id: str,
                    replaced: set[str], relabels: dict[str, tuple[int, str | None]]):
    """A Ray dataset of the summary rows of the base's images copied into `out_uri`,
    less those whose sha256 is in `replaced`, with `relabels` applied."""
    import ray

    names = [name for split in SPLITS for name in manifest["parts"][split]]
    if not names:
        return None
    blocks = max(1, min(len(names) // PARTS_PER_BLOCK, 1000))
    return ray.data.from_items([{"part": name} for name in names],
                               override_num_blocks=blocks).map_batches(
        copy_parts, batch_size=PARTS_PER_BLOCK, batch_format="pyarrow",
        fn_kwargs={"base_uri": base_uri, "out_uri": out_uri, "run_id": run_id,
                   "replaced": replaced, "relabels": relabels})


def copy_parts(batch: pa.Table, base_uri: str, out_uri: str, run_id: str,
               replaced: set[str], relabels: dict[str, tuple[int, str | None]]) -> pa.Table:
    """Ray Data stage: copy each named base part into `out_uri` (same split), and pass on
    a summary row per image copied, as prepare's write stage does."""
    summaries = []
    dropped = pa.array(list(replaced), pa.string()) if replaced else None  # once per call
    for name in batch.column("part").to_pylist():
        fs, path = storage.resolve(storage.join(base_uri, name))
        table = conform(pq.read_table(path, filesystem=fs))
        if dropped is not None:
            table = table.filter(pc.invert(pc.is_in(table["sha256"], dropped)))
        table = relabel(table, relabels)
        if not table.num_rows:
            continue
        split = name.split("/", 1)[0]
        part = write_shard(out_uri, split, run_id, table)
        rows = table.num_rows
        summaries.append(table.drop_columns(["image"]).append_column(
            "split", pa.array([split] * rows, pa.string())).append_column(
            "error", pa.nulls(rows, pa.string())).append_column(
            "error_detail", pa.nulls(rows, pa.string())).append_column(
            "part", pa.array([part] * rows, pa.string())))
    if not summaries:
        return SUMMARY_SCHEMA.empty_table()
    return pa.concat_tables(summaries)


SUMMARY_SCHEMA = pa.schema([f for f in SHARD_SCHEMA if f.name != "image"] + [
    pa.field("split", pa.string()), pa.field("error", pa.string()),
    pa.field("error_detail", pa.string()), pa.field("part", pa.string())])


def conform(table: pa.Table) -> pa.Table:
    """A base part in today's shard schema: columns added since its format are null."""
    for field in SHARD_SCHEMA:
        if field.name not in table.column_names:
            table = table.append_column(field, pa.nulls(table.num_rows, field.type))
    return table.select(SHARD_SCHEMA.names).cast(SHARD_SCHEMA)


def relabel(table: pa.Table, relabels: dict[str, tuple[int, str | None]]) -> pa.Table:
    """Apply labels given by sha256 alone: the image's label and generator become the
    reviewer's, and its source `review`."""
    shas = table.column("sha256").to_pylist()
    hits = [i for i, sha in enumerate(shas) if sha in relabels]
    if not hits:
        return table
    columns = {name: table.column(name).to_pylist()
               for name in ("label", "generator", "source_name")}
    for i in hits:
        label, generator = relabels[shas[i]]
        columns["label"][i], columns["generator"][i] = label, generator
        columns["source_name"][i] = REVIEW_SOURCE
    for name, values in columns.items():
        index = table.schema.get_field_index(name)
        table = table.set_column(index, table.schema.field(name),
                                 pa.array(values, table.schema.field(name).type))
    return table
