"""PyTorch + transformers side of `ganpo-bench`: forward+backward training throughput and peak
memory of a causal LM loaded from a GGUF file, on the same batch shape the Rust side uses.

    python scripts/bench_torch.py --gguf assets/SmolLM2-135M-Instruct.Q4_1.gguf \
        --batch 4 --seq 256 --iters 3 --threads 2

Prints one JSON object on stdout: {"torch": version, "transformers": version,
"train_tokens_per_s": ..., "cpu_seconds_per_step": ..., "forward_tokens_per_s": ...,
"peak_rss_mb": ...}.
The loss is the mean next-token cross-entropy over all positions (what the Rust side
computes), in f32, eager mode.
"""

import argparse
import json
import os
import resource
import time


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch
    import transformers

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    folder, name = os.path.split(os.path.abspath(args.gguf))
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, torch_dtype=torch.float32
    )
    model.train()
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq))
    tokens = args.batch * args.seq

    def train_step():
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()

    cpu_start = time.process_time()
    train_step()  # warm-up
    start = time.perf_counter()
    for _ in range(args.iters):
        train_step()
    train_s = (time.perf_counter() - start) / args.iters
    cpu_s = (time.process_time() - cpu_start) / (args.iters + 1)

    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        model(input_ids=ids)
        start = time.perf_counter()
        for _ in range(args.iters):
            model(input_ids=ids)
        forward_s = (time.perf_counter() - start) / args.iters

    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "batch": args.batch,
        "seq": args.seq,
        "train_tokens_per_s": tokens / train_s,
        "cpu_seconds_per_step": cpu_s,
        "forward_tokens_per_s": tokens / forward_s,
        "peak_rss_mb": peak_kb / 1024.0,
    }))


if __name__ == "__main__":
    main()
