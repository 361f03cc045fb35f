"""Test helper: an lm-eval task from lm-eval's own YAML, reading local files instead of the hub."""

from __future__ import annotations

from pathlib import Path

import yaml


def write_local_task(tmp: Path, yaml_rel: str, name: str, data_files: dict[str, str], **overrides) -> Path:
    """Write ``<tmp>/<name>/<name>.yaml``, which ``include``s lm-eval's ``tasks/<yaml_rel>`` with
    ``dataset_path: json`` on ``data_files``; returns the folder (an lm-eval ``include_path``)."""
    import lm_eval

    folder = tmp / name
    folder.mkdir()
    config = {
        "include": str(Path(lm_eval.__file__).parent / "tasks" / yaml_rel),
        "task": name,
        "tag": [],
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": data_files, "cache_dir": str(tmp / "hf_cache")},
        **overrides,
    }
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(config))
    return folder
