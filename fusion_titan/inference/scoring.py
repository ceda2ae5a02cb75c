"""Log-probabilities of given tokens under the model (what lm-eval's loglikelihood requests need).

Only the positions being scored go through the vocabulary head, in chunks, so a long sequence
never materializes [T, vocab] logits at once (152K vocab x 4K tokens would be 2.5 GB in fp32).
Right padding is safe for batching: every mixer is causal (MLA, Gated DeltaNet, Mamba-2, short
convs) and MoE routing is token-local in eval mode, so pad tokens after a row's end cannot change
that row's earlier positions.
"""

from __future__ import annotations

import torch

HEAD_CHUNK = 512  # positions per head + log-softmax chunk


@torch.no_grad()
def token_logprobs(model, inputs: torch.Tensor, targets: torch.Tensor, first: int = 0,
                   lengths: list[int] | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """inputs, targets [B, T] (targets[t] = the token after inputs[t]) -> per row, the log-probs
    of targets[first:len] (float64 on CPU) and whether each is the argmax, for row lengths
    `lengths` (default: all T). `first` may also be a list, one start per row."""
    model.eval()
    batch, seq = inputs.shape
    lengths = lengths or [seq] * batch
    firsts = first if isinstance(first, list) else [first] * batch
    hidden = model.norm(model.trunk(inputs))
    logps, greedy = [], []
    for row in range(batch):
        lp_parts, g_parts = [], []
        for s in range(firsts[row], lengths[row], HEAD_CHUNK):
            e = min(s + HEAD_CHUNK, lengths[row])
            logits = model.logits(hidden[row, s:e]).float()
            logp = logits.log_softmax(dim=-1)
            tgt = targets[row, s:e]
            lp_parts.append(logp.gather(-1, tgt[:, None]).squeeze(-1).double().cpu())
            g_parts.append((logits.argmax(dim=-1) == tgt).cpu())
        logps.append(torch.cat(lp_parts) if lp_parts else torch.zeros(0, dtype=torch.float64))
        greedy.append(torch.cat(g_parts) if g_parts else torch.zeros(0, dtype=torch.bool))
    return logps, greedy


def _pad_batch(rows: list[list[int]], device) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.long, device=device)


@torch.no_grad()
def continuation_logprob_batch(model, pairs: list[tuple[list[int], list[int]]],
                               max_len: int) -> list[tuple[float, bool]]:
    """(context ids, continuation ids) pairs -> (sum of continuation log-probs, all greedy).

    Each row feeds (context + continuation)[:-1], truncated on the left to max_len tokens, and
    scores the last len(continuation) positions. The context must be non-empty (prefix EOS for
    an empty one); the continuation must fit in max_len."""
    device = next(model.parameters()).device
    inputs, targets, firsts, lengths = [], [], [], []
    for ctx, cont in pairs:
        if not ctx or not cont:
            raise ValueError("context and continuation must both be non-empty token lists")
        if len(cont) > max_len:
            raise ValueError(f"continuation of {len(cont)} tokens exceeds max_len {max_len}")
        full = (ctx + cont)[-(max_len + 1):]
        inputs.append(full[:-1])
        targets.append(full[1:])
        lengths.append(len(full) - 1)
        firsts.append(len(full) - 1 - len(cont))
    logps, greedy = token_logprobs(model, _pad_batch(inputs, device), _pad_batch(targets, device),
                                   first=firsts, lengths=lengths)
    return [(float(lp.sum()), bool(g.all())) for lp, g in zip(logps, greedy)]


def continuation_logprob(model, context: list[int], continuation: list[int],
                         max_len: int) -> tuple[float, bool]:
    return continuation_logprob_batch(model, [(context, continuation)], max_len)[0]


def rolling_windows(tokens: list[int], prefix: int, max_len: int) -> list[tuple[list[int], list[int]]]:
    """Disjoint windows covering every token once (lm-eval's rolling scheme with context_len 1):
    window i feeds max_len inputs and predicts a fresh block; the first is conditioned on `prefix`
    (EOS), later ones on the tokens just before them. Returns (inputs, targets scored at the end)."""
    out = []
    pos = 0
    while pos < len(tokens):
        end = min(pos + max_len, len(tokens))
        targets = tokens[pos:end]
        context = ([prefix] + tokens)[max(0, end - max_len):end]  # shifted by one: [prefix]+tokens
        out.append((context, targets))
        pos = end
    return out


@torch.no_grad()
def rolling_logprob(model, tokens: list[int], prefix: int, max_len: int) -> float:
    """Sum of log p(token_t | prefix, tokens_<t) over the whole list, in windows of max_len."""
    total = 0.0
    device = next(model.parameters()).device
    for context, targets in rolling_windows(tokens, prefix, max_len):
        inputs = torch.tensor([context], dtype=torch.long, device=device)
        # input position j predicts ([prefix] + tokens)[start + j + 1]; score the last len(targets)
        full_targets = torch.tensor([context[1:] + [targets[-1]]], dtype=torch.long, device=device)
        logps, _ = token_logprobs(model, inputs, full_targets, first=len(context) - len(targets))
        total += float(logps[0].sum())
    return total
