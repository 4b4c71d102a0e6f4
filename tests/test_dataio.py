"""srgan.dataio: atomic writes leave the old file or the new one, never a half one."""

import pytest

from srgan import dataio


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    p = tmp_path / "sub" / "f.json"
    dataio.write_json_atomic(p, {"a": 1})
    assert dataio.read_json(p) == {"a": 1}
    with pytest.raises(RuntimeError):
        with dataio.atomic_write(p) as f:
            f.write('{"a": 2')  # half written, then the writer dies
            raise RuntimeError("killed")
    assert dataio.read_json(p) == {"a": 1}  # the old file, untouched
    assert [x.name for x in p.parent.iterdir()] == ["f.json"]  # and no temp file left
    assert oct(p.stat().st_mode & 0o777) == "0o644"


def test_atomic_path_keeps_the_suffix(tmp_path):
    target = tmp_path / "m.keras"
    with dataio.atomic_path(target) as tmp:
        assert tmp.suffix == ".keras" and tmp.parent == tmp_path and tmp != target
        tmp.write_bytes(b"x")
    assert target.read_bytes() == b"x" and not tmp.exists()


def test_read_json_damaged_and_missing(tmp_path):
    p = tmp_path / "s.json"
    assert dataio.read_json(p, {}) == {}
    p.write_text("{not json")
    assert dataio.read_json(p, "default") == "default"
    with pytest.raises(dataio.DataFileError, match="s.json: not readable JSON"):
        dataio.read_json(p, strict=True)


def test_csv_round_trip_and_digests(tmp_path):
    p = tmp_path / "t.csv"
    dataio.write_csv_atomic(p, [{"a": 1.5, "b": "x"}, {"a": 2.0, "c": 3}], float_format=".2f")
    assert dataio.read_csv(p) == [{"a": "1.50", "b": "x", "c": ""}, {"a": "2.00", "b": "", "c": "3"}]
    (tmp_path / "f").write_bytes(b"abc")
    assert dataio.sha256_file(tmp_path / "f") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert dataio.json_digest({"b": 1, "a": 2}) == dataio.json_digest({"a": 2, "b": 1})

