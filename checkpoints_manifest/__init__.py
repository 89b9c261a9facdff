"""checkpoints_manifest: a small, dependency-free manifest for a training run's checkpoints.

``RUN_DIR/manifest.json`` records which file holds which epoch/step, its
sha256, training-time metrics, how to rebuild the model and what it was
trained on, so that tools such as dtprobe can chart how representations change
over training (the discriminability-transferability trade-off of Kornblith et
al. 2021 and Cui et al. 2022). See ``checkpoints_manifest/README.md`` for the
format and a training-loop example.

Example
-------
>>> import checkpoints_manifest as cm
>>> m = cm.create_manifest(run_name="demo", model=cm.ModelSpec("resnet18", 10, penultimate="fc"),
...                        dataset=cm.DatasetSpec("cifar10"), training={"lr": 0.1}, seed=0)
>>> m.checkpoints
[]
"""

from checkpoints_manifest.schema import (
    FORMAT,
    MANIFEST_NAME,
    VERSION,
    CheckpointEntry,
    DatasetSpec,
    Manifest,
    ManifestError,
    ModelSpec,
    create_manifest,
    utc_now_iso,
)
from checkpoints_manifest.storage import (
    LOCK_NAME,
    TEMP_SUFFIX,
    append_checkpoint,
    atomic_write_bytes,
    atomic_write_text,
    atomic_writer,
    entry_for_file,
    is_own_temp_name,
    is_temp_name,
    manifest_lock,
    manifest_path,
    parse_manifest,
    read_manifest,
    read_regular_file,
    record_checkpoint,
    remove_stale_temp_files,
    remove_temp_files,
    sha256_file,
    update_manifest,
    write_manifest,
)

__version__ = "1.0.0"

__all__ = [
    "FORMAT",
    "LOCK_NAME",
    "MANIFEST_NAME",
    "TEMP_SUFFIX",
    "VERSION",
    "CheckpointEntry",
    "DatasetSpec",
    "Manifest",
    "ManifestError",
    "ModelSpec",
    "append_checkpoint",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_writer",
    "create_manifest",
    "entry_for_file",
    "is_own_temp_name",
    "is_temp_name",
    "manifest_lock",
    "manifest_path",
    "parse_manifest",
    "read_manifest",
    "read_regular_file",
    "record_checkpoint",
    "remove_stale_temp_files",
    "remove_temp_files",
    "sha256_file",
    "update_manifest",
    "utc_now_iso",
    "write_manifest",
]
