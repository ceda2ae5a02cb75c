"""The lm-eval-harness adapter (fusion_titan.inference.lm_eval_adapter) on a tiny CPU model:
its numbers must be exactly what a plain forward gives, and a local task must run through
lm_eval's evaluator. Skipped when the optional `lm-eval` package is absent."""

import math

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from fusion_titan.data.tokenizer import TiktokenTokenizer  # noqa: E402
from fusion_titan.inference.lm_eval_adapter import FusionLM  # noqa: E402
from fusion_titan.model.flavors import FLAVORS  # noqa: E402
from fusion_titan.model.model import FusionModel  # noqa: E402

MAX_LEN = 24


@pytest.fixture(scope="module")
def lm():
    # Real Qwen vocabulary (the tokenizer's ids), 2 layers: one MLA+MoE block, one GDN block.
    args = FLAVORS["debugmodel"].replace(n_layers=2, layer_schedule="1:1", max_seq_len=64, mtp_depth=0)
    torch.manual_seed(0)
    model = FusionModel(args)
    model.init_weights()
    return FusionLM(model=model.eval(), tokenizer=TiktokenTokenizer("qwen2.5"), batch_size=3,
                    max_length=MAX_LEN)


def plain_logprobs(model, ids):
    """log p(ids[t+1] | ids[:t+1]) for every t, from one plain forward (full logits)."""
    with torch.no_grad():
        logp = model(torch.tensor([ids[:-1]])).double().log_softmax(-1)[0]
    return logp.gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1), logp.argmax(-1)


def req(kind, *args):
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_loglikelihood_equals_sum_of_token_logprobs(lm):
    pairs = [("The quick brown fox", " jumps over"), ("def f(x):\n   ", " return x"),
             ("", "hello world"), ("a", " b c d e")]
    got = lm.loglikelihood([req("loglikelihood", c, x) for c, x in pairs])
    for (ctx, cont), (logprob, greedy) in zip(pairs, got):
        if ctx:
            n_sp = len(ctx) - len(ctx.rstrip())  # lm_eval moves trailing spaces to the continuation
            ctx, cont = ctx[: len(ctx) - n_sp], ctx[len(ctx) - n_sp:] + cont
            whole = lm.tok_encode(ctx + cont)
            ctx_ids = lm.tok_encode(ctx)
            cont_ids = whole[len(ctx_ids):]
            ids = ctx_ids + cont_ids
        else:
            cont_ids = lm.tok_encode(cont)
            ids = [lm.eot_token_id] + cont_ids
        lp, argmax = plain_logprobs(lm.model, ids)
        n = len(cont_ids)
        assert logprob == pytest.approx(lp[-n:].sum().item(), abs=1e-4)
        assert greedy == bool((argmax[-n:] == torch.tensor(ids[-n:])).all())


def test_is_greedy_true_for_the_argmax_continuation(lm):
    ctx = lm.tok_encode("import numpy as np\n")
    seq = list(ctx)
    for _ in range(3):  # greedy continuation by full recompute
        _, argmax = plain_logprobs(lm.model, seq + [0])
        seq.append(int(argmax[-1]))
    cont = seq[len(ctx):]
    other = cont[:2] + [(cont[2] + 1) % 1000]
    res = lm._loglikelihood_tokens([(("", ""), ctx, cont), (("", ""), ctx, other)])
    assert res[0][1] is True and res[1][1] is False
    lp, _ = plain_logprobs(lm.model, ctx + cont)
    assert res[0][0] == pytest.approx(lp[-3:].sum().item(), abs=1e-4)


def test_long_context_is_left_truncated_to_max_length(lm):
    ctx, cont = list(range(1000, 1040)), [7, 8, 9]  # 43 tokens > MAX_LEN
    (logprob, _), = lm._loglikelihood_tokens([(("", ""), ctx, cont)])
    window = (ctx + cont)[-(MAX_LEN + 1):]
    lp, _ = plain_logprobs(lm.model, window)
    assert logprob == pytest.approx(lp[-3:].sum().item(), abs=1e-4)


def test_rolling_loglikelihood_over_windows(lm):
    text = "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n" * 2
    toks = lm.tok_encode(text)
    assert len(toks) > 2 * MAX_LEN
    # By hand: tokens [0, MAX_LEN) conditioned on EOS; every later block of up to MAX_LEN tokens
    # is predicted from a full MAX_LEN-token input window ending just before its last token.
    seq = [lm.eot_token_id] + toks
    expected, pos = 0.0, 0
    while pos < len(toks):
        end = min(pos + MAX_LEN, len(toks))
        start = max(0, end - MAX_LEN)           # window of seq[start : end + 1]
        lp, _ = plain_logprobs(lm.model, seq[start:end + 1])
        expected += lp[-(end - pos):].sum().item()
        pos = end
    (got,) = lm.loglikelihood_rolling([req("loglikelihood_rolling", text)])
    assert got == pytest.approx(expected, abs=1e-3)
    assert math.isfinite(got) and got < 0


def test_generate_until_stops_at_the_stop_string(lm):
    ctx = "x = 1\ny ="
    free = lm.generate_until([req("generate_until", ctx, {"until": [], "max_gen_toks": 10})])[0]
    new = lm.tokenizer.encode(free)
    assert free and len(new) >= 4
    stop = lm.tok_decode(new[2:4])
    want = free.split(stop)[0]
    got = lm.generate_until([req("generate_until", ctx, {"until": [stop], "max_gen_toks": 10})])[0]
    assert got == want and stop not in got


def test_tiny_local_task_through_the_evaluator(lm, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    data = tmp_path / "tiny.jsonl"
    data.write_text("\n".join([
        '{"question": "1 + 1 =", "choices": [" 2", " 3"], "label": 0}',
        '{"question": "The capital of France is", "choices": [" Paris", " Rome"], "label": 0}',
        '{"question": "def f(x): return", "choices": [" x", " )"], "label": 0}',
    ]) + "\n")
    (tmp_path / "tiny_task.yaml").write_text(f"""
task: fusion_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
""")
    results = simple_evaluate(model=lm, tasks=["fusion_tiny_mc"], task_manager=TaskManager(include_path=str(tmp_path)),
                              bootstrap_iters=0, log_samples=False)
    acc = results["results"]["fusion_tiny_mc"]["acc,none"]
    assert 0.0 <= acc <= 1.0


def test_registered_name():
    from lm_eval.api.registry import get_model

    assert get_model("fusion_titan") is FusionLM
