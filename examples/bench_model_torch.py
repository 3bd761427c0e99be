"""PyTorch eager counterpart of examples/bench_model.rs, for a side-by-side measurement.

SmolLM2-135M-Instruct (the GGUF dequantized by transformers), f32, batch 4 x 256 with the
same token ids, loss = mean negative log-softmax at the next-token labels, forward+backward.
Prints wall and process CPU time per step and the peak RSS. Run with the reference env:

    /work/refenv/bin/python examples/bench_model_torch.py assets/SmolLM2-135M-Instruct.Q4_1.gguf
"""

import os
import resource
import sys
import time

import torch
import transformers


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else "assets/SmolLM2-135M-Instruct.Q4_1.gguf"
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    folder, name = os.path.split(os.path.abspath(path))
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32
    )
    model.train()
    vocab = model.config.vocab_size
    ids = torch.tensor([(i * 2654435761) % (2**32) % vocab for i in range(4 * 256)]).view(4, 256)

    for step in range(steps):
        wall, cpu = time.time(), time.process_time()
        logits = model(input_ids=ids).logits
        logps = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])
        loss = -logps.mean()
        loss.backward()
        model.zero_grad(set_to_none=True)
        print(
            f"step {step}: loss {loss.item():.4f}, wall {time.time() - wall:.2f} s, "
            f"cpu {time.process_time() - cpu:.1f} s",
            flush=True,
        )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak:.0f} MiB (torch {torch.__version__}, transformers "
          f"{transformers.__version__})")


if __name__ == "__main__":
    main()
