"""Tests for signround.data: spec parsing, every source type, filtering / concat / mixing rules, and errors."""

from __future__ import annotations

import json
import logging
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from signround.data import (
    CalibrationSet,
    DatasetSpec,
    HubUnavailableError,
    chunk_token_ids,
    load_calibration,
    parse_dataset_spec,
)
from signround.data import sources as sources_mod
from signround.data.prepare import _pool  # internal: concat / template paths without files

SHARED = Path(__file__).resolve().parents[2] / "shared"  # the checkout sits next to shared/
MODEL_DIR = SHARED / "models" / "stories260K"

# A minimal ChatML-style template; the stories260K tokenizer ships none.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
NO_SYSTEM_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
    "[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
)

STORY = "once upon a time there was a little girl named lily who loved to play in the park with her dog"
WORDS = STORY.split()


def _text(n_words: int, offset: int = 0) -> str:
    return " ".join(WORDS[(offset + i) % len(WORDS)] for i in range(n_words))


@pytest.fixture(scope="module")
def tok():
    transformers = pytest.importorskip("transformers")
    if not MODEL_DIR.is_dir():
        pytest.skip(f"tokenizer fixture {MODEL_DIR} not found")
    return transformers.AutoTokenizer.from_pretrained(str(MODEL_DIR))


@pytest.fixture
def chat_tok(tok, monkeypatch):
    monkeypatch.setattr(tok, "chat_template", CHAT_TEMPLATE, raising=False)
    return tok


def _write(path: Path, content: str) -> str:
    path.write_text(content, encoding="utf-8")
    return str(path)


# ---------------------------------------------------------------------------------------------------- spec parsing


class TestSpec:
    def test_single_name_defaults(self):
        assert parse_dataset_spec("NeelNanda/pile-10k") == [DatasetSpec(name="NeelNanda/pile-10k")]

    def test_multiple_entries_and_options(self):
        specs = parse_dataset_spec("./tmp.json,NeelNanda/pile-10k:num=256,mbpp:num=128:split=train+validation")
        assert specs == [
            DatasetSpec("./tmp.json"),
            DatasetSpec("NeelNanda/pile-10k", num=256),
            DatasetSpec("mbpp", num=128, split=("train", "validation")),
        ]

    @pytest.mark.parametrize(
        ("text", "expected"),
        [("concat", True), ("concat=True", True), ("concat=false", False), ("concat=1", True), ("concat=No", False)],
    )
    def test_bool_flags(self, text, expected):
        assert parse_dataset_spec(f"a.txt:{text}")[0].concat is expected

    def test_bare_apply_chat_template(self):
        assert parse_dataset_spec("x:apply_chat_template")[0].apply_chat_template is True

    def test_system_prompt_quoted_with_separators_implies_template(self):
        (spec,) = parse_dataset_spec('NeelNanda/pile-10k:system_prompt="You: helpful, kind + brief.":num=4')
        assert spec.system_prompt == "You: helpful, kind + brief."
        assert spec.apply_chat_template is True
        assert spec.num == 4

    def test_single_quotes_and_explicit_template_off_wins(self):
        (spec,) = parse_dataset_spec("x:apply_chat_template=False:system_prompt='Be nice'")
        assert spec.system_prompt == "Be nice"
        assert spec.apply_chat_template is False

    def test_quoted_name(self):
        assert parse_dataset_spec('"./a,b:c.json":num=2')[0] == DatasetSpec("./a,b:c.json", num=2)

    def test_existing_path_taken_whole(self, tmp_path):
        path = _write(tmp_path / "odd,name:1.txt", "hello")
        assert parse_dataset_spec(path) == [DatasetSpec(path)]

    @pytest.mark.parametrize(
        ("spec", "fragment"),
        [
            ("a.json:bogus=1", "'bogus=1'"),
            ("a.json:nums=3", "'nums=3'"),
            ("a.json:num=abc", "'num=abc'"),
            ("a.json:num=0", "'num=0'"),
            ("a.json:num=-2", "'num=-2'"),
            ("a.json:num", "'num'"),
            ("a.json:num=", "'num='"),
            ("a.json:concat=maybe", "'concat=maybe'"),
            ("a.json:split=", "'split='"),
            ("a.json:split=train+", "'split=train+'"),
            ("a.json:system_prompt", "'system_prompt'"),
            ("a.json::num=1", "empty option"),
            ("a.json:num=1:num=2", "given twice"),
            (",a.json", "empty dataset name"),
            ("a.json,", "empty dataset name"),
            ("a.json,,b.json", "empty dataset name"),
            (":num=3", "empty dataset name"),
            ('""', "empty dataset name"),
            ("", "empty dataset spec"),
            ("   ", "empty dataset spec"),
            ('x:system_prompt="unclosed', "unbalanced"),
            ("x:system_prompt='a,b", "unbalanced"),
        ],
    )
    def test_bad_spec(self, spec, fragment):
        with pytest.raises(ValueError) as err:
            parse_dataset_spec(spec)
        assert fragment in str(err.value)

    @pytest.mark.parametrize("spec", ["a.json:bogus=1", "a.json:num=abc", "a.json::num=1"])
    def test_option_errors_list_accepted_options(self, spec):
        with pytest.raises(ValueError) as err:
            parse_dataset_spec(spec)
        msg = str(err.value)
        if "bogus" in spec or "::" in spec:
            assert all(opt in msg for opt in ("num=", "concat", "apply_chat_template", "system_prompt", "split="))
        else:
            assert "e.g. num=256" in msg

    def test_bare_split_name_is_the_split(self):
        # the reference's shorthand "name:train" selects the split
        assert parse_dataset_spec("NeelNanda/pile-10k:train")[0].split == ("train",)

    def test_bad_spec_fails_before_reading_files(self, tok):
        # the first entry does not exist: the option error in the second must win, before any file is opened
        with pytest.raises(ValueError, match="bogus"):
            load_calibration("missing.json,other.json:bogus=1", tok, seqlen=8, nsamples=2)

    def test_non_string(self):
        with pytest.raises(TypeError):
            parse_dataset_spec(123)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------- sources


def _ids(tok, text: str) -> list[int]:
    return tok(text)["input_ids"]


class TestSources:
    def test_txt_paragraphs(self, tok, tmp_path):
        paras = [_text(40, i) for i in range(3)] + ["too short"]
        path = _write(tmp_path / "c.txt", "\n\n".join(paras) + "\n")
        calib = load_calibration(path, tok, seqlen=20, nsamples=10)
        assert calib.input_ids.shape == (3, 20)
        assert calib.dropped == 1
        expected = {tuple(_ids(tok, p)[:20]) for p in paras[:3]}
        assert {tuple(r) for r in calib.input_ids.tolist()} == expected

    def test_txt_lines_when_no_blank_line(self, tok, tmp_path):
        lines = [_text(30, i) for i in range(4)]
        path = _write(tmp_path / "lines.txt", "\n".join(lines))
        calib = load_calibration(path, tok, seqlen=16, nsamples=10)
        assert len(calib) == 4
        assert {tuple(r) for r in calib.input_ids.tolist()} == {tuple(_ids(tok, t)[:16]) for t in lines}

    def test_json_strings_text_objects_and_single_field(self, tok, tmp_path):
        data = [_text(30, 0), {"text": _text(30, 1)}, {"body": _text(30, 2)}, {"text": "   "}]
        path = _write(tmp_path / "c.json", json.dumps(data))
        calib = load_calibration(path, tok, seqlen=16, nsamples=10)
        assert len(calib) == 3
        assert calib.attention_mask.dtype == torch.int64 and bool((calib.attention_mask == 1).all())

    def test_json_top_level_object_values(self, tok, tmp_path):
        path = _write(tmp_path / "d.json", json.dumps({"a": _text(30, 0), "b": _text(30, 3)}))
        assert len(load_calibration(path, tok, seqlen=16, nsamples=10)) == 2

    def test_json_messages_use_chat_template(self, chat_tok, tmp_path):
        conv = [{"role": "user", "content": _text(20)}, {"role": "assistant", "content": _text(20, 5)}]
        path = _write(tmp_path / "m.json", json.dumps([{"messages": conv}]))
        calib = load_calibration(path, chat_tok, seqlen=24, nsamples=1)
        rendered = chat_tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=False)
        expected = chat_tok(rendered, add_special_tokens=False)["input_ids"][:24]
        assert calib.input_ids[0].tolist() == expected

    def test_jsonl_text_and_messages(self, chat_tok, tmp_path):
        rows = [
            json.dumps({"text": _text(30)}),
            "",
            json.dumps({"messages": [{"role": "user", "content": _text(30, 4)}]}),
        ]
        path = _write(tmp_path / "c.jsonl", "\n".join(rows) + "\n")
        calib = load_calibration(path, chat_tok, seqlen=16, nsamples=10)
        assert len(calib) == 2
        rendered = chat_tok.apply_chat_template(
            [{"role": "user", "content": _text(30, 4)}], tokenize=False, add_generation_prompt=True
        )
        assert chat_tok(rendered, add_special_tokens=False)["input_ids"][:16] in calib.input_ids.tolist()

    def test_jsonl_bad_line_named(self, tok, tmp_path):
        path = _write(tmp_path / "bad.jsonl", '{"text": "ok"}\n{not json\n')
        with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
            load_calibration(path, tok, seqlen=4, nsamples=1)

    def test_unreadable_item_named(self, tok, tmp_path):
        path = _write(tmp_path / "odd.json", json.dumps([{"a": 1, "b": 2}]))
        with pytest.raises(ValueError, match=r"odd\.json item 0.*keys \['a', 'b'\]"):
            load_calibration(path, tok, seqlen=4, nsamples=1)

    def test_list_of_strings(self, tok):
        texts = [_text(30, i) for i in range(5)] + ["short"]
        calib = load_calibration(texts, tok, seqlen=12, nsamples=3)
        assert calib.input_ids.shape == (3, 12)
        assert calib.sources == ["<list>"] * 3

    def test_list_of_token_lists_without_tokenizer(self):
        data = [list(range(10)), list(range(5)), list(range(20, 40))]
        calib = load_calibration(data, None, seqlen=8, nsamples=5)
        assert sorted(calib.input_ids.tolist()) == [list(range(8)), list(range(20, 28))]
        assert calib.dropped == 1

    def test_long_tensor(self):
        data = torch.arange(60).reshape(3, 20)
        calib = load_calibration(data, None, seqlen=16, nsamples=3)
        assert sorted(calib.input_ids.tolist()) == [r[:16] for r in data.tolist()]
        assert calib.sources == ["<tensor>"] * 3

    def test_reference_customized_data_with_tokenizer(self, tok):
        # what the reference's customized_data_with_tokenizer returns: dicts of [1, L] tensors
        data = [tok(_text(40, i), truncation=True, max_length=32, return_tensors="pt").data for i in range(3)]
        calib = load_calibration(data, tok, seqlen=32, nsamples=3)
        assert {tuple(r) for r in calib.input_ids.tolist()} == {tuple(d["input_ids"][0].tolist()) for d in data}

    def test_pretokenized_padding_mask_kept(self):
        data = [{"input_ids": [5, 6, 7, 0, 0], "attention_mask": [1, 1, 1, 0, 0]}]
        calib = load_calibration(data, None, seqlen=4, nsamples=1)
        assert calib.attention_mask.tolist() == [[1, 1, 1, 0]]

    def test_batch_encoding_mapping(self, tok):
        enc = tok([_text(30, 0), _text(30, 1)], truncation=True, max_length=20, return_tensors="pt")
        calib = load_calibration(enc, tok, seqlen=20, nsamples=2)
        assert len(calib) == 2

    def test_text_needs_tokenizer(self):
        with pytest.raises(ValueError, match="tokenizer"):
            load_calibration(["some text"], None, seqlen=2, nsamples=1)

    def test_bad_tensor_rank(self):
        with pytest.raises(ValueError, match="chunk_token_ids"):
            load_calibration(torch.arange(10), None, seqlen=2, nsamples=1)

    def test_unsupported_type(self, tok):
        with pytest.raises(TypeError, match="unsupported dataset type"):
            load_calibration(42, tok, seqlen=2, nsamples=1)


# ---------------------------------------------------------------------------------------------------- preparation


class TestPrepare:
    def test_dropped_count_and_truncation(self, tok):
        long_texts = [_text(50, i) for i in range(4)]
        short_texts = [_text(3, i) for i in range(6)]
        calib = load_calibration(long_texts + short_texts, tok, seqlen=24, nsamples=20)
        assert calib.dropped == 6
        assert len(calib) == 4
        assert {tuple(r) for r in calib.input_ids.tolist()} == {tuple(_ids(tok, t)[:24]) for t in long_texts}

    def test_dropped_logged_at_info(self, tok, caplog):
        with caplog.at_level(logging.INFO, logger="signround.data"):
            load_calibration([_text(50), "tiny"], tok, seqlen=24, nsamples=1)
        assert any("dropped 1 of 2" in r.getMessage() for r in caplog.records)

    def test_concat_keeps_short_documents(self, tok, tmp_path):
        paras = [_text(6, i) for i in range(40)]
        path = _write(tmp_path / "short.txt", "\n\n".join(paras))
        with pytest.raises(ValueError, match="concat=True"):
            load_calibration(path, tok, seqlen=32, nsamples=4)
        calib = load_calibration(f"{path}:concat=True", tok, seqlen=32, nsamples=4)
        assert calib.input_ids.shape == (4, 32)
        assert calib.dropped == 0
        bos = tok.bos_token_id
        assert bool((calib.input_ids[:, 0] == bos).all())  # every chunk starts like a real prompt
        stream = torch.cat([torch.tensor(tok(p + "\n\n", add_special_tokens=False)["input_ids"]) for p in paras])
        chunks = {tuple(r) for r in chunk_token_ids(stream, 31).tolist()}
        assert all(tuple(r[1:]) in chunks for r in calib.input_ids.tolist())

    def test_concat_token_ids_have_no_extra_specials(self):
        spec = DatasetSpec("ids", concat=True)
        pool = _pool([sources_mod.TokenIds(torch.arange(1, 6))] * 4, spec, None, 8, 10, 0)
        assert [s.ids.tolist() for s in pool.samples] == [[1, 2, 3, 4, 5, 1, 2, 3], [4, 5, 1, 2, 3, 4, 5, 1]]

    def test_reproducible_and_seed_dependent(self, tok):
        texts = [_text(30, i) + f" {i}" for i in range(40)]
        a = load_calibration(texts, tok, seqlen=16, nsamples=8, seed=1)
        b = load_calibration(texts, tok, seqlen=16, nsamples=8, seed=1)
        c = load_calibration(texts, tok, seqlen=16, nsamples=8, seed=2)
        assert torch.equal(a.input_ids, b.input_ids)
        assert not torch.equal(a.input_ids, c.input_ids)

    def test_mixing_honours_num(self, tok, tmp_path):
        a = _write(tmp_path / "a.json", json.dumps([_text(30, i) + " a" for i in range(20)]))
        b = _write(tmp_path / "b.json", json.dumps([_text(30, i) + " b" for i in range(20)]))
        calib = load_calibration(f"{a}:num=3,{b}", tok, seqlen=16, nsamples=10)
        assert len(calib) == 10
        assert calib.sources.count(a) == 3 and calib.sources.count(b) == 7

    def test_mixing_even_split_gives_shortfall_to_larger(self, tok, tmp_path):
        a = _write(tmp_path / "a.json", json.dumps([_text(30, i) for i in range(2)]))
        b = _write(tmp_path / "b.json", json.dumps([_text(30, i) for i in range(20)]))
        calib = load_calibration(f"{a},{b}", tok, seqlen=16, nsamples=10)
        assert calib.sources.count(a) == 2 and calib.sources.count(b) == 8

    def test_fewer_than_requested_warns(self, tok, caplog):
        with caplog.at_level(logging.WARNING, logger="signround.data"):
            calib = load_calibration([_text(30, i) for i in range(3)], tok, seqlen=16, nsamples=8)
        assert len(calib) == 3
        assert any("only 3 calibration samples" in r.getMessage() for r in caplog.records)

    def test_zero_samples_error(self, tok, tmp_path):
        path = _write(tmp_path / "tiny.json", json.dumps(["a b c", "d e"]))
        with pytest.raises(ValueError) as err:
            load_calibration(path, tok, seqlen=64, nsamples=4)
        msg = str(err.value)
        assert "found 0" in msg and "seqlen=64" in msg and "0 of 2 documents" in msg
        assert "concat=True" in msg and "smaller seqlen" in msg

    def test_zero_samples_concat_error(self, tok, tmp_path):
        path = _write(tmp_path / "tiny.txt", "a b c\n\nd e")
        with pytest.raises(ValueError, match=r"seqlen=64.*tokens in all"):
            load_calibration(f"{path}:concat=True", tok, seqlen=64, nsamples=4)

    def test_apply_chat_template_with_system_prompt(self, chat_tok):
        spec = DatasetSpec("<list>", apply_chat_template=True, system_prompt="Be brief.")
        pool = _pool([_text(30)], spec, chat_tok, 64, 1, 0)
        text = chat_tok.decode(pool.samples[0].ids)
        assert text.startswith("<|system|>Be brief.") and "<|user|>once upon" in text

    def test_system_prompt_dropped_when_template_refuses(self, tok, monkeypatch, caplog):
        monkeypatch.setattr(tok, "chat_template", NO_SYSTEM_TEMPLATE, raising=False)
        spec = DatasetSpec("<list>", apply_chat_template=True, system_prompt="Be brief.")
        with caplog.at_level(logging.WARNING, logger="signround.data"):
            pool = _pool([_text(30)], spec, tok, 16, 1, 0)
        assert tok.decode(pool.samples[0].ids).startswith("[user] once upon")
        assert any("rejected the system prompt" in r.getMessage() for r in caplog.records)

    def test_chat_template_missing(self, tok, tmp_path):
        path = _write(tmp_path / "m.jsonl", json.dumps({"messages": [{"role": "user", "content": "hi"}]}))
        with pytest.raises(ValueError, match="chat template"):
            load_calibration(path, tok, seqlen=4, nsamples=1)

    @pytest.mark.parametrize(("seqlen", "nsamples"), [(0, 1), (4, 0), (-1, 1), (4, 1.5)])
    def test_bad_sizes(self, tok, seqlen, nsamples):
        with pytest.raises(ValueError):
            load_calibration(["x"], tok, seqlen=seqlen, nsamples=nsamples)

    def test_returns_dataclass(self, tok):
        calib = load_calibration([_text(30)], tok, seqlen=8, nsamples=1)
        assert isinstance(calib, CalibrationSet)
        assert calib.input_ids.dtype == torch.int64


class TestChunkTokenIds:
    def test_consecutive_chunks(self):
        out = chunk_token_ids(torch.arange(10), 3, 2)
        assert out.tolist() == [[0, 1, 2], [3, 4, 5]]
        assert chunk_token_ids(torch.arange(10), 3).shape == (3, 3)

    def test_benchmark_layout(self, tok):
        text = SHARED / "data" / "tinyshakespeare.txt"
        if not text.is_file():
            pytest.skip("tinyshakespeare.txt not available")
        ids = torch.tensor(tok(text.read_text()[:40000], add_special_tokens=False)["input_ids"])
        out = chunk_token_ids(ids, 256, 32)
        assert out.shape == (32, 256) and torch.equal(out[1], ids[256:512])

    @pytest.mark.parametrize(("ids", "seqlen", "n"), [(torch.arange(10), 3, 4), (torch.arange(10), 0, 1)])
    def test_errors(self, ids, seqlen, n):
        with pytest.raises(ValueError):
            chunk_token_ids(ids, seqlen, n)

    def test_rank(self):
        with pytest.raises(ValueError, match="1-D"):
            chunk_token_ids(torch.zeros(2, 4, dtype=torch.long), 2, 1)


# ---------------------------------------------------------------------------------------------------- missing data


class TestMissing:
    def test_missing_local_file(self, tok, tmp_path):
        path = str(tmp_path / "nope.json")
        with pytest.raises(FileNotFoundError, match=r"nope\.json"):
            load_calibration(f"{path}:num=2", tok, seqlen=4, nsamples=1)

    @pytest.mark.parametrize("name", ["./calib.txt", "data/calib.jsonl", "/abs/dir/x", "~/x.json", "a/b/c"])
    def test_paths_that_are_not_hub_names(self, tok, name):
        with pytest.raises(FileNotFoundError):
            load_calibration(name, tok, seqlen=4, nsamples=1)

    @pytest.mark.parametrize(("name", "content"), [("e.txt", ""), ("e.json", "  \n"), ("e.jsonl", "\n\n")])
    def test_empty_file(self, tok, tmp_path, name, content):
        path = _write(tmp_path / name, content)
        with pytest.raises(ValueError, match=name.replace(".", r"\.") + ".*empty"):
            load_calibration(path, tok, seqlen=4, nsamples=1)

    def test_empty_json_list(self, tok, tmp_path):
        path = _write(tmp_path / "e.json", "[]")
        with pytest.raises(ValueError, match=r"e\.json.*no calibration samples"):
            load_calibration(path, tok, seqlen=4, nsamples=1)

    def test_empty_list(self, tok):
        with pytest.raises(ValueError, match="no calibration samples"):
            load_calibration([], tok, seqlen=4, nsamples=1)

    def test_unsupported_suffix(self, tok, tmp_path):
        path = _write(tmp_path / "c.csv", "a,b\n")
        with pytest.raises(ValueError, match=r"\.csv"):
            load_calibration(f"'{path}'", tok, seqlen=4, nsamples=1)

    def test_split_on_local_file(self, tok, tmp_path):
        path = _write(tmp_path / "c.txt", "hello world")
        with pytest.raises(ValueError, match="hub datasets only"):
            load_calibration(f"{path}:split=train", tok, seqlen=4, nsamples=1)


class TestHub:
    def _fake_datasets(self, monkeypatch, load_dataset):
        module = types.ModuleType("datasets")
        module.load_dataset = load_dataset
        monkeypatch.setitem(sys.modules, "datasets", module)

    def test_offline_without_datasets_package_is_fast(self, tok, monkeypatch):
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setitem(sys.modules, "datasets", None)  # behaves as "not installed"
        start = time.monotonic()
        with pytest.raises(ImportError) as err:
            load_calibration("NeelNanda/pile-10k", tok, seqlen=8, nsamples=2)
        assert time.monotonic() - start < 5
        assert "local file" in str(err.value) and "pip install" in str(err.value)

    def test_offline_with_datasets_is_fast(self, tok, monkeypatch):
        def load_dataset(name, split):
            raise ConnectionError("Couldn't reach the Hub (offline mode is enabled)")

        self._fake_datasets(monkeypatch, load_dataset)
        monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
        monkeypatch.setattr(sources_mod, "_hub_reachable", lambda *a: pytest.fail("offline: no probe expected"))
        start = time.monotonic()
        with pytest.raises(HubUnavailableError) as err:
            load_calibration("NeelNanda/pile-10k:num=4", tok, seqlen=8, nsamples=2)
        assert time.monotonic() - start < 5
        assert "HF_DATASETS_OFFLINE" in str(err.value) and "local file" in str(err.value)

    def test_unreachable_hub_is_fast(self, tok, monkeypatch):
        self._fake_datasets(monkeypatch, lambda *a, **k: pytest.fail("must not try to download"))
        for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: refused at once
        start = time.monotonic()
        with pytest.raises(HubUnavailableError, match="local file"):
            load_calibration("NeelNanda/pile-10k", tok, seqlen=8, nsamples=2)
        assert time.monotonic() - start < 5

    def test_hub_rows_read_through_datasets(self, tok, monkeypatch):
        calls = []

        class Table:
            column_names = ("meta", "text")

            def __getitem__(self, column):
                return [_text(30, i) for i in range(3)]

        def load_dataset(name, split):
            calls.append((name, split))
            return Table()

        self._fake_datasets(monkeypatch, load_dataset)
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # cached copy: no probe
        calib = load_calibration("owner/name:split=train+validation", tok, seqlen=16, nsamples=4)
        assert calls == [("owner/name", "train"), ("owner/name", "validation")]
        assert len(calib) == 4 and calib.sources == ["owner/name"] * 4

    def test_hub_without_text_column(self, tok, monkeypatch):
        class Table:
            column_names = ("a", "b")

        self._fake_datasets(monkeypatch, lambda name, split: Table())
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        with pytest.raises(ValueError, match=r"no text column.*\['a', 'b'\]|no text column.*\('a', 'b'\)"):
            load_calibration("owner/name", tok, seqlen=16, nsamples=4)
