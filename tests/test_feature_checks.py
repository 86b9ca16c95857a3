"""The up-front feature check remembers the files that passed (wavflow/train/feature_checks.py):
a restart reads only what changed, and never trusts a file that changed or failed."""

from __future__ import annotations

import json
import os

import pytest
import torch

import wavflow.train.feature_checks as checks
from tests.test_train_common import SHAPES, make_config, make_dataset
from wavflow.distributed import DistInfo
from wavflow.errors import ManifestError
from wavflow.train.epoch_data import prepare_rows
from wavflow.train.trainer import Trainer

ONE_PROCESS = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None)


@pytest.fixture
def reads(monkeypatch):
    """The feature files the check opens, in order."""
    seen: list[str] = []
    real = checks.load_features

    def counting(row, shapes):
        seen.append(row.features_path.name)
        return real(row, shapes)

    monkeypatch.setattr(checks, "load_features", counting)
    return seen


def _rewrite(path, tensor_key="text_features", shape=(SHAPES["text_seq_len"], SHAPES["text_dim"]), value=None):
    feats = torch.load(path, weights_only=True)
    feats[tensor_key] = torch.full(shape, 0.5) if value is None else value
    torch.save(feats, path)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))  # a later mtime even on coarse clocks


def test_a_restart_reads_only_the_feature_files_that_changed(tmp_path, reads):
    csv = make_dataset(tmp_path, modes=("vt2a", "t2a", "v2a", "vt2a"))
    data = make_config(tmp_path, csv).data
    record = tmp_path / "run" / checks.CHECKS_NAME
    record.parent.mkdir()
    assert len(prepare_rows(data, ONE_PROCESS, record)) == 4 and len(reads) == 4
    saved = json.loads(record.read_text())
    assert len(saved["files"]) == 4 and saved["shapes"][2] == [SHAPES["text_seq_len"], SHAPES["text_dim"]]

    reads.clear()
    assert len(prepare_rows(data, ONE_PROCESS, record)) == 4 and reads == []  # nothing changed: nothing read

    _rewrite(tmp_path / "features" / "t2a_1.pth")  # still valid, but changed
    assert len(prepare_rows(data, ONE_PROCESS, record)) == 4 and reads == ["t2a_1.pth"]

    reads.clear()  # a passed file made bad (non-finite) is caught: its stamp changed
    _rewrite(tmp_path / "features" / "vt2a_0.pth", value=torch.full((SHAPES["text_seq_len"], SHAPES["text_dim"]), float("nan")))
    with pytest.raises(ManifestError, match="non-finite"):
        prepare_rows(make_config(tmp_path, csv, data__on_bad_row="error").data, ONE_PROCESS, record)
    assert reads == ["vt2a_0.pth"]
    reads.clear()  # ... and failed files are never remembered: read (and skipped) again at every start
    lenient = make_config(tmp_path, csv, data__max_failed_fraction=0.5).data
    for _ in range(2):
        assert len(prepare_rows(lenient, ONE_PROCESS, record)) == 3
    assert reads == ["vt2a_0.pth", "vt2a_0.pth"]


def test_other_shapes_or_flags_or_no_record_read_every_file(tmp_path, reads):
    csv = make_dataset(tmp_path, modes=("vt2a", "t2a", "v2a"))
    record = tmp_path / checks.CHECKS_NAME
    prepare_rows(make_config(tmp_path, csv).data, ONE_PROCESS, record)
    reads.clear()
    with pytest.raises(ManifestError):  # other expected shapes: the record does not hold, every file is read
        prepare_rows(make_config(tmp_path, csv, data__text_dim=SHAPES["text_dim"] + 1).data, ONE_PROCESS, record)
    assert sorted(reads) == ["t2a_1.pth", "v2a_2.pth", "vt2a_0.pth"]
    prepare_rows(make_config(tmp_path, csv).data, ONE_PROCESS, record)  # every file passes again
    reads.clear()
    text = csv.read_text().replace("t2a_1.pth,0,1", "t2a_1.pth,1,1")  # the T2A row now claims video too
    csv.write_text(text)
    with pytest.raises(ManifestError, match="clip_features missing"):
        prepare_rows(make_config(tmp_path, csv, data__on_bad_row="error").data, ONE_PROCESS, record)
    assert reads == ["t2a_1.pth"]  # the only row whose verdict does not hold for its flags
    reads.clear()
    saved = json.loads(record.read_text())
    record.write_text(json.dumps({**saved, "files": {k: 7 for k in saved["files"]}}))  # malformed entries
    prepare_rows(make_config(tmp_path, csv, data__max_failed_fraction=0.5).data, ONE_PROCESS, record)
    assert len(reads) == 3  # every file read again, no crash
    reads.clear()
    record.write_text("{not json")  # an unreadable record: warned about, every file checked
    prepare_rows(make_config(tmp_path, csv, data__max_failed_fraction=0.5).data, ONE_PROCESS, record)
    assert len(reads) == 3
    reads.clear()
    prepare_rows(make_config(tmp_path, csv, data__max_failed_fraction=0.5).data, ONE_PROCESS, None)  # no record kept
    assert len(reads) == 3


def test_the_trainer_keeps_the_record_in_its_run_folder(tmp_path, reads):
    csv = make_dataset(tmp_path)
    Trainer(make_config(tmp_path, csv))
    first = len(reads)
    trainer = Trainer(make_config(tmp_path, csv))
    assert first == 4 and len(reads) == first
    assert (trainer.exp_dir / checks.CHECKS_NAME).is_file()
