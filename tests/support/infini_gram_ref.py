"""Answers a list of queries with infini-gram's own engine (the `infini-gram` wheel from PyPI).

usage: infini_gram_ref.py INDEX_DIR QUERIES.json EOS_TOKEN_ID  (results as one JSON list on stdout)
"""
import json
import sys

from infini_gram.engine import InfiniGramEngine

index_dir, queries_path, eos = sys.argv[1], sys.argv[2], int(sys.argv[3])
engine = InfiniGramEngine(index_dir=index_dir, eos_token_id=eos, precompute_unigram_logprobs=True)
out = []
with open(queries_path) as f:
    queries = json.load(f)
for q in queries:
    kind = q["kind"]
    if kind == "find":
        r = engine.find(input_ids=q["ids"])
        r["segment_by_shard"] = [list(s) for s in r["segment_by_shard"]]
    elif kind == "count":
        r = engine.count(input_ids=q["ids"])
    elif kind == "prob":
        r = engine.prob(prompt_ids=q["ids"], cont_id=q["cont"])
    elif kind == "ntd":
        r = engine.ntd(prompt_ids=q["ids"], max_support=q["max_support"])
        r["result_by_token_id"] = {str(t): v for t, v in r["result_by_token_id"].items()}
    elif kind == "infgram_prob":
        r = engine.infgram_prob(prompt_ids=q["ids"], cont_id=q["cont"])
    elif kind == "infgram_ntd":
        r = engine.infgram_ntd(prompt_ids=q["ids"], max_support=q["max_support"])
        r["result_by_token_id"] = {str(t): v for t, v in r["result_by_token_id"].items()}
    elif kind == "doc":
        r = engine.get_doc_by_rank(s=q["s"], rank=q["rank"], max_disp_len=q["max_disp_len"])
        r.pop("blocked", None)
    elif kind == "attribute":
        r = engine.attribute(input_ids=q["ids"], delim_ids=q["delim"], min_len=q["min_len"],
                             max_cnt=q["max_cnt"], enforce_bow=False)
        r = {"spans": [dict(s, docs=[dict(d) for d in s["docs"]]) for s in r["spans"]]}
    else:
        raise ValueError(kind)
    if "error" in r:
        raise SystemExit(f"infini-gram refused {q}: {r['error']}")
    out.append(r)
json.dump(out, sys.stdout)
