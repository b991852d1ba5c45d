"""Chat records: the model's own template, and only the assistant turns carry labels (issue 23).

Tokenizer folders are made here: a small byte-level BPE with the special tokens and the chat
template of Llama-3-Instruct and of Qwen2.5-Instruct (their tokenizer_config.json templates).
"""

import json
from pathlib import Path

import numpy as np
import pytest
from longctx.data.sources import DataError, iter_records
from longctx.data.tokenize import ByteTokenizer, HFTokenizer, tokenize_to_cache
from longctx.parallel.mesh import Mesh
from longctx.recipes import schema
from longctx.train.build import build_data

TINY = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
QWEN25 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""
TEMPLATES = {
    "llama3": (LLAMA3, ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"],
               "<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>"),
    "qwen2.5": (QWEN25, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", "<|im_end|>\n"),
}
WORDS = "the quick brown fox jumps over lazy dog hello world river stone light seven blue green".split()


def make_tokenizer(folder: Path, kind: str) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    template, specials, bos, eos, _ = TEMPLATES[kind]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(WORDS)] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos)
    fast.chat_template = template
    fast.save_pretrained(folder)
    return folder


def conversations(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)

    def text(k):
        return " ".join(rng.choice(WORDS, k))

    out = []
    for i in range(n):
        if i % 3 == 0:  # prompt/response records
            out.append({"prompt": text(int(rng.integers(5, 30))), "response": text(int(rng.integers(2, 12)))})
            continue
        msgs = [{"role": "system", "content": "answer " + text(3)}] if i % 2 else []
        for _ in range(int(rng.integers(1, 4))):
            msgs += [{"role": "user", "content": text(int(rng.integers(5, 40)))},
                     {"role": "assistant", "content": text(int(rng.integers(2, 15)))}]
        out.append({"messages": msgs})
    return out


def replies(record: dict) -> list[str]:
    if "response" in record:
        return [record["response"]]
    return [m["content"] for m in record["messages"] if m["role"] == "assistant"]


@pytest.fixture(params=["llama3", "qwen2.5"])
def chat_setup(request, tmp_path):
    folder = make_tokenizer(tmp_path / "tok", request.param)
    records = conversations(24)
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in records))
    return request.param, folder, records, data


def _build(folder, data, tmp_path, *overrides):
    recipe = schema.load(TINY, [f"model.tokenizer={folder}", f"data.source={data}", "data.max_documents=null",
                                f"run.dir={tmp_path / 'run'}", "data.cache=false", *overrides])
    import torch

    return build_data(recipe, None, Mesh(0, 1, 0, 1, None, torch.device("cpu")), 512)[0]


def test_only_assistant_tokens_carry_labels(chat_setup, tmp_path):
    """Whole conversations in rows (packed documents): the labelled targets of each row, decoded,
    are exactly the rows' assistant replies with their end-of-turn markup, in order."""
    kind, folder, records, data = chat_setup
    tok = HFTokenizer(folder)
    end = TEMPLATES[kind][4]
    source = _build(folder, data, tmp_path, "data.batching=packed_docs", "data.seq_len=1024", "train.batch_size=2",
                    "~data.min_len", "~data.max_len", "~data.tokens_per_step")
    rows = source.rows
    seen = 0
    for r in range(len(rows.pieces)):
        labels = rows.labels(r)
        for k, (d, start) in enumerate(rows.pieces[r]):
            assert start == 0  # conversations shorter than a row stay whole
            piece = rows.doc_ids[r] == k
            targets = labels[piece][labels[piece] != -100]
            want = "".join(reply.strip() + end for reply in replies(records[d]))  # documents are records, in order
            assert tok.decode(targets) == want
            seen += 1
    assert seen == len(records)


@pytest.mark.parametrize("batching", ["decompose", "pack"])
def test_decompose_and_pack_label_only_reply_tokens(chat_setup, tmp_path, batching):
    """Pieces and rows cut conversations anywhere: every label is still a reply token, and every
    reply token inside a row (but its first, which has no input before it) is a label."""
    kind, folder, records, data = chat_setup
    tok = HFTokenizer(folder)
    end = TEMPLATES[kind][4]
    reply_text = [rep.strip() + end for rec in records for rep in replies(rec)]
    extra = ["data.min_len=16", "data.max_len=64", "data.tokens_per_step=512", "data.short_pieces=pad"] \
        if batching == "decompose" else ["data.batching=pack", "data.seq_len=64", "train.batch_size=4",
                                         "~data.min_len", "~data.max_len", "~data.tokens_per_step"]
    source = _build(folder, data, tmp_path, *extra)
    labelled = total = 0
    for step in range(6):
        inputs, labels = source.step_batch(step)[:2]
        if batching == "decompose":  # each row's labels are its piece's next tokens where the stored mask is 1
            L, pieces, _ = source.sampler.batch_at(step, sp_rank=0)
            for row_lab, s, n in zip(labels, source.buckets.starts[L][pieces], source.buckets.lengths[L][pieces]):
                after = slice(int(s) + 1, int(s) + int(n) + 1)
                want = np.where(np.asarray(source.loss_mask[after]) > 0, np.asarray(source.tokens[after], dtype=np.int64), -100)
                assert np.array_equal(row_lab[:n], want) and (row_lab[n:] == -100).all()
        for row_in, row_lab in zip(inputs, labels):
            keep = row_lab != -100
            labelled += int(keep.sum())
            total += len(row_lab)
            # maximal runs of labelled targets decode to pieces of replies
            runs = np.split(np.arange(len(row_lab)), np.flatnonzero(np.diff(keep.astype(int))) + 1)
            for run in runs:
                if keep[run[0]]:
                    text = tok.decode(row_lab[run])
                    assert any(text in rep for rep in reply_text), text
    assert 0 < labelled < total


def test_train_on_all_labels_every_token(chat_setup, tmp_path):
    _, folder, _, data = chat_setup
    source = _build(folder, data, tmp_path, "data.train_on=all", "data.batching=pack", "data.seq_len=64",
                    "train.batch_size=4", "~data.min_len", "~data.max_len", "~data.tokens_per_step")
    assert (source.step_batch(0)[1] != -100).all()


def test_chat_records_without_a_template_exit_cleanly(tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"prompt": "a", "response": "b"}))
    with pytest.raises(DataError, match="no chat template"):
        tokenize_to_cache(ByteTokenizer(), lambda: iter_records(str(data)), "x", None, progress=False)


def test_malformed_messages_name_the_file(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "narrator", "content": "x"}]}))
    with pytest.raises(DataError, match="bad.jsonl.*role"):
        list(iter_records(str(data)))


def test_records_without_a_reply_are_skipped_with_a_warning(tmp_path):
    data = tmp_path / "c.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in [
        {"messages": [{"role": "user", "content": "only a question"}]},
        {"prompt": "q", "response": "a"}]))
    with pytest.warns(UserWarning, match="skipped 1 record"):
        got = list(iter_records(str(data)))
    assert got == [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]]


def test_longqa_answer_is_far_back_and_only_it_trains(smollm2_dir):
    from longctx.data.longqa import records

    tok = HFTokenizer(smollm2_dir)
    for conv in list(records(n=5)):
        context, answer = conv[0]["content"], conv[1]["content"]
        question = context.rsplit("\n\n", 1)[1]
        title = question.split(" of ", 1)[1].split(" say?")[0]
        at = context.index(f"## {title}\n")
        headings = context.count("\n## ") + 1
        assert context[at:].count("## ") >= 0.75 * headings - 1  # in the first quarter of the chapters
        assert answer in context[at:].split("\n\n## ")[0]  # answered from that chapter
        ids, mask = tok.encode_chat(conv)
        assert tok.decode(ids[mask > 0]) == answer + "<|im_end|>\n"


def _long_prompts_recipe(tmp_path, n: int, *overrides):
    """`n` conversations of a 120-word prompt and a one-word reply, rows of 64 tokens: many rows
    and pieces hold prompt tokens only."""
    folder = make_tokenizer(tmp_path / "tok", "llama3")
    rng = np.random.default_rng(0)
    records = [{"prompt": " ".join(rng.choice(WORDS, 120)), "response": "seven"} for _ in range(n)]
    data = tmp_path / "long_prompts.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in records))
    return schema.load(TINY, [f"model.tokenizer={folder}", f"data.source={data}", "data.max_documents=null",
                              "model.config.vocab_size=512", f"run.dir={tmp_path / 'run'}", "data.min_len=16",
                              "data.max_len=64", "data.tokens_per_step=64", *overrides])


def test_a_step_whose_rows_hold_only_prompt_tokens_is_skipped_not_nan(tmp_path):
    """Decomposition cuts long conversations: a piece (and a step of one row) can hold only prompt
    tokens. Such a step has no label to learn from: it is skipped (no update), not a 0/0 loss."""
    import torch
    from longctx.train.build import build
    from longctx.train.trainer import train

    run = build(_long_prompts_recipe(tmp_path, 6, "data.curriculum=natural", "data.short_pieces=pad",
                                     "train.max_steps=12", "train.warmup_steps=1"))
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    history = train(run)["history"]
    skipped = [h for h in history if h.get("skipped") == "no labels"]
    assert skipped and len(skipped) < len(history)
    assert all(h["step_tokens"] == 0 for h in skipped)
    assert all(np.isfinite(h["loss"]) for h in history if h not in skipped)
    assert any(not torch.equal(v, before[k]) for k, v in run.model.state_dict().items())
    # metrics.jsonl stays strict JSON (no NaN token): a skipped step's loss is null
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}")) for line in lines]
    assert len(records) == len(history)
    assert all(r["loss"] is None and r["grad_norm"] is None for r in records if r.get("skipped"))


def test_held_out_rows_without_a_label_give_a_null_eval_loss_not_nan(tmp_path, caplog):
    """Held-out chat rows can be all prompt (data.train_on=assistant): evaluation then has no
    token to score. It says so and reports null, where 0/0 gave NaN."""
    import logging

    from longctx.train.build import build
    from longctx.train.trainer import evaluate

    run = build(_long_prompts_recipe(tmp_path, 12, "eval.every=1", "eval.batches=1", "data.eval_fraction=0.25",
                                     "eval.seq_len=64"))
    real = run.eval_data.step_batch

    def with_labels(value):
        def batch(i):
            inputs, labels, *rest = real(i)
            return (inputs, np.full_like(np.asarray(labels), value) if value is not None else np.asarray(inputs), *rest)
        return batch

    run.eval_data.step_batch = with_labels(None)  # every token a label: a loss
    assert np.isfinite(evaluate(run))
    run.eval_data.step_batch = with_labels(-100)  # no label
    with caplog.at_level(logging.WARNING):
        assert evaluate(run) is None
    assert "hold no label" in caplog.text


def test_prompt_tokens_are_what_inference_feeds_the_model(chat_setup):
    """Segments are tokenized apart, so the prompt's ids are exactly those of the same prompt
    rendered with the generation prompt (what the model sees before it replies), even when the
    reply starts with whitespace that BPE would merge with the header's newline."""
    kind, folder, _, _ = chat_setup
    tok = HFTokenizer(folder)
    for reply in ("\n  the lazy dog\n", " fox", "seven"):
        msgs = [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": reply}]
        ids, mask = tok.encode_chat(msgs)
        prompt = tok._tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
        want = tok._tok(prompt, add_special_tokens=False)["input_ids"]
        n = int(np.argmax(mask > 0))
        assert ids[:n].tolist() == want and mask[:n].sum() == 0 and mask[n:].all()
        end = TEMPLATES[kind][4]
        assert tok.decode(ids[n:]) == (reply.strip() if kind == "llama3" else reply) + end


def test_pack_labels_are_exactly_the_next_reply_tokens(chat_setup, tmp_path):
    """Concat-and-chunk rows: every label is the next token where that token is a reply's, and
    -100 elsewhere, against the conversations encoded one by one."""
    _, folder, records, data = chat_setup
    tok = HFTokenizer(folder)
    encoded = [tok.encode_chat(__import__("longctx.data.chat", fromlist=["x"]).messages_of(r)) for r in records]
    stream = np.concatenate([ids for ids, _ in encoded])
    mask = np.concatenate([m for _, m in encoded])
    source = _build(folder, data, tmp_path, "data.batching=pack", "data.seq_len=64", "train.batch_size=4",
                    "~data.min_len", "~data.max_len", "~data.tokens_per_step")
    for step in range(5):
        ids = source.rows.step_ids(step, 4, 0, 1)
        inputs, labels = source.step_batch(step)[:2]
        for row, r in enumerate(ids.tolist()):
            lo = r * 65
            assert inputs[row].tolist() == stream[lo:lo + 64].tolist()
            want = np.where(mask[lo + 1:lo + 65] > 0, stream[lo + 1:lo + 65], -100)
            assert labels[row].tolist() == want.tolist()


def test_smollm2_reply_with_leading_whitespace_keeps_the_inference_prompt(smollm2_dir):
    """SmolLM2's BPE merges the header's newline with a reply's leading newline and spaces when
    the conversation is tokenized whole (the prompt then ends differently from inference's)."""
    tok = HFTokenizer(smollm2_dir)
    msgs = [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "\n  Hello!\n"}]
    ids, mask = tok.encode_chat(msgs)
    prompt = tok._tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    n = int(np.argmax(mask > 0))
    assert ids[:n].tolist() == tok._tok(prompt, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids[n:]) == "\n  Hello!\n<|im_end|>\n"


def test_tokenizer_identity_covers_the_libraries_that_render_and_tokenize(tmp_path, monkeypatch):
    """The cache key holds the tokenizer's files and the versions of tokenizers, transformers and
    jinja2: another version may render a template or split a word otherwise, so it tokenizes again."""
    from longctx.data import tokenize

    folder = make_tokenizer(tmp_path / "tok", "llama3")
    first = HFTokenizer(folder).identity
    assert HFTokenizer(folder).identity == first
    assert "transformers==" in tokenize._library_versions()
    monkeypatch.setattr(tokenize, "_library_versions", lambda: "tokenizers==0;transformers==0;jinja2==0")
    assert HFTokenizer(folder).identity != first


def test_a_chat_source_the_tokenizer_cannot_render_exits_2_naming_the_file(tmp_path, capsys):
    """Through `longctx train`: a line naming the source's key and file (the tokenizer error alone
    said only `data: ...`), exit 2, and the run folder keeps what an earlier run wrote."""
    from longctx.cli import main

    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"prompt": "a", "response": "b"}))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("mine")
    assert main(["train", str(TINY), f"run.dir={run_dir}", f"data.source={data}", "data.cache=false"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"longctx: error: data.source={str(data)!r}: the source holds chat records"), err
    assert not any("Traceback" in line for line in err)
    assert (run_dir / "notes.txt").read_text() == "mine"
