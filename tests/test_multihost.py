"""seal_jax.selfedit.multihost in one process (the two-process behaviour: tests/test_distributed.py)."""

from __future__ import annotations

import pytest

from seal_jax.selfedit.multihost import agree, is_writer, require_visible


def test_one_process_writes_and_reads_directly():
    assert is_writer()
    calls = []

    def read():
        calls.append(1)
        return {"rows": [{"passage_id": "demo-0"}], "n": 2}

    assert agree(read) == {"rows": [{"passage_id": "demo-0"}], "n": 2} and calls == [1]
    assert agree(lambda: None) is None
    assert agree(lambda: {"pair": (1, 2)}) == {"pair": [1, 2]}  # JSON types on every process, as with several


def test_a_failing_read_raises_the_original_error():
    def read():
        raise FileExistsError("results.jsonl already holds results")

    with pytest.raises(FileExistsError, match="already holds"):
        agree(read)


def test_a_result_that_is_not_json_is_an_error():
    with pytest.raises(TypeError):
        agree(lambda: {1, 2})


def test_require_visible_names_the_missing_folder(tmp_path):
    require_visible(tmp_path, "the generator")  # present: nothing happens
    with pytest.raises(FileNotFoundError, match=r"the generator .*missing on process\(es\) \[0\].*all hosts share"):
        require_visible(tmp_path / "round-1" / "generator", "the generator")
