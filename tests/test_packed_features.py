"""The packed feature store (wavflow/features/packed.py): shards hold what the per-row files held,
training on a packed CSV is bit-identical to training on the per-row one, the start-up check
reads shard headers only and still names the row at fault, and packing resumes."""

from __future__ import annotations

import os
from dataclasses import replace

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

import wavflow.train.feature_checks as checks
from tests.test_train_common import make_config, make_dataset, SHAPES
from tests.test_train_runs import _assert_same_tree
from wavflow.distributed import DistInfo
from wavflow.errors import FeatureError, ManifestError, RowsFailedError
from wavflow.features.packed import (KEY_COLUMN, main as pack_main, pack_csv, read_index, ShardReader,
                                     tensor_name)
from wavflow.features.report import analyse_csv, FeatureStats, STATS_FILENAME
from wavflow.io_utils import safe_torch_load
from wavflow.train.dataset import TrainDataset
from wavflow.train.epoch_data import prepare_rows
from wavflow.train.trainer import run_training

ONE_PROCESS = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None)
MODES = ("vt2a", "t2a", "v2a", "vt2a", "t2a")


def _items(data):
    dataset = TrainDataset(prepare_rows(data, ONE_PROCESS, None), data)
    return {item["id"]: item for item in (dataset[i] for i in range(len(dataset)))}


def test_packed_rows_read_exactly_what_their_files_held(tmp_path):
    csv = make_dataset(tmp_path, modes=MODES)
    result = pack_csv(csv, tmp_path / "packed", shard_rows=2, show_progress=False)
    assert (result.rows, result.shards, result.written) == (5, 3, 3)
    packed = pd.read_csv(result.csv_path, dtype=str)
    assert list(packed[KEY_COLUMN]) == list(pd.read_csv(csv, dtype=str)["id"])
    assert packed["features_path"].nunique() == 3
    assert (tmp_path / "packed" / "empty_string.pt").is_file()  # found beside the features, like the per-row layout's
    # a T2A row's file held no video tensors: its shard holds none either
    index = read_index(tmp_path / "packed" / "train_00000.safetensors")
    assert tensor_name("t2a_1", "text_features") in index and tensor_name("t2a_1", "clip_features") not in index
    # the feature report and statistics (data.feature_norm) read a packed CSV too, to the same numbers
    (report_a, stats_a), (report_b, stats_b) = (analyse_csv(p, progress=False) for p in (csv, result.csv_path))
    assert report_b["unreadable"] == 0 and report_a["streams"] == report_b["streams"]
    _assert_same_tree(stats_a.to_dict(), stats_b.to_dict())
    per_row, from_shards = _items(make_config(tmp_path, csv).data), _items(make_config(tmp_path, result.csv_path).data)
    assert per_row.keys() == from_shards.keys()
    for sample_id, item in per_row.items():
        _assert_same_tree(item, from_shards[sample_id], sample_id)


def test_training_on_a_packed_csv_is_bit_identical_and_mixes_with_per_row_rows(tmp_path):
    csv = make_dataset(tmp_path / "data", modes=MODES + ("v2a",))
    packed = pack_csv(csv, tmp_path / "packed", shard_rows=4, show_progress=False).csv_path
    mixed = pd.read_csv(packed, dtype=str, keep_default_na=False)
    original = pd.read_csv(csv, dtype=str)
    mixed.loc[1::2, "features_path"] = original.loc[1::2, "features_path"]  # every other row from its own file
    mixed.loc[1::2, KEY_COLUMN] = ""
    mixed.to_csv(tmp_path / "mixed.csv", index=False)
    runs = [run_training(make_config(tmp_path / name, path, training__epochs=2, training__label_drop_prob=0.5,
                                     training__num_workers=workers))  # workers open their own shards
            for name, path, workers in (("a", csv, 0), ("b", packed, 0), ("c", tmp_path / "mixed.csv", 2))]
    a, b, c = (safe_torch_load(r.exp_dir / "checkpoint_latest.pth") for r in runs)
    for key in ("model", "model_ema1", "optimizer", "global_step"):
        _assert_same_tree(a[key], b[key], key)
        _assert_same_tree(a[key], c[key], key)


def test_the_start_up_check_reads_headers_and_names_the_bad_row(tmp_path, monkeypatch):
    csv = make_dataset(tmp_path, modes=MODES)
    packed = pack_csv(csv, tmp_path / "packed", shard_rows=2, show_progress=False).csv_path
    opened: list[str] = []
    monkeypatch.setattr(checks, "load_features", lambda row, shapes: opened.append(row.sample_id))
    headers: list[str] = []
    real_index = checks.read_index
    monkeypatch.setattr(checks, "read_index", lambda path: headers.append(path.name) or real_index(path))
    assert len(prepare_rows(make_config(tmp_path, packed).data, ONE_PROCESS, tmp_path / "checks.json")) == 5
    assert opened == [] and sorted(headers) == [f"train_0000{i}.safetensors" for i in range(3)]  # one read per shard

    # a shard rewritten with a mis-shaped text tensor for one row: that row is named, the others train
    shard = tmp_path / "packed" / "train_00001.safetensors"
    tensors = load_file(shard)
    tensors[tensor_name("v2a_2", "clip_features")] = torch.zeros(SHAPES["clip_seq_len"] + 1, SHAPES["clip_dim"])
    save_file(tensors, shard)
    with pytest.raises(ManifestError, match=r"v2a_2.*clip_features has shape \(9, 32\), expected \(8, 32\)"):
        prepare_rows(make_config(tmp_path, packed, data__on_bad_row="error").data, ONE_PROCESS, None)
    kept = prepare_rows(make_config(tmp_path, packed, data__max_failed_fraction=0.5).data, ONE_PROCESS, None)
    assert sorted(r.sample_id for r in kept) == ["t2a_1", "t2a_4", "vt2a_0", "vt2a_3"]

    # a features_key the shard does not hold, and a shard that is not one: named, not a crash
    df = pd.read_csv(packed, dtype=str)
    df.loc[0, KEY_COLUMN] = "nobody"
    (tmp_path / "packed" / "train_00002.safetensors").write_bytes(b"not a shard")
    df.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(RowsFailedError) as err:
        prepare_rows(make_config(tmp_path, tmp_path / "bad.csv").data, ONE_PROCESS, None)
    text = str(err.value)
    assert "holds no row 'nobody' (features_key of id 'vt2a_0')" in text
    assert "train_00002.safetensors could not be read" in text


def test_a_read_of_a_key_the_shard_lacks_is_a_feature_error(tmp_path):
    csv = make_dataset(tmp_path, modes=MODES)
    packed = pack_csv(csv, tmp_path / "packed", shard_rows=8, show_progress=False).csv_path
    data = make_config(tmp_path, packed, data__validate_features=False).data
    rows = prepare_rows(data, ONE_PROCESS, None)
    item = TrainDataset([replace(rows[0], features_key="nobody")], data)[0]
    assert "holds no row 'nobody'" in item["failed_row"][1]
    with pytest.raises(FeatureError, match="holds no row"):
        ShardReader().read(rows[0].features_path, "nobody", ("text_features",))


def test_packing_resumes_rewrites_changed_shards_and_refuses_bad_rows(tmp_path, capsys):
    csv = make_dataset(tmp_path, modes=MODES)
    out = tmp_path / "packed"
    assert pack_main(["--csv", str(csv), "--out", str(out), "--shard-rows", "2"]) == 0
    assert "packed 5 rows into 3 shard(s) (3 written" in capsys.readouterr().out
    stamps = {p.name: os.stat(p).st_mtime_ns for p in out.glob("*.safetensors")}
    assert pack_csv(csv, out, shard_rows=2, show_progress=False).written == 0  # nothing changed: nothing written
    feats = torch.load(tmp_path / "features" / "t2a_4.pth", weights_only=True)
    feats["text_features"] = feats["text_features"] + 1
    torch.save(feats, tmp_path / "features" / "t2a_4.pth")
    os.utime(tmp_path / "features" / "t2a_4.pth", ns=(0, os.stat(tmp_path / "features" / "t2a_4.pth").st_mtime_ns + 10**7))
    assert pack_csv(csv, out, shard_rows=2, show_progress=False).written == 1  # only the shard of the changed row
    assert {p.name: os.stat(p).st_mtime_ns for p in out.glob("*.safetensors")}.items() ^ stamps.items() == {
        ("train_00002.safetensors", stamps["train_00002.safetensors"]),
        ("train_00002.safetensors", os.stat(out / "train_00002.safetensors").st_mtime_ns)}
    assert not list(out.glob(".*tmp"))  # no temporary files left behind
    assert pack_csv(csv, out, shard_rows=4, show_progress=False).shards == 2
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["train_00000.safetensors", "train_00001.safetensors"]

    feats["text_features"][0, 0] = float("nan")  # a row that would poison a shard is refused, naming it
    torch.save(feats, tmp_path / "features" / "t2a_4.pth")
    assert pack_main(["--csv", str(csv), "--out", str(out)]) != 0
    err = capsys.readouterr().err
    assert "t2a_4" in err and "text_features holds non-finite values" in err
    lines = csv.read_text().splitlines()
    csv.write_text("\n".join(lines + [lines[1]]) + "\n")  # an id twice
    with pytest.raises(ManifestError, match="vt2a_0.*more than once"):
        pack_csv(csv, out, show_progress=False)
    with pytest.raises(ManifestError, match="would overwrite it"):  # the input CSV is never replaced
        pack_csv(csv, csv.parent, show_progress=False)


def test_a_packing_that_stops_leaves_no_packed_csv_and_other_csvs_shards_are_kept(tmp_path):
    csv = make_dataset(tmp_path, modes=MODES)
    out = tmp_path / "packed"
    pack_csv(csv, out, shard_rows=4, show_progress=False)
    unrelated = out / "train_00099.safetensors"  # not from this CSV: never removed or overwritten
    save_file({"x": torch.zeros(2)}, unrelated)
    feats = torch.load(tmp_path / "features" / "t2a_4.pth", weights_only=True)
    torch.save({**feats, "text_features": feats["text_features"] * float("nan")}, tmp_path / "features" / "t2a_4.pth")
    with pytest.raises(FeatureError, match="t2a_4"):
        pack_csv(csv, out, shard_rows=2, show_progress=False)  # shard 0 rewritten, shard 2 refused
    assert not (out / "train.csv").exists()  # no CSV left pointing at the rewritten shards
    torch.save(feats, tmp_path / "features" / "t2a_4.pth")
    assert pack_csv(csv, out, shard_rows=2, show_progress=False).shards == 3
    assert unrelated.is_file() and sorted(p.name for p in out.glob("*.safetensors")) == [
        "train_00000.safetensors", "train_00001.safetensors", "train_00002.safetensors", "train_00099.safetensors"]

    packed = out / "train.csv"  # an already packed CSV is refused, so no shard is read while rewritten
    with pytest.raises(ManifestError, match="already packed"):
        pack_csv(packed, tmp_path / "again", show_progress=False)
    other = make_dataset(tmp_path / "other", modes=("vt2a",))  # another CSV named train.csv: refused
    with pytest.raises(ManifestError, match="holds shards of another CSV named train.csv"):
        pack_csv(other, out, show_progress=False)


def test_rows_from_several_folders_pool_their_feature_statistics(tmp_path):
    lines = ["id,audio_path,features_path,video_exist,text_exist"]
    for part in ("a", "b"):
        csv = make_dataset(tmp_path / part, modes=MODES[:3] if part == "a" else MODES[3:])
        analyse_csv(csv, progress=False)[1].save(tmp_path / part / "features" / STATS_FILENAME)
        lines += [f"{part}_{line}" for line in csv.read_text().splitlines()[1:]]
    both = tmp_path / "both.csv"
    both.write_text("\n".join(lines) + "\n")
    pack_csv(both, tmp_path / "packed", show_progress=False)
    pooled = FeatureStats.load(tmp_path / "packed" / STATS_FILENAME)
    assert pooled.rows == analyse_csv(both, progress=False)[1].rows  # every row of both folders counted
    (tmp_path / "b" / "features" / STATS_FILENAME).unlink()  # a folder without statistics: none written
    pack_csv(both, tmp_path / "packed", show_progress=False)
    assert not (tmp_path / "packed" / STATS_FILENAME).exists()
