"""Train the demo checkpoint shipped in ane_eval/demo/checkpoint (deterministic; ~15 min on 2 CPU cores).

    python -m ane_eval.demo.train --out ane_eval/demo/checkpoint

A byte-level BPE tokenizer and a 4-layer Llama (GQA, ~1M parameters) trained on text from `world.py`.
Weights are rounded to fp16 and saved as fp16 safetensors, so the HF checkpoint and the converted fp16 CoreML
model hold identical weights and parity tests compare computation, not rounding.
Needs torch (not a runtime dependency of ane_eval).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

from . import world

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
SEQ_LEN = 128


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   chat_template=CHAT_TEMPLATE, model_max_length=512)


def batches(tokenizer, rng: random.Random, batch_size: int):
    """Windows of SEQ_LEN tokens that start at a document boundary (as lm-eval contexts do, without BOS),
    sometimes after BOS (as rolling-perplexity windows do); documents joined by EOS or by few-shot blank lines."""
    import torch

    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    fewshot_sep = tokenizer.encode("\n\n")
    while True:
        rows = []
        for _ in range(batch_size):
            ids = [bos] if rng.random() < 0.3 else []
            while len(ids) < SEQ_LEN:
                ids += tokenizer.encode(world.document(rng))
                ids += [eos] if rng.random() < 0.5 else fewshot_sep
            rows.append(ids[:SEQ_LEN])
        yield torch.tensor(rows)


def quick_eval(model, tokenizer, n: int = 200) -> dict:
    """Accuracy on fresh boolq- and arc-shaped items: a sanity check printed at the end of training."""
    import torch

    rng = random.Random(12345)

    def logprob(ctx: str, cont: str) -> float:
        c, full = tokenizer.encode(ctx), tokenizer.encode(ctx + cont)
        with torch.no_grad():
            logits = model(torch.tensor([full])).logits[0].float().log_softmax(-1)
        return sum(logits[i - 1, full[i]].item() for i in range(len(c), len(full)))

    boolq = arc = 0
    for _ in range(n):
        it = world.boolq_item(rng)
        ctx = f"{it['passage']}\nQuestion: {it['question']}?\nAnswer:"
        boolq += int(logprob(ctx, " yes") > logprob(ctx, " no")) == it["label"]
        it = world.arc_item(rng)
        ctx = f"Question: {it['question']}\nAnswer:"
        scores = [logprob(ctx, " " + c) for c in it["choices"]["text"]]
        arc += "ABCD"[scores.index(max(scores))] == it["answerKey"]
    return {"boolq_acc": boolq / n, "arc_acc": arc / n}


def portable_tokenizer_config(out: Path) -> None:
    """Name a tokenizer class every transformers release knows and keep the chat template inside the config."""
    path = out / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg.pop("backend", None)
    path.write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "chat_template.jinja").unlink(missing_ok=True)


def main(argv=None) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "checkpoint")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args(argv)

    random.seed(0)
    torch.manual_seed(0)
    torch.set_num_threads(2)
    tokenizer = train_tokenizer(world.corpus(20000, seed=1), vocab_size=1000)
    # logits width ≥ tokenizer vocabulary; 1024 splits into 8 or 16 parts whose widths are multiples of the
    # palettization group (8), so LUT builds palettize the LM head too
    vocab = math.ceil(len(tokenizer) / 128) * 128
    config = LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = 100
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    data = batches(tokenizer, random.Random(2), args.batch_size)
    t0 = time.time()
    model.train()
    for step in range(args.steps):
        x = next(data)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step} loss {loss.item():.4f} {time.time() - t0:.0f}s", flush=True)

    model.eval()
    with torch.no_grad():  # exactly representable in fp16: the converted model holds the same numbers
        for p in model.parameters():
            p.copy_(p.half().float())
    print(quick_eval(model, tokenizer), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    model.half().save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    portable_tokenizer_config(args.out)
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
