"""Check empirically that the shipped specialty dataset proves a model learned (not a test).

Evaluates the base model's exact-match accuracy on the test split (greedy decoding), trains a
LoRA with Hugging Face peft and a minimal plain-PyTorch loop (loss on answer tokens only), and
evaluates again. Prints one JSON line of results for docs/dataset.md.

Usage:
    HF_HUB_OFFLINE=1 PYTHONPATH=src python scripts/check_dataset.py [--steps 60] [--lr 2e-3]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from datetime import date
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import PreTrainedTokenizerBase

from tilpass.pretrained import load_model

DATA = Path(__file__).resolve().parents[1] / "src" / "tilpass" / "data"


def read_jsonl(path: Path) -> list[dict]:
    """Read one JSON record per line."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def encode_example(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], max_length: int
) -> tuple[list[int], list[int]]:
    """Token ids of the whole chat and labels that are -100 everywhere but the answer."""
    prompt = tokenizer.apply_chat_template(
        messages[:-1], tokenize=False, add_generation_prompt=True
    )
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    full_ids = tokenizer(full, add_special_tokens=False).input_ids[:max_length]
    assert full_ids[: len(prompt_ids)] == prompt_ids, "chat template is not prefix-stable"
    labels = [-100] * len(prompt_ids) + full_ids[len(prompt_ids) :]
    return full_ids, labels[:max_length]


def collate(batch: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch of (ids, labels) to its longest example."""
    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id)
    labels = torch.full((len(batch), width), -100)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (x, y) in enumerate(batch):
        ids[row, : len(x)] = torch.tensor(x)
        labels[row, : len(y)] = torch.tensor(y)
        mask[row, : len(x)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    records: list[dict],
    batch_size: int = 25,
) -> dict[str, float]:
    """Exact-match accuracy of greedy answers and mean answer-token loss."""
    model.eval()
    tokenizer.padding_side = "left"
    correct, losses = 0, []
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        prompts = [
            tokenizer.apply_chat_template(
                r["messages"][:-1], tokenize=False, add_generation_prompt=True
            )
            for r in chunk
        ]
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(**enc, max_new_tokens=6, do_sample=False)
        answers = tokenizer.batch_decode(out[:, enc.input_ids.shape[1] :], skip_special_tokens=True)
        correct += sum(
            a.strip() == r["messages"][-1]["content"] for a, r in zip(answers, chunk, strict=True)
        )
        batch = collate(
            [encode_example(tokenizer, r["messages"], 512) for r in chunk], tokenizer.pad_token_id
        )
        losses.append(model(**batch).loss.item())
    return {"exact_match": correct / len(records), "loss": sum(losses) / len(losses)}


def main() -> None:
    """Run base eval, LoRA training and adapted eval; print the results as JSON."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--alpha", type=int, default=16)
    parser.add_argument("--targets", default="q_proj,v_proj")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-base", action="store_true")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train = read_jsonl(DATA / "specialty_train.jsonl")
    test = read_jsonl(DATA / "specialty_test.jsonl")
    model, tokenizer = load_model()

    result: dict = {"date": date.today().isoformat(), "machine": platform.processor() or "cpu"}
    result["threads"] = args.threads
    if not args.skip_base:
        t0 = time.perf_counter()
        result["base"] = evaluate(model, tokenizer, test)
        result["base_eval_s"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(result), flush=True)

    config = LoraConfig(
        r=args.r,
        lora_alpha=args.alpha,
        lora_dropout=0.0,
        target_modules=args.targets.split(","),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0
    )
    encoded = [encode_example(tokenizer, r["messages"], args.max_length) for r in train]
    rng = random.Random(args.seed)
    order: list[int] = []
    model.train()
    t0 = time.perf_counter()
    for step in range(args.steps):
        if len(order) < args.batch_size:
            fresh = list(range(len(encoded)))
            rng.shuffle(fresh)
            order += fresh
        idx, order = order[: args.batch_size], order[args.batch_size :]
        batch = collate([encoded[i] for i in idx], tokenizer.pad_token_id)
        # Linear warm-up over 10% of the steps, then linear decay to 0.
        warm = max(1, args.steps // 10)
        scale = (step + 1) / warm if step < warm else (args.steps - step) / (args.steps - warm)
        for group in optimizer.param_groups:
            group["lr"] = args.lr * scale
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == args.steps - 1:
            elapsed = time.perf_counter() - t0
            print(f"step {step} loss {loss.item():.4f} {elapsed:.0f}s", flush=True)
    train_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    result["lora"] = evaluate(model, tokenizer, test)
    result["lora_eval_s"] = round(time.perf_counter() - t0, 1)
    result["train"] = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "examples_seen": args.steps * args.batch_size,
        "lr": args.lr,
        "r": args.r,
        "lora_alpha": args.alpha,
        "target_modules": args.targets.split(","),
        "max_length": args.max_length,
        "trainable_params": trainable,
        "wall_s": round(train_s, 1),
        "s_per_step": round(train_s / args.steps, 2),
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
