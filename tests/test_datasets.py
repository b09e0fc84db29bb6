"""Dataset loaders: both CounterFact schemas, zsRE, malformed records, data dirs, downloads.

Every fixture file is written into tmp_path; downloads go to a local http.server thread.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import http.server
import json
import logging
import threading
from pathlib import Path

import pytest

from evals import sources
from evals.cases import DatasetError
from evals.datasets import load_counterfact, load_zsre
from evals.formats import parse_counterfact, parse_zsre

ROME = [
    {"case_id": 7, "pararel_idx": 1,
     "requested_rewrite": {"prompt": "The mother tongue of {} is", "relation_id": "P103",
                           "target_new": {"str": "English", "id": "Q1860"},
                           "target_true": {"str": "French", "id": "Q150"}, "subject": "Danielle Darrieux"},
     "paraphrase_prompts": ["Shayna does this. Danielle Darrieux speaks", "Darrieux fact. Danielle Darrieux writes in"],
     "neighborhood_prompts": ["Michel Rocard is a native speaker of", "Jean Renoir speaks"],
     "attribute_prompts": ["J.R.R. Tolkien is a native speaker of"],
     "generation_prompts": ["Danielle Darrieux's mother tongue is", "Where Danielle Darrieux is from, people speak"]},
    {"case_id": 9, "pararel_idx": 2,
     "requested_rewrite": {"prompt": "{} is located in", "relation_id": "P30",
                           "target_new": {"str": "Antarctica", "id": "Q51"},
                           "target_true": {"str": "Africa", "id": "Q15"}, "subject": "Angola"},
     "paraphrase_prompts": ["Angola belongs to the continent of"], "neighborhood_prompts": ["Ghana is in"],
     "attribute_prompts": [], "generation_prompts": ["One can get to Angola by navigating"]},
]
MEND_CF = [
    {"case_id": 0, "prompt": "The mother tongue of Danielle Darrieux is", "target_new": "English",
     "subject": "Danielle Darrieux", "ground_truth": "French",
     "rephrase_prompt": "Where Danielle Darrieux is from, people speak the language of",
     "locality_prompt": "Michel Rocard is a native speaker of", "locality_ground_truth": "French"},
    {"case_id": 4, "prompt": "What is the twin city of Lyon? Lyon's twin is", "target_new": "Manila",
     "subject": "Lyon", "ground_truth": "Beirut", "rephrase_prompt": "People in Lyon's twin city speak",
     "locality_prompt": "The twin city of Trieste is", "locality_ground_truth": "Beirut"},
]
ZSRE = [
    {"subject": "UniFirst", "src": "What is the product made by UniFirst?", "pred": "uniform",
     "rephrase": "What will be the product of UniFirst?", "alt": "unmanned aircraft", "answers": ["uniform"],
     "loc": "nq question: john goodman's character in the big lebowski", "loc_ans": "Walter Sobchak",
     "cond": "uniform >> unmanned aircraft || What is the product made by UniFirst?"},
    {"subject": "WEFS", "src": "When was WEFS established?", "pred": "1998",
     "rephrase": "When has WEFS been established?", "alt": "1997", "answers": ["1987"],
     "loc": "nq question: who voiced gaston", "loc_ans": "Richard White", "cond": "..."},
]


def write(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- formats


def test_counterfact_rome_format(tmp_path):
    cases = load_counterfact(write(tmp_path / "cf.json", ROME))
    assert cases.report.format == "rome" and cases.report.loaded == 2 and not cases.report.skipped
    c = cases[0]
    assert (c.case_id, c.kind, c.relation_id, c.target_new_id) == (7, "counterfact", "P103", "Q1860")
    assert c.fact.prompt == "The mother tongue of {} is" and c.fact.subject == "Danielle Darrieux"
    assert (c.fact.target_new, c.fact.target_true) == ("English", "French")
    assert c.fact.paraphrases == tuple(ROME[0]["paraphrase_prompts"])
    assert c.fact.neighborhood == tuple(ROME[0]["neighborhood_prompts"])
    assert c.generation_prompts == tuple(ROME[0]["generation_prompts"])
    assert c.attribute_prompts == tuple(ROME[0]["attribute_prompts"])
    assert c.fact.id == "counterfact-7" and c.loc_prompt is None


def test_counterfact_mend_format(tmp_path):
    cases = load_counterfact(write(tmp_path / "cf.json", MEND_CF))
    assert cases.report.format == "mend"
    c0, c1 = cases
    assert c0.fact.prompt == "The mother tongue of {} is" and c0.fact.text == MEND_CF[0]["prompt"]
    assert (c0.fact.target_new, c0.fact.target_true) == ("English", "French")
    assert c0.fact.paraphrases == (MEND_CF[0]["rephrase_prompt"],)
    assert c0.fact.neighborhood == (MEND_CF[0]["locality_prompt"],)
    assert c0.generation_prompts == () and c0.relation_id is None
    # only the subject's first occurrence becomes the slot
    assert c1.fact.prompt == "What is the twin city of {}? Lyon's twin is"
    assert c1.fact.text == MEND_CF[1]["prompt"]


def test_counterfact_format_forced_and_undetectable(tmp_path):
    path = write(tmp_path / "cf.json", ROME)
    with pytest.raises(DatasetError, match="record 0 .*field 'subject' is missing"):
        load_counterfact(path, format="mend")
    with pytest.raises(DatasetError, match="cannot tell the CounterFact format"):
        parse_counterfact([{"foo": 1}])
    with pytest.raises(DatasetError, match="unknown CounterFact format"):
        load_counterfact(path, format="easyedit")


def test_zsre_format(tmp_path):
    default = load_zsre(write(tmp_path / "z.json", ZSRE))  # ROME/MEMIT/AlphaEdit: edit to answers[0]
    assert [(c.fact.target_new, c.fact.target_true) for c in default] == [("uniform", None), ("1987", None)]
    cases = load_zsre(tmp_path / "z.json", target="alt")
    c = cases[0]
    assert (c.case_id, c.kind) == (0, "zsre")
    assert c.fact.prompt == "What is the product made by {}?" and c.fact.text == ZSRE[0]["src"]
    assert (c.fact.target_new, c.fact.target_true) == ("unmanned aircraft", "uniform")
    assert c.fact.paraphrases == (ZSRE[0]["rephrase"],)
    assert c.loc_prompt == ZSRE[0]["loc"] + "?"  # ROME/MEMIT append '?'
    assert c.loc_answer == "Walter Sobchak"
    rome_style = load_zsre(tmp_path / "z.json", target="answers", loc_suffix="")
    assert rome_style[1].fact.target_new == "1987" and rome_style[1].fact.target_true is None
    assert rome_style[1].loc_prompt == ZSRE[1]["loc"]
    with pytest.raises(DatasetError, match="unknown zsRE target"):
        load_zsre(tmp_path / "z.json", target="pred")


def test_offset_and_limit_keep_file_indices(tmp_path):
    path = write(tmp_path / "z.json", ZSRE * 3)
    cases = load_zsre(path, offset=2, limit=3)
    assert [c.case_id for c in cases] == [2, 3, 4] and cases.report.records == 3
    assert [c.case_id for c in load_counterfact(write(tmp_path / "cf.json", ROME), limit=1)] == [7]
    with pytest.raises(DatasetError, match="offset and limit"):
        load_zsre(path, offset=-1)


def test_jsonl_and_bad_json(tmp_path):
    path = tmp_path / "z.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ZSRE) + "\n")
    assert len(load_zsre(path)) == 2
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        load_zsre(bad)
    write(tmp_path / "obj.json", {"data": ZSRE})
    with pytest.raises(DatasetError, match="expected a JSON list"):
        load_zsre(tmp_path / "obj.json")


# --------------------------------------------------------------------------- malformed records


def broken_rome():
    records = copy.deepcopy(ROME)
    del records[1]["requested_rewrite"]["target_new"]
    return records


@pytest.mark.parametrize("loader, records, field, fragment", [
    (load_counterfact, broken_rome(), "requested_rewrite.target_new", "is missing"),
    (load_counterfact, [MEND_CF[0], {**MEND_CF[1], "target_new": 5}], "target_new", "must be a string, got int"),
    (load_counterfact, [MEND_CF[0], {**MEND_CF[1], "subject": "Paris"}], "prompt", "does not contain the subject"),
    (load_counterfact, [MEND_CF[0], {**MEND_CF[1], "case_id": 0}], "case_id", "repeats record 0"),
    (load_counterfact, [MEND_CF[0], {**MEND_CF[1], "case_id": "4"}], "case_id", "must be an integer"),
    (load_counterfact, [ROME[0], {**ROME[1], "paraphrase_prompts": "one string"}], "paraphrase_prompts", "list"),
    (load_zsre, [ZSRE[0], {**ZSRE[1], "subject": "KFC"}], "src", "does not contain the subject 'KFC'"),
    (functools.partial(load_zsre, target="alt"), [ZSRE[0], {**ZSRE[1], "alt": ""}], "alt", "is empty"),
    (load_zsre, [ZSRE[0], {**ZSRE[1], "answers": []}], "answers", "is empty but target='answers'"),
    (load_zsre, [ZSRE[0], {**ZSRE[1], "answers": "1987"}], "answers", "list of strings"),
    (load_zsre, [ZSRE[0], ["not", "an", "object"]], "(record)", "not a JSON object"),
])
def test_malformed_record_error_names_file_record_and_field(tmp_path, loader, records, field, fragment):
    path = write(tmp_path / "data.json", records)
    with pytest.raises(DatasetError) as info:
        loader(path)
    msg = str(info.value)
    assert str(path) in msg and "record 1" in msg and f"field {field!r}" in msg and fragment in msg
    assert "skip_invalid=True" in msg
    if loader is load_counterfact and "case_id" in records[1] and isinstance(records[1]["case_id"], int):
        assert f"case_id {records[1]['case_id']}" in msg


def test_template_with_braces_is_rejected():
    rec = {**ZSRE[0], "src": "What is {the} product made by UniFirst?"}
    with pytest.raises(DatasetError, match="literal"):
        parse_zsre([rec])


def test_skip_invalid_counts_and_logs(tmp_path, caplog):
    records = [ZSRE[0], {**ZSRE[1], "alt": ""}, {**ZSRE[0], "subject": "Nobody"}, ZSRE[1], {"src": "x"}]
    with caplog.at_level(logging.WARNING, logger="evals.formats"):
        cases = load_zsre(write(tmp_path / "z.json", records), skip_invalid=True, target="alt")
    assert [c.case_id for c in cases] == [0, 3]
    report = cases.report
    assert (report.records, report.loaded, len(report.skipped)) == (5, 2, 3)
    assert [(s.index, s.field) for s in report.skipped] == [(1, "alt"), (2, "src"), (4, "subject")]
    assert "skipped 3" in report.summary() and "skipped 3" in caplog.text


# --------------------------------------------------------------------------- data dir and sources


def make_data_dir(root: Path) -> Path:
    write(root / "counterfact_rome" / "counterfact_rome_test2191.json", ROME)
    write(root / "counterfact" / "counterfact-edit.json", MEND_CF)
    write(root / "counterfact" / "counterfact-train.json", MEND_CF[:1])
    write(root / "zsre" / "zsre_mend_train-1k.json", ZSRE)
    write(root / "zsre_eval_subset" / "zsre_mend_eval_subset19.json", ZSRE[:1])
    return root


def test_data_dir_from_env_var(tmp_path, monkeypatch):
    root = make_data_dir(tmp_path / "data")
    monkeypatch.setenv("NEURALDB_DATA_DIR", str(root))
    eval_cf = load_counterfact()
    assert eval_cf.report.format == "rome" and eval_cf.report.source.endswith("counterfact_rome_test2191.json")
    assert load_counterfact(split="train").report.source.endswith("counterfact-train.json")
    assert len(load_zsre()) == 1 and len(load_zsre(split="train")) == 2
    (root / "counterfact_rome" / "counterfact_rome_test2191.json").unlink()
    assert load_counterfact().report.format == "mend"  # MEND-format fallback
    with pytest.raises(DatasetError, match="unknown zsre split"):
        load_zsre(split="test")


def test_data_dir_argument_wins_over_env(tmp_path, monkeypatch):
    monkeypatch.setenv("NEURALDB_DATA_DIR", str(tmp_path / "nowhere"))
    root = make_data_dir(tmp_path / "data")
    assert len(load_zsre(data_dir=root, split="train")) == 2
    with pytest.raises(DatasetError, match="no zsre eval file in data dir"):
        load_zsre()  # env dir has no files: an error, never a silent download


def test_source_path_and_file_url(tmp_path, monkeypatch):
    monkeypatch.delenv("NEURALDB_DATA_DIR", raising=False)
    path = write(tmp_path / "z.json", ZSRE)
    assert len(load_zsre(path.as_uri())) == 2
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert len(load_zsre(str(path), sha256=digest)) == 2
    with pytest.raises(DatasetError, match="does not match sha256"):
        load_zsre(path, sha256="0" * 64)
    with pytest.raises(DatasetError, match="is not a file"):
        load_zsre(tmp_path / "missing.json")


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass


@pytest.fixture()
def http_root(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_download_url_with_checksum(http_root, tmp_path):
    root, base = http_root
    body = write(root / "counterfact.json", ROME).read_bytes()
    cache = tmp_path / "cache"
    cases = load_counterfact(f"{base}/counterfact.json", sha256=hashlib.sha256(body).hexdigest(), cache_dir=cache)
    assert len(cases) == 2
    (cached,) = [p for p in cache.iterdir()]
    assert cached.read_bytes() == body and cached.name.endswith("-counterfact.json")
    (root / "counterfact.json").unlink()  # second load comes from the cache
    assert len(load_counterfact(f"{base}/counterfact.json", cache_dir=cache,
                                sha256=hashlib.sha256(body).hexdigest())) == 2


def test_download_checksum_mismatch_keeps_nothing(http_root, tmp_path):
    root, base = http_root
    write(root / "z.json", ZSRE)
    cache = tmp_path / "cache"
    with pytest.raises(DatasetError, match="has sha256 .* expected"):
        load_zsre(f"{base}/z.json", sha256="0" * 64, cache_dir=cache)
    assert list(cache.iterdir()) == []  # no partial or unverified file left
    with pytest.raises(DatasetError, match="could not download .*404"):
        load_zsre(f"{base}/missing.json", cache_dir=cache)
    assert list(cache.iterdir()) == []


def test_default_public_download(http_root, tmp_path, monkeypatch):
    root, base = http_root
    body = write(root / "zsre_mend_eval.json", ZSRE).read_bytes()
    monkeypatch.delenv("NEURALDB_DATA_DIR", raising=False)
    monkeypatch.setenv("NEURALDB_CACHE_DIR", str(tmp_path / "cache"))
    remote = sources.RemoteFile(f"{base}/zsre_mend_eval.json", "zsre_mend_eval.json", records=2, size=len(body))
    monkeypatch.setitem(sources.PUBLIC_FILES, "zsre", remote)
    assert len(load_zsre()) == 2
    cached = tmp_path / "cache" / "zsre_mend_eval.json"
    recorded = (tmp_path / "cache" / "zsre_mend_eval.json.sha256").read_text().strip()
    assert recorded == hashlib.sha256(body).hexdigest()  # trust on first use
    cached.write_bytes(body.replace(b"1997", b"1998"))  # same size, different content
    with pytest.raises(DatasetError, match="does not match sha256"):
        load_zsre()
    with pytest.raises(DatasetError, match="no public zsre train file"):
        load_zsre(split="train")


def test_default_download_size_mismatch(http_root, tmp_path, monkeypatch):
    root, base = http_root
    write(root / "counterfact.json", ROME)
    monkeypatch.delenv("NEURALDB_DATA_DIR", raising=False)
    monkeypatch.setitem(sources.PUBLIC_FILES, "counterfact",
                        sources.RemoteFile(f"{base}/counterfact.json", "counterfact.json", records=2, size=45_108_470))
    with pytest.raises(DatasetError, match="expected 45108470"):
        load_counterfact(cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_public_table_records_rome_urls():
    assert sources.PUBLIC_FILES["counterfact"].url == "https://rome.baulab.info/data/dsets/counterfact.json"
    assert sources.PUBLIC_FILES["counterfact"].size == 45_108_470
    assert sources.PUBLIC_FILES["zsre"].url.endswith("/zsre_mend_eval.json")


# --------------------------------------------------------------------------- the shared data

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} is absent")
def test_shared_data_loads(monkeypatch):
    monkeypatch.setenv("NEURALDB_DATA_DIR", str(SHARED))
    cf = load_counterfact()
    assert cf.report.format == "rome" and len(cf) == 2191 and not cf.report.skipped
    assert all(len(c.fact.paraphrases) == 2 and len(c.fact.neighborhood) == 10 for c in cf)
    assert sum(len(c.generation_prompts) for c in cf) == 21910
    assert len(load_counterfact(split="train")) == 10000
    assert len(load_zsre()) == 19
    with pytest.raises(DatasetError, match="'alt' is empty"):
        load_zsre(split="train", target="alt")
    train = load_zsre(split="train", skip_invalid=True, target="alt")
    assert (len(train), len(train.report.skipped)) == (998, 2)
    assert len(load_zsre(split="train")) == 1000  # default target="answers"


# --------------------------------------------------------------------------- Hugging Face datasets
# Records come from the shared data dir (NEURALDB_DATA_DIR); Datasets are built in memory; no test
# contacts the hub: load_dataset is monkeypatched and the endpoint probe goes to a local server.

datasets = pytest.importorskip("datasets")
from evals import hf_datasets  # noqa: E402
from evals.datasets import load_any  # noqa: E402

N = 12
SHARED_FILES = {  # (loader, file under the data dir, format)
    "rome": (load_counterfact, "counterfact_rome/counterfact_rome_test2191.json", "rome"),
    "mend": (load_counterfact, "counterfact/counterfact-edit.json", "mend"),
    "zsre": (load_zsre, "zsre/zsre_mend_train-1k.json", "mend"),
}


def shared_records(shared_data: Path, name: str, n: int = N) -> list:
    return json.loads((shared_data / SHARED_FILES[name][1]).read_text(encoding="utf-8"))[:n]


@pytest.fixture()
def online(monkeypatch, http_root):
    """Online as far as the loaders can tell: no offline flags, the hub endpoint a local server."""
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", http_root[1])


@pytest.mark.parametrize("name", sorted(SHARED_FILES))
def test_dataset_input_gives_the_json_cases(shared_data, tmp_path, name):
    loader, _, fmt = SHARED_FILES[name]
    records = shared_records(shared_data, name)
    from_json = loader(write(tmp_path / "data.json", records))
    ds = datasets.Dataset.from_list(records)
    cases = loader(ds)
    assert cases == from_json and len(cases) == N and cases.report.format == fmt
    assert cases.report.source == "datasets.Dataset" and cases.report.loaded == N
    assert [c.fact.paraphrases for c in cases] == [c.fact.paraphrases for c in from_json]
    assert load_any(ds) == from_json
    window = loader(ds, offset=3, limit=4)
    assert window == from_json[3:7] and window.report.records == 4
    assert [c.case_id for c in window] == [c.case_id for c in from_json[3:7]]  # zsRE: index in the Dataset
    assert loader(ds.to_iterable_dataset(), offset=3, limit=4) == from_json[3:7]


@pytest.mark.parametrize("name", sorted(SHARED_FILES))
def test_dataset_dict_split(shared_data, name):
    loader = SHARED_FILES[name][0]
    records = shared_records(shared_data, name)
    dd = datasets.DatasetDict(train=datasets.Dataset.from_list(records[:8]),
                              test=datasets.Dataset.from_list(records[8:]))
    test = loader(dd, split="test")
    assert len(test) == N - 8 and test.report.source == "datasets.DatasetDict['test']"
    assert test == loader(datasets.Dataset.from_list(records[8:]))
    assert len(loader(dd, split="train")) == 8
    with pytest.raises(DatasetError, match=r"no split 'eval'; available splits: \['test', 'train'\]"):
        loader(dd)  # the default split="eval" is not among them
    with pytest.raises(DatasetError, match="no split 'validation'"):
        load_any(dd, split="validation")


def test_hub_id_loads_with_load_dataset(shared_data, monkeypatch, online):
    records = shared_records(shared_data, "rome")
    calls = []

    def fake_load_dataset(path, split=None, **kw):
        calls.append((path, split, kw))
        return datasets.Dataset.from_list(records)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    cases = load_counterfact("azhx/counterfact", split="test", limit=5)
    assert calls == [("azhx/counterfact", "test", {})]
    assert cases == load_counterfact(datasets.Dataset.from_list(records), limit=5)
    assert cases.report.source == "azhx/counterfact['test']" and cases.report.format == "rome"
    assert load_any("azhx/counterfact", split="test").report.loaded == N

    def failing(path, split=None, **kw):
        raise ValueError('Unknown split "eval". Should be one of [\'train\', \'test\'].')

    monkeypatch.setattr(datasets, "load_dataset", failing)
    with pytest.raises(DatasetError, match="could not load hub dataset 'azhx/counterfact' split 'eval'.*Unknown split"):
        load_counterfact("azhx/counterfact")
    with pytest.raises(DatasetError, match="sha256= checks a file"):
        load_zsre("org/zsre", sha256="0" * 64)


def refuse_hub(*args, **kwargs):
    raise AssertionError("the hub must not be called")


@pytest.mark.parametrize("flag", ["HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"])
def test_hub_id_offline_fails_fast(monkeypatch, flag):
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv(flag, "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # never probed: the flag is checked first
    monkeypatch.setattr(datasets, "load_dataset", refuse_hub)
    with pytest.raises(DatasetError) as info:
        load_zsre("org/zsre-mend", split="train")
    msg = str(info.value)
    assert "'org/zsre-mend'" in msg and flag in msg and "local file" in msg and "data_dir=" in msg


def test_hub_id_unreachable_fails_fast(monkeypatch, online):
    import socket
    import time

    with socket.socket() as s:  # a local port with nobody listening: connection refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(datasets, "load_dataset", refuse_hub)
    start = time.monotonic()
    with pytest.raises(DatasetError, match="'azhx/counterfact' cannot be loaded: .* did not answer.*local file"):
        load_counterfact("azhx/counterfact", split="test")
    assert time.monotonic() - start < hf_datasets.PROBE_TIMEOUT


def test_hub_id_is_only_an_org_name_string(tmp_path, monkeypatch):
    assert hf_datasets.is_hub_id("azhx/counterfact") and hf_datasets.is_hub_id("org/name.v2")
    for text in ("counterfact", "zsre", "data/cf.json", "data/z.jsonl", "./org/name", "/abs/path", "a/b/c",
                 "https://example.org/x", "org/../name"):
        assert not hf_datasets.is_hub_id(text), text
    assert not hf_datasets.is_hub_id(Path("org/name"))
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "org" / "name", ZSRE)
    assert not hf_datasets.is_hub_id("org/name")  # an existing path wins
    assert len(load_zsre("org/name")) == 2
    with pytest.raises(DatasetError, match="is not a file"):
        load_zsre("data/missing.json")  # a missing file stays a file error, offline as before


@pytest.mark.parametrize("name", sorted(SHARED_FILES))
def test_to_dataset_round_trip(shared_data, tmp_path, name):
    loader = SHARED_FILES[name][0]
    cases = loader(write(tmp_path / "data.json", shared_records(shared_data, name)))
    ds = cases.to_dataset()
    assert len(ds) == N and set(hf_datasets.FEATURE_TYPES) == set(ds.column_names)
    row, c = ds[0], cases[0]
    assert (row["case_id"], row["kind"], row["subject"], row["prompt"]) == (c.case_id, c.kind, c.fact.subject,
                                                                            c.fact.prompt)
    assert (row["target_new"], row["target_true"]) == (c.fact.target_new, c.fact.target_true)
    assert row["paraphrases"] == list(c.fact.paraphrases) and row["neighborhood"] == list(c.fact.neighborhood)
    assert cases.report.summary() == ds.info.description
    back = loader(ds)
    assert back == cases and back.report.format == "evalcase"
    assert [b.fact.meta for b in back] == [c.fact.meta for c in cases]  # meta is not compared by ==
    assert [b.fact.id for b in back] == [c.fact.id for c in cases]
    assert load_any(ds) == cases
    ds.to_json(tmp_path / "cases.jsonl")  # the JSON export loads too
    assert loader(tmp_path / "cases.jsonl") == cases
    other = load_zsre if loader is load_counterfact else load_counterfact
    with pytest.raises(DatasetError, match="record 0 .*field 'kind' is"):
        other(ds)


def test_zsre_round_trip_keeps_targets(shared_data, tmp_path):
    cases = load_zsre(write(tmp_path / "z.json", shared_records(shared_data, "zsre")), target="alt", loc_suffix="")
    assert load_zsre(cases.to_dataset()) == cases  # the rows' targets, not the default target="answers"
    assert all(b.loc_prompt == c.loc_prompt for b, c in zip(load_zsre(cases.to_dataset()), cases))


def test_to_dataset_of_an_empty_selection():
    ds = parse_zsre([]).to_dataset()
    assert len(ds) == 0 and ds.features["paraphrases"].feature.dtype == "string"
    assert len(load_zsre(ds)) == 0


def test_malformed_dataset_records(shared_data):
    rome = shared_records(shared_data, "rome", 3)
    rome[1] = copy.deepcopy(rome[1])
    del rome[1]["requested_rewrite"]["target_new"]  # Arrow fills it with None: read as missing
    with pytest.raises(DatasetError) as info:
        load_counterfact(datasets.Dataset.from_list(rome))
    msg = str(info.value)
    assert msg.startswith("datasets.Dataset: record 1 (case_id") and "'requested_rewrite.target_new' is missing" in msg
    mend = shared_records(shared_data, "mend", 4)
    mend[2] = {**mend[2], "subject": "Nobody Anywhere"}
    mend[3] = {**mend[3], "target_new": ""}
    dd = datasets.DatasetDict(test=datasets.Dataset.from_list(mend))
    with pytest.raises(DatasetError, match=r"DatasetDict\['test'\]: record 2 .*field 'prompt' does not contain"):
        load_counterfact(dd, split="test")
    cases = load_counterfact(dd, split="test", skip_invalid=True)
    assert len(cases) == 2 and [(s.index, s.field) for s in cases.report.skipped] == [(2, "prompt"), (3, "target_new")]
    zs = shared_records(shared_data, "zsre", 3)
    zs[0] = {**zs[0], "alt": None}
    with pytest.raises(DatasetError, match="record 0: field 'alt' is missing"):
        load_zsre(datasets.Dataset.from_list(zs), target="alt")
    assert load_zsre(datasets.Dataset.from_list(zs), target="alt", skip_invalid=True).report.loaded == 2
    rows = load_zsre(datasets.Dataset.from_list(zs)).to_dataset().to_list()
    rows[1]["prompt"] = "no slot here"
    with pytest.raises(DatasetError, match="record 1 .*field 'prompt' must contain exactly one"):
        load_zsre(datasets.Dataset.from_list(rows))


def test_datasets_is_imported_only_when_needed(shared_data):
    import subprocess
    import sys

    code = ("import sys; from evals.datasets import load_counterfact, load_zsre; "
            f"load_counterfact(data_dir={str(shared_data)!r}, limit=2); load_zsre(data_dir={str(shared_data)!r}); "
            "assert 'datasets' not in sys.modules, 'datasets was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
