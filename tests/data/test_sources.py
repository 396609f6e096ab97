"""load_table on real ImageFolder trees and CSV manifests, and every error it names."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from feedtune.data.sources import DataSourceError, class_names, load_table

# Content does not matter to load_table (it never decodes); a few real JPEG bytes suffice.
JPEG = bytes.fromhex("ffd8ffe000104a46494600010100000100010000ffd9")


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(JPEG)
    return path


def write_csv(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_image_folder_tree(tmp_path):
    root = tmp_path / "imgs"
    touch(root / "dog" / "b.jpg")
    touch(root / "dog" / "a.PNG")  # extension case does not matter
    touch(root / "cat" / "z.jpeg")
    touch(root / "cat" / "nested" / "deeper" / "y.webp")  # nested folders belong to the class
    touch(root / "cat" / ".hidden.jpg")
    touch(root / "cat" / ".cache" / "x.jpg")  # hidden folder
    touch(root / ".trash" / "t.jpg")  # hidden class folder
    touch(root / "__MACOSX" / "cat" / "._z.jpeg")  # zip metadata, not a class
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "README.md").write_text("loose files at the top are not classes")

    table = load_table(root)

    assert list(table.columns) == ["path", "label"]
    assert table["label"].tolist() == ["cat", "cat", "dog", "dog"]
    names = [os.path.relpath(p, root) for p in table["path"]]
    assert names == [
        os.path.join("cat", "nested", "deeper", "y.webp"),
        os.path.join("cat", "z.jpeg"),
        os.path.join("dog", "a.PNG"),
        os.path.join("dog", "b.jpg"),
    ]
    assert all(os.path.isabs(p) for p in table["path"])
    assert class_names(table) == ["cat", "dog"]
    assert table.index.tolist() == [0, 1, 2, 3]


def test_relative_source_gives_absolute_paths(tmp_path, monkeypatch):
    touch(tmp_path / "d" / "cat" / "a.jpg")
    monkeypatch.chdir(tmp_path)
    table = load_table("d")
    assert table["path"].tolist() == [str(tmp_path / "d" / "cat" / "a.jpg")]


def test_csv_without_group_resolves_against_csv_folder(tmp_path):
    data = tmp_path / "data"
    touch(data / "images" / "1.jpg")
    touch(data / "images" / "2.jpg")
    elsewhere = touch(tmp_path / "other" / "3.jpg")
    csv = write_csv(
        data / "labels.csv",
        f"path,label,extra\nimages/2.jpg,dog,x\nimages/1.jpg, dog ,y\n{elsewhere},cat,z\n",
    )
    table = load_table(csv)
    assert list(table.columns) == ["path", "label"]  # extra columns dropped
    assert table.to_dict("list") == {
        "path": [str(elsewhere), str(data / "images" / "1.jpg"), str(data / "images" / "2.jpg")],
        "label": ["cat", "dog", "dog"],  # surrounding spaces stripped
    }


def test_csv_with_group_and_string_labels(tmp_path):
    for name in ("a", "b", "c"):
        touch(tmp_path / f"{name}.jpg")
    # Labels that pandas would otherwise read as NaN or numbers stay strings.
    csv = write_csv(tmp_path / "m.csv", "path,label,group\nc.jpg,NA,p1\na.jpg,1,p2\nb.jpg,1,p1\n")
    table = load_table(csv)
    assert list(table.columns) == ["path", "label", "group"]
    assert table["label"].tolist() == ["1", "1", "NA"]
    assert table["group"].tolist() == ["p2", "p1", "p1"]
    assert class_names(table) == ["1", "NA"]


def test_directory_with_manifest_uses_it(tmp_path):
    touch(tmp_path / "cat" / "a.jpg")  # would be an ImageFolder class...
    touch(tmp_path / "pics" / "b.jpg")
    write_csv(tmp_path / "manifest.csv", "path,label,group\npics/b.jpg,bird,g1\n")
    table = load_table(tmp_path)  # ...but the manifest wins
    assert table.to_dict("list") == {
        "path": [str(tmp_path / "pics" / "b.jpg")],
        "label": ["bird"],
        "group": ["g1"],
    }


def test_order_is_deterministic(tmp_path):
    for i in (3, 1, 2):
        touch(tmp_path / "x" / f"{i}.jpg")
        touch(tmp_path / "a" / f"{i}.jpg")
    first, second = load_table(tmp_path), load_table(tmp_path)
    assert first.equals(second)
    assert first["path"].tolist() == sorted(first["path"])  # label "a" sorts before "x"


# --- errors ----------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(DataSourceError, match="data path not found: .*nope.*data.path"):
        load_table(tmp_path / "nope")


def test_non_csv_file(tmp_path):
    image = touch(tmp_path / "a.jpg")
    with pytest.raises(DataSourceError, match="a.jpg is a file but not a CSV"):
        load_table(image)


def test_directory_without_class_folders(tmp_path):
    touch(tmp_path / "loose.jpg")
    with pytest.raises(DataSourceError, match=r"no class folders in .*found 1 image\(s\) directly"):
        load_table(tmp_path)


def test_empty_class_folder_is_named(tmp_path):
    touch(tmp_path / "dog" / "a.jpg")
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "readme.txt").write_text("no images here")
    with pytest.raises(DataSourceError, match="class folder 'cat' in .* has no images"):
        load_table(tmp_path)
    (tmp_path / "emu").mkdir()
    with pytest.raises(DataSourceError, match="class folders 'cat', 'emu' in .* have no images"):
        load_table(tmp_path)


def test_csv_missing_columns(tmp_path):
    csv = write_csv(tmp_path / "m.csv", "file,class\na.jpg,cat\n")
    with pytest.raises(DataSourceError) as info:
        load_table(csv)
    message = str(info.value)
    assert "m.csv" in message
    assert "'path', 'label'" in message  # the missing ones
    assert "found columns: 'file', 'class'" in message


def test_csv_listed_files_missing(tmp_path):
    touch(tmp_path / "ok.jpg")
    rows = "".join(f"gone{i}.jpg,cat\n" for i in range(7))
    csv = write_csv(tmp_path / "m.csv", "path,label\nok.jpg,cat\n" + rows)
    with pytest.raises(DataSourceError) as info:
        load_table(csv)
    message = str(info.value)
    assert "7 of 8 listed files do not exist" in message
    assert "gone0.jpg" in message and "gone4.jpg" in message and "gone6.jpg" not in message
    assert str(tmp_path) in message  # says where relative paths were resolved


def test_csv_empty_labels(tmp_path):
    touch(tmp_path / "a.jpg")
    touch(tmp_path / "b.jpg")
    csv = write_csv(tmp_path / "m.csv", "path,label\na.jpg,cat\nb.jpg,  \n")
    with pytest.raises(DataSourceError, match=r"1 row\(s\) with an empty 'label' value .*rows 2"):
        load_table(csv)


def test_csv_empty_group(tmp_path):
    touch(tmp_path / "a.jpg")
    csv = write_csv(tmp_path / "m.csv", "path,label,group\na.jpg,cat,\n")
    with pytest.raises(DataSourceError, match="empty 'group'"):
        load_table(csv)


def test_csv_without_rows(tmp_path):
    csv = write_csv(tmp_path / "m.csv", "path,label\n")
    with pytest.raises(DataSourceError, match="m.csv has a header but no rows"):
        load_table(csv)
    empty = write_csv(tmp_path / "e.csv", "")
    with pytest.raises(DataSourceError, match="e.csv is empty"):
        load_table(empty)


def test_csv_duplicate_paths(tmp_path):
    touch(tmp_path / "a.jpg")
    csv = write_csv(tmp_path / "m.csv", "path,label\na.jpg,cat\n./a.jpg,dog\n")
    with pytest.raises(DataSourceError, match="1 file.* listed more than once: .*a.jpg"):
        load_table(csv)
