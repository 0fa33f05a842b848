"""Router benchmark (the router-design study's tables): same as the `lightning-moe-bench-routers` command.

    python benchmarks/routers.py                          # random hidden states, B=16 x S=128 x D=768
    python benchmarks/routers.py --hidden-states minilm   # real states of a pre-trained BERT (offline)
"""

from lightning_moe.bench.routers import bench_routers

if __name__ == "__main__":
    bench_routers()
