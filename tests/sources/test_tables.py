"""load_table on real ImageFolder trees and CSV manifests, and every error it names."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from feedtune.sources.tables import DataSourceError, class_names, load_table

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
    with pytest.raises(DataSourceError, match=r"data row 1 \(a.jpg\) and data row 2 \(./a.jpg\)"):
        load_table(csv)
    same = write_csv(tmp_path / "same.csv", "path,label\na.jpg,cat\n./a.jpg,cat\n")
    assert load_table(same)["path"].tolist() == [str(tmp_path / "a.jpg")]


# --- hostile trees: links, loops, FIFOs ------------------------------------------------------


def _rows(table) -> list[tuple[str, str]]:
    return list(zip(table["path"], table["label"], strict=True))


@pytest.mark.timeout(20)
@pytest.mark.parametrize("where", ["root", "class"])
def test_loop_link_gives_each_image_once(tmp_path, where):
    root = tmp_path / "imgs"
    a, b = touch(root / "cat" / "a.jpg"), touch(root / "dog" / "b.jpg")
    link = root / "loop" if where == "root" else root / "cat" / "loop"
    link.symlink_to(".", target_is_directory=True)  # the folder holding the link
    assert _rows(load_table(root)) == [(str(a), "cat"), (str(b), "dog")]


@pytest.mark.timeout(20)
def test_two_loop_links_do_not_hang(tmp_path):
    root = tmp_path / "imgs"
    a, b = touch(root / "cat" / "a.jpg"), touch(root / "dog" / "b.jpg")
    # Each level doubles the paths an unchecked walk sees: 2 ** 40 before ELOOP stops it.
    (root / "cat" / "self").symlink_to(".", target_is_directory=True)
    (root / "cat" / "up").symlink_to("..", target_is_directory=True)
    (root / "dog" / "up").symlink_to("..", target_is_directory=True)
    assert _rows(load_table(root)) == [(str(a), "cat"), (str(b), "dog")]


@pytest.mark.timeout(20)
def test_symlinked_class_folder_is_followed_once(tmp_path):
    elsewhere = tmp_path / "elsewhere" / "cats"
    touch(elsewhere / "a.jpg")
    touch(elsewhere / "sub" / "b.jpg")
    (elsewhere / "again").symlink_to("sub", target_is_directory=True)  # a second way to sub/
    root = tmp_path / "imgs"
    c = touch(root / "dog" / "c.jpg")
    (root / "cat").symlink_to(elsewhere, target_is_directory=True)
    # Paths stay as reached through the class link; sub/ is read once, by its own name.
    assert _rows(load_table(root)) == [
        (str(root / "cat" / "a.jpg"), "cat"),
        (str(root / "cat" / "sub" / "b.jpg"), "cat"),
        (str(c), "dog"),
    ]


@pytest.mark.timeout(20)
def test_fifo_with_an_image_name_is_skipped_and_counted(tmp_path, caplog):
    root = tmp_path / "imgs"
    a, b = touch(root / "cat" / "a.jpg"), touch(root / "dog" / "b.jpg")
    os.mkfifo(root / "cat" / "x.jpg")
    with caplog.at_level("WARNING", logger="feedtune.sources.tables"):
        table = load_table(root)
    assert _rows(table) == [(str(a), "cat"), (str(b), "dog")]
    assert "skipped 1 file(s)" in caplog.text and "not regular files" in caplog.text
    assert str(root / "cat" / "x.jpg") in caplog.text


def test_same_file_in_two_class_folders_names_both(tmp_path):
    root = tmp_path / "imgs"
    a = touch(root / "cat" / "a.jpg")
    (root / "dog").mkdir()
    (root / "dog" / "alias.jpg").symlink_to(a)
    with pytest.raises(DataSourceError) as info:
        load_table(root)
    message = str(info.value)
    assert str(a) in message and str(root / "dog" / "alias.jpg") in message
    assert "'cat'" in message and "'dog'" in message


def test_csv_same_file_via_symlink_keeps_one_row(tmp_path, caplog):
    a, b = touch(tmp_path / "a.jpg"), touch(tmp_path / "b.jpg")
    (tmp_path / "link.jpg").symlink_to(a)
    (tmp_path / "alias").symlink_to(".", target_is_directory=True)
    csv = write_csv(
        tmp_path / "m.csv", "path,label\na.jpg,cat\nlink.jpg,cat\nb.jpg,dog\nalias/a.jpg,cat\n"
    )
    with caplog.at_level("WARNING", logger="feedtune.sources.tables"):
        table = load_table(csv)
    assert _rows(table) == [(str(a), "cat"), (str(b), "dog")]  # the first listed row is kept
    assert "2 repeated row(s)" in caplog.text and "data row 2 (link.jpg)" in caplog.text


def test_csv_same_file_with_two_labels_names_both_rows(tmp_path):
    a = touch(tmp_path / "a.jpg")
    (tmp_path / "link.jpg").symlink_to(a)
    csv = write_csv(tmp_path / "m.csv", "path,label\na.jpg,cat\nlink.jpg,dog\n")
    with pytest.raises(DataSourceError) as info:
        load_table(csv)
    message = str(info.value)
    assert "data row 1 (a.jpg)" in message and "data row 2 (link.jpg)" in message
    assert "different labels 'cat' and 'dog'" in message
    grouped = write_csv(tmp_path / "g.csv", "path,label,group\na.jpg,cat,p1\nlink.jpg,cat,p2\n")
    with pytest.raises(DataSourceError, match="different groups 'p1' and 'p2'"):
        load_table(grouped)


@pytest.mark.timeout(20)
def test_csv_listing_a_fifo_is_refused(tmp_path):
    touch(tmp_path / "a.jpg")
    os.mkfifo(tmp_path / "x.jpg")
    csv = write_csv(tmp_path / "m.csv", "path,label\na.jpg,cat\nx.jpg,cat\n")
    with pytest.raises(DataSourceError, match=r"1 listed path\(s\) are not regular files.*x.jpg"):
        load_table(csv)
