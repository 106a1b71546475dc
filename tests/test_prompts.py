"""The field's labelled prompt files, written here with their real column names: Wen et al.'s
JSON lines, Webster et al.'s Parquet, MemBench's CSV and plain lists; labels read as
memorized or not, and clear errors on files without a prompt column or with unknown labels."""

import json

import pytest

from diffmem.prompts import read_prompts


def test_wen_json_lines_have_captions_and_no_labels(tmp_path):
    f = tmp_path / "sdv1_500_memorized.jsonl"
    f.write_text("\n".join(json.dumps({"caption": c, "index": i, "url": f"http://x/{i}.jpg"})
                           for i, c in enumerate(["The No Limits Business Woman Podcast",
                                                  "Mothers influence on her young hippo"])))
    got = read_prompts(f)
    assert got.texts == ["The No Limits Business Woman Podcast",
                         "Mothers influence on her young hippo"]
    assert got.marks() is None and got.labels == [None, None]


def test_webster_parquet_overfit_types_become_labels(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({"caption": ["a", "b", "c", "d", "e"],
                      "overfit_type": ["MV", "RV", "TV", "N", None],
                      "url": ["u"] * 5})
    pq.write_table(table, tmp_path / "sdv1_bb_edge_groundtruth.parquet")
    got = read_prompts(tmp_path / "sdv1_bb_edge_groundtruth.parquet")
    assert got.texts == ["a", "b", "c", "d", "e"]
    assert got.labels == ["MV", "RV", "TV", "N", None]
    assert got.marks() == [1, 1, 1, 0, -1]
    pq.write_table(pa.table({"prompt": ["a", "b"], "overfit_type": ["MV", "XV"]}),
                   tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"--prompts: expected labels .*unknown values \['XV'\]"
                       ) as err:
        read_prompts(tmp_path / "bad.parquet")
    assert "overfit_type" in str(err.value)


def test_membench_csv_and_plain_lists(tmp_path):
    f = tmp_path / "membench.csv"
    f.write_text('Prompt,memorized,n_images\n"A cat, sitting",true,3\nA dog,false,0\n')
    got = read_prompts(f)
    assert got.texts == ["A cat, sitting", "A dog"] and got.marks() == [1, 0]
    plain = tmp_path / "sd1_nmem.txt"
    plain.write_text("a red bus\n\nan old map\n")
    assert read_prompts(plain).texts == ["a red bus", "an old map"]
    assert read_prompts(plain).marks() is None
    arr = tmp_path / "list.json"
    arr.write_text(json.dumps(["one", "two"]))
    assert read_prompts(arr).texts == ["one", "two"]


def test_tables_without_a_prompt_column_name_the_columns_found(tmp_path):
    f = tmp_path / "t.csv"
    f.write_text("url,width\nhttp://x,3\n")
    with pytest.raises(ValueError, match=r"--prompts: expected a column of prompts.*"
                                         r"columns \['url', 'width'\]"):
        read_prompts(f)
    g = tmp_path / "t.jsonl"
    g.write_text('{"prompt": "a", "label": "maybe"}\n{"prompt": "b", "label": 0}\n')
    with pytest.raises(ValueError, match=r"unknown values \['maybe'\]"):
        read_prompts(g)
    h = tmp_path / "empty.parquet"
    h.write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="--prompts: expected a readable Parquet file"):
        read_prompts(h)
