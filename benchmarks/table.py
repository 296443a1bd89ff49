"""docs/performance.md's CPU table from an `m4 bench --json` result: each m4 backend beside the
transformers baseline of the same run, with ratios for ttft and decode.

    python benchmarks/table.py results/bench-demo.json
"""

import json
import sys


def main(path: str) -> None:
    result = json.load(open(path))
    m, rec = result["machine"], result["records"]
    hf = {(r["workload"], r.get("context")): r for r in rec if r["backend"] == "hf"}
    print(f"Measured by `benchmarks/run_all.sh` on {m['cpu']} ({m['cores']} cores"
          + (f", {m['gpu']}" if "gpu" in m else "") + f"), torch {m.get('torch', '-')}, {result['date']}.\n")
    print("| workload | backend | ingest ms/frame | ttft ms | × hf | decode tok/s | × hf | peak RSS |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rec:
        base = hf[(r["workload"], r.get("context"))]
        s, b = r["stages"], base["stages"]
        first = "ttft_ms" if "ttft_ms" in s else "prefill_ms"  # decode workload: the prefill is the wait
        ttft = s[first]["p50"]
        name = r["workload"] + (f" @{r['context']}" if "context" in r else "")
        ingest = f"{s['ingest_ms']['p50']:.1f}" if "ingest_ms" in s else "-"
        print(f"| {name} | {r['backend']} {r['dtype']} | {ingest} | {ttft:.1f} | "
              f"{b[first]['p50'] / ttft:.1f}× | {r['decode_tok_s']:.1f} | "
              f"{r['decode_tok_s'] / base['decode_tok_s']:.1f}× | {r['peak_rss_bytes'] / 2**20:.0f} MiB |")


if __name__ == "__main__":
    main(sys.argv[1])
